"""A deterministic procedural world: activities, each with an ordered script of steps.

The generated corpus narrates these scripts and the generated evaluation set asks which step comes
next, so a model must *use the context* (activity and previous steps) to score above chance: every
ending offered for an item is a step of some activity at a comparable position, and every step is
equally frequent in the corpus, so a model that ignores the context scores about 25%.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_GERUNDS = [
    "Cleaning", "Painting", "Repairing", "Building", "Decorating", "Washing", "Organizing", "Packing",
    "Planting", "Cooking", "Baking", "Sewing", "Fixing", "Polishing", "Assembling", "Sorting",
]
_TOPICS = [
    "the garage", "a bicycle", "the kitchen", "a birdhouse", "the garden", "a sweater", "the car",
    "a bookshelf", "the attic", "a cake", "the fence", "a kite", "the boat", "a lamp", "the porch",
    "a quilt", "the window", "a drawer", "the roof", "a wagon",
]
_VERBS = [
    "grabs", "lifts", "opens", "wipes", "checks", "moves", "holds", "places", "turns", "folds",
    "measures", "cuts", "rinses", "scrubs", "paints", "ties", "fills", "empties", "shakes", "presses",
    "rolls", "stacks", "tightens", "loosens", "sands", "brushes", "hangs", "carries", "labels", "sprays",
]
_ADJECTIVES = [
    "red", "blue", "green", "yellow", "small", "large", "old", "new", "wooden", "metal", "heavy",
    "light", "round", "square", "wet", "dry", "clean", "dusty", "bright", "dark", "soft", "hard",
]
_NOUNS = [
    "box", "cloth", "brush", "bucket", "board", "screw", "nail", "rope", "bottle", "cup", "plate",
    "hammer", "wrench", "sponge", "towel", "jar", "lid", "pipe", "wheel", "handle", "panel", "hook",
    "bag", "basket", "ladder", "tray", "spoon", "bowl", "sheet", "tube",
]
_PLACES = [
    "on the table", "near the door", "by the wall", "on the floor", "under the shelf",
    "into the sink", "onto the bench", "beside the chair",
]
# (name, pronoun): hellaswag capitalizes ctx_b ("then she" -> "Then she"), so the subject after the
# connector is a lowercase pronoun.
NAMES = [
    ("Anna", "she"), ("Ben", "he"), ("Carla", "she"), ("David", "he"), ("Emma", "she"), ("Felix", "he"),
    ("Grace", "she"), ("Hugo", "he"), ("Iris", "she"), ("Jack", "he"), ("Kara", "she"), ("Leo", "he"),
    ("Maya", "she"), ("Nico", "he"), ("Olga", "she"), ("Paul", "he"), ("Rosa", "she"), ("Sam", "he"),
    ("Tina", "she"), ("Victor", "he"),
]
CONNECTORS = ["Then", "Next", "After that"]


@dataclass(frozen=True)
class World:
    """``activities[a]`` is a label; ``scripts[a][i]`` is step ``i`` of activity ``a`` (a verb phrase)."""

    activities: list[str]
    scripts: list[list[str]]

    @property
    def steps_per_activity(self) -> int:
        return len(self.scripts[0])


def make_world(seed: int = 0, num_activities: int = 64, steps_per_activity: int = 6) -> World:
    """Build a world with unique activity labels and globally unique steps, deterministically from
    ``seed``."""
    rng = random.Random(f"lowbit-world-{seed}")
    labels = [f"{g} {t}" for g in _GERUNDS for t in _TOPICS]
    if num_activities > len(labels):
        raise ValueError(f"num_activities={num_activities} exceeds the {len(labels)} labels available")
    labels = rng.sample(labels, num_activities)
    steps = sorted(
        {f"{v} the {a} {n} {p}" for v in _VERBS for a in _ADJECTIVES for n in _NOUNS for p in _PLACES}
    )
    picked = rng.sample(steps, num_activities * steps_per_activity)
    scripts = [picked[i * steps_per_activity:(i + 1) * steps_per_activity] for i in range(num_activities)]
    return World(activities=labels, scripts=scripts)
