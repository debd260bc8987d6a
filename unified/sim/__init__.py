"""Driving in highway-env: scenario suites, drivers (expert, random, constant), causation records, rollouts."""
