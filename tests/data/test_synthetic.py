import collections
import math

import datasets
from lm_eval.tasks.hellaswag.utils import process_docs

from lowbit.data import generate_corpus, generate_hellaswag, make_world

HELLASWAG_FIELDS = {"ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split",
                    "split_type", "label"}


def test_generators_are_deterministic_and_seeded():
    assert generate_corpus(50, seed=3) == generate_corpus(50, seed=3)
    assert generate_corpus(50, seed=3) != generate_corpus(50, seed=4)
    assert generate_hellaswag(20, seed=3) == generate_hellaswag(20, seed=3)


def test_items_have_the_exact_hellaswag_schema_and_lm_eval_processes_them():
    items = generate_hellaswag(30)
    for it in items:
        assert set(it) == HELLASWAG_FIELDS
        assert isinstance(it["label"], str) and 0 <= int(it["label"]) < 4
        assert len(it["endings"]) == 4 and len(set(it["endings"])) == 4
        assert it["ctx"] == f"{it['ctx_a']} {it['ctx_b']}"
    docs = process_docs(datasets.Dataset.from_list(items))
    assert docs[0]["query"].startswith(items[0]["activity_label"] + ": ")
    assert docs[0]["choices"] == items[0]["endings"]
    # The right ending is the next step of the activity's script, in the corpus's wording.
    world = make_world(0)
    for it in items:
        a = world.activities.index(it["activity_label"])
        right = it["endings"][int(it["label"])][:-1]
        i = world.scripts[a].index(right)
        assert i >= 1 and it["ctx_a"].endswith(f" {world.scripts[a][i - 1]}.")


def test_every_step_is_equally_frequent_in_the_corpus():
    world = make_world(0)
    corpus = " ".join(generate_corpus(len(world.activities) * 5))
    counts = {s: corpus.count(" " + s + ".") for script in world.scripts for s in script}
    assert set(counts.values()) == {5}


def test_a_model_that_ignores_the_context_scores_chance():
    """A unigram word model of the corpus (no context) picks right ~25% of the time (acc_norm)."""
    words = collections.Counter(" ".join(generate_corpus(2048)).split())
    total = sum(words.values())

    def logp(text):
        return sum(math.log((words[w] + 1) / (total + len(words))) for w in text.split())

    items = generate_hellaswag(2000, seed=1, world=make_world(0))
    right = 0
    for it in items:
        scores = [logp(e) / len(e) for e in it["endings"]]
        right += scores.index(max(scores)) == int(it["label"])
    assert 0.20 < right / len(items) < 0.30
