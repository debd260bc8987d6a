"""Data: the episode store, its generator, and the operator (multi-hop reasoning) data set."""
