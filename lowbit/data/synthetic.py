"""Seeded generators for the offline training corpus and the hellaswag-format evaluation set."""

from __future__ import annotations

import json
import random
from pathlib import Path

from lowbit.data.world import CONNECTORS, NAMES, World, make_world


def narrate(world: World, activity: int, person: tuple[str, str], rng: random.Random) -> str:
    """One corpus document: the activity label followed by its whole script, in order."""
    name, pronoun = person
    steps = world.scripts[activity]
    parts = [f"{world.activities[activity]}: {name} {steps[0]}."]
    parts += [f"{rng.choice(CONNECTORS)} {pronoun} {step}." for step in steps[1:]]
    return " ".join(parts)


def generate_corpus(num_docs: int = 4000, seed: int = 0, world: World | None = None) -> list[str]:
    """``num_docs`` documents cycling through every activity equally often, in seeded random order.

    Every step of every activity appears in exactly ``num_docs / num_activities`` documents (when
    divisible), so step frequencies carry no information about which ending is right.
    """
    world = world or make_world(seed)
    rng = random.Random(f"lowbit-corpus-{seed}")
    order = [i % len(world.activities) for i in range(num_docs)]
    rng.shuffle(order)
    return [narrate(world, a, rng.choice(NAMES), rng) for a in order]


def generate_hellaswag(num_items: int = 500, seed: int = 0, world: World | None = None) -> list[dict]:
    """Multiple-choice items in the exact hellaswag schema (as on the HF hub, ``label`` a string).

    Item: the activity, a name and the script's first steps as context; the right ending is the next
    step. Distractors: one other step of the same activity (order matters) and the same-position step
    of two other activities. Items use a stream of randomness independent of the corpus.
    """
    world = world or make_world(seed)
    rng = random.Random(f"lowbit-hellaswag-{seed}")
    n_act, n_steps = len(world.activities), world.steps_per_activity
    items = []
    for ind in range(num_items):
        a = rng.randrange(n_act)
        nxt = rng.randrange(1, n_steps)  # the step to predict
        steps = world.scripts[a]
        name, pronoun = rng.choice(NAMES)
        # The context narrates the script from its first step, as the corpus does.
        ctx_a = f"{name} {steps[0]}."
        ctx_a += "".join(f" Then {pronoun} {s}." for s in steps[1:nxt])
        ctx_b = f"then {pronoun}"
        same = rng.choice([j for j in range(n_steps) if j not in (nxt, nxt - 1)])
        others = rng.sample([b for b in range(n_act) if b != a], 2)
        endings = [steps[nxt] + ".", steps[same] + "."] + [world.scripts[b][nxt] + "." for b in others]
        label = rng.randrange(4)
        endings[0], endings[label] = endings[label], endings[0]
        items.append({
            "ind": ind,
            "activity_label": world.activities[a],
            "ctx_a": ctx_a,
            "ctx_b": ctx_b,
            "ctx": f"{ctx_a} {ctx_b}",
            "endings": endings,
            "source_id": f"lowbit~{seed}~{ind}",
            "split": "val",
            "split_type": "indomain",
            "label": str(label),
        })
    return items


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write rows as jsonl (one object per line), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
    return path
