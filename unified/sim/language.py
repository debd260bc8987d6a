"""Instructions: paraphrases per scenario family, used when a suite does not give its own."""

from __future__ import annotations

import numpy as np

from unified.sim.suite import Scenario

DEFAULT_INSTRUCTIONS = {
    "highway": [
        "Drive along the highway safely.",
        "Cruise down the highway and overtake slower cars when it is safe.",
        "Keep going on the motorway without hitting anyone.",
        "Follow the highway at a good speed and avoid collisions.",
    ],
    "merge": [
        "Continue on the highway and let merging cars in.",
        "Drive past the on-ramp and make room for merging traffic.",
        "Keep going through the merge without a collision.",
    ],
    "roundabout": [
        "Go through the roundabout and take the exit ahead.",
        "Enter the roundabout, give way, and leave at the far exit.",
        "Drive across the roundabout safely.",
    ],
    "intersection": [
        "Cross the intersection and give way to traffic with priority.",
        "Turn at the junction without hitting crossing cars.",
        "Drive through the intersection safely.",
    ],
    "two-way": [
        "Drive along the two-way road and stay clear of oncoming cars.",
        "Follow the road safely with traffic coming the other way.",
    ],
    "exit": [
        "Take the next exit off the highway.",
        "Leave the highway at the upcoming exit.",
    ],
}
GENERIC = ["Drive safely to the end of the road.", "Keep driving and avoid collisions."]


def instructions_for(scenario: Scenario) -> list[str]:
    if scenario.instructions:
        return scenario.instructions
    family = scenario.env.rsplit("-v", 1)[0]
    return DEFAULT_INSTRUCTIONS.get(family, GENERIC)


def pick_instruction(scenario: Scenario, rng: np.random.Generator) -> str:
    options = instructions_for(scenario)
    return options[int(rng.integers(len(options)))]
