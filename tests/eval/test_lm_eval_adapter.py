import json

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from lowbit.data import generate_corpus, generate_hellaswag, write_jsonl
from lowbit.eval import LowbitLM, evaluate
from lowbit.eval.tasks import validate_hellaswag_file
from lowbit.models import build_model, init_weights
from lowbit.models.tokenizer import load_tokenizer, train_bpe_tokenizer


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    torch.manual_seed(0)
    model = init_weights(build_model("tiny", num_layers=2), std=0.2).eval()
    tok = load_tokenizer(train_bpe_tokenizer(generate_corpus(256), 1024, tmp_path_factory.mktemp("tok")))
    return LowbitLM(model, tok, batch_size=3)


def brute_force_loglikelihood(lm, context: str, continuation: str) -> float:
    """Score one token at a time: float64 log-softmax of the full-prefix logits.

    Token split as lm-eval documents it: trailing spaces of the context move to the continuation,
    the pair is encoded whole, and the continuation is what follows the encoded context.
    """
    n = len(context) - len(context.rstrip(" "))
    context, continuation = context[: len(context) - n], context[len(context) - n:] + continuation
    ctx = [lm.tokenizer.bos_id, *lm.tok_encode(context)]
    whole = [lm.tokenizer.bos_id, *lm.tok_encode(context + continuation)]
    total = 0.0
    for i in range(len(ctx), len(whole)):
        logits = lm.model(torch.tensor([whole[:i]]))[0, -1].double()
        total += F.log_softmax(logits, -1)[whole[i]].item()
    return total


def test_loglikelihoods_equal_brute_force(lm):
    pairs = [("Baking a cake: Anna opens the box.", " Then she wipes the cup."),
             ("x", " y z w v"), ("A much longer context " * 5, " and a tail."), ("", " empty context")]
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    for (ctx, cont), (ll, _) in zip(pairs, got):
        if ctx == "":
            continue  # lm-eval scores an empty context from the prefix token only
        assert ll == pytest.approx(brute_force_loglikelihood(lm, ctx, cont), abs=1e-5)


def sequence_loglikelihood(lm, context: str, continuation: str) -> float:
    """One unbatched, unpadded forward of BOS + context + continuation; float64 log-softmax."""
    ctx = [lm.tokenizer.bos_id, *lm.tok_encode(context)]
    whole = [lm.tokenizer.bos_id, *lm.tok_encode(context + continuation)]
    logp = F.log_softmax(lm.model(torch.tensor([whole[:-1]]))[0].double(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def test_evaluate_runs_lm_eval_hellaswag_and_matches_manual_scoring(tmp_path, lm):
    items = generate_hellaswag(12, seed=5)
    task = write_jsonl(items, tmp_path / "t.jsonl")
    res = evaluate(model=lm.model, tokenizer=lm.tokenizer, task_file=task, output_dir=tmp_path / "out")
    # acc_norm by hand: hellaswag query, " " + ending scored, divided by the length of the ending.
    right = 0
    for it in items:
        query = f"{it['activity_label']}: {it['ctx_a']} {it['ctx_b'].capitalize()}"
        scores = [sequence_loglikelihood(lm, query, " " + e) / len(e) for e in it["endings"]]
        right += scores.index(max(scores)) == int(it["label"])
    assert res["results"]["hellaswag_local"]["acc_norm,none"] == pytest.approx(right / len(items))
    assert json.loads((tmp_path / "out" / "results.json").read_text())["results"]["hellaswag_local"]


def test_bad_task_files_name_path_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        validate_hellaswag_file(tmp_path / "missing.jsonl")
    items = generate_hellaswag(3)
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(items[0]) + "\n" + json.dumps(items[1])[:-3] + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        validate_hellaswag_file(p)
    items[2]["label"] = "4"
    write_jsonl(items, p)
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: label 4 out of range for 4 endings"):
        validate_hellaswag_file(p)
