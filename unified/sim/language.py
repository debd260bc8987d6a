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

# Where a scenario names a destination, success means reaching it, so the instruction must say which it is: a
# driver that is not told its goal cannot be asked to reach it. Intersection exits seen from the ego's approach
# (from the south): o1 west (left), o2 north (straight), o3 east (right). Roundabout exits in the order the ego
# meets them after entering from the south: exs, nxs, wxs.
DESTINATION_INSTRUCTIONS = {
    ("intersection", "o1"): [
        "Turn left at the intersection.",
        "At the junction, turn left and give way to traffic with priority.",
        "Take the left turn at the crossroads without hitting anyone.",
    ],
    ("intersection", "o2"): [
        "Go straight across the intersection.",
        "Cross the junction straight ahead and give way to traffic with priority.",
        "Drive straight over the crossroads without hitting anyone.",
    ],
    ("intersection", "o3"): [
        "Turn right at the intersection.",
        "At the junction, turn right and give way to traffic with priority.",
        "Take the right turn at the crossroads without hitting anyone.",
    ],
    ("roundabout", "exs"): [
        "Take the first exit of the roundabout.",
        "Enter the roundabout, give way, and leave at the first exit.",
    ],
    ("roundabout", "nxs"): [
        "Take the second exit of the roundabout.",
        "Enter the roundabout, give way, and leave at the second exit, straight ahead.",
    ],
    ("roundabout", "wxs"): [
        "Take the third exit of the roundabout.",
        "Enter the roundabout, give way, and leave at the third exit.",
    ],
}


def family(scenario: Scenario) -> str:
    """'intersection-v1' -> 'intersection'."""
    return scenario.env.rsplit("-v", 1)[0]


def instructions_for(scenario: Scenario) -> list[str]:
    """The scenario's own paraphrases, else those naming its destination, else the defaults of its env family."""
    if scenario.instructions:
        return scenario.instructions
    if scenario.destination is not None:
        return DESTINATION_INSTRUCTIONS[(family(scenario), scenario.destination)]
    return DEFAULT_INSTRUCTIONS.get(family(scenario), GENERIC)


def pick_instruction(scenario: Scenario, rng: np.random.Generator) -> str:
    options = instructions_for(scenario)
    return options[int(rng.integers(len(options)))]
