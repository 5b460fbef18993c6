"""Perplexity (lm-eval rolling), KL divergence and the packed scorer against slow obvious references."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from lowbit.data import generate_corpus, write_jsonl
from lowbit.eval import LowbitLM, evaluate
from lowbit.eval.divergence import compare_to_reference, token_windows
from lowbit.models import build_model, init_weights
from lowbit.models.tokenizer import load_tokenizer, train_bpe_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = init_weights(build_model("tiny", num_layers=2, max_seq_len=64), std=0.2).eval()
    tok = load_tokenizer(train_bpe_tokenizer(generate_corpus(256), 1024, tmp_path_factory.mktemp("tok")))
    return model, tok


def _logprob_of(model, ids: list[int]) -> float:
    """Sum of log p(ids[i] | ids[:i]) for i >= 1, one unbatched forward, float64."""
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), -1)
    return sum(lp[i - 1, ids[i]].item() for i in range(1, len(ids)))


def test_perplexity_task_equals_disjoint_window_brute_force(tiny, tmp_path):
    model, tok = tiny
    docs = ["Anna opens the box and takes the cup. " * 12, "Ben wipes the table, then he sits down.", "x y z"]
    f = write_jsonl([{"text": d} for d in docs], tmp_path / "docs.jsonl")
    res = evaluate(model=model, tokenizer=tok, tasks="perplexity_local",
                   text=f)["results"]["perplexity_local"]
    total, words, nbytes = 0.0, 0, 0
    for d in docs:  # lm-eval's rolling windows: every token predicted once, with up to 64 tokens before it
        ids = tok.encode(d, add_bos=False, add_eos=False)
        total += _logprob_of(model, [tok.bos_id] + ids[:64])
        predicted = min(64, len(ids))
        while predicted < len(ids):
            end = min(predicted + 64, len(ids))
            inp = ids[end - 65:end - 1]  # the 64 tokens before the window's last one
            with torch.no_grad():
                lp = F.log_softmax(model(torch.tensor([inp]))[0].double(), -1)
            total += sum(lp[k - end + 64, ids[k]].item() for k in range(predicted, end))
            predicted = end
        words += len(re.split(r"\s+", d))
        nbytes += len(d.encode())
    assert res["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-6)
    assert res["byte_perplexity,none"] == pytest.approx(math.exp(-total / nbytes), rel=1e-6)
    assert res["bits_per_byte,none"] == pytest.approx(-total / nbytes / math.log(2), rel=1e-6)


def test_kl_divergence_equals_per_token_float64_loop(tiny):
    model, tok = tiny
    torch.manual_seed(1)
    other = init_weights(build_model("tiny", num_layers=2, max_seq_len=64), std=0.2).eval()
    windows = token_windows(tok, generate_corpus(40), window=16, max_windows=6)
    assert windows.shape == (6, 16)
    with torch.no_grad():
        got = compare_to_reference(other, model, windows, batch_size=4)
    kls, same, nll, nll_ref = [], [], 0.0, 0.0
    for w in windows:
        with torch.no_grad():  # one window at a time (fp32 logits differ from a batch of 4 by ~1e-7)
            lps, lqs = model(w[None])[0].double(), other(w[None])[0].double()
        for t in range(8, 15):  # the second half of each window is scored
            p, q = F.log_softmax(lps[t], -1), F.log_softmax(lqs[t], -1)
            kls.append(sum(math.exp(p[v].item()) * (p[v].item() - q[v].item()) for v in range(p.numel())))
            same.append(float(p.argmax() == q.argmax()))
            nll -= q[w[t + 1]].item()
            nll_ref -= p[w[t + 1]].item()
    n = len(kls)
    assert got["tokens"] == n == 42
    assert got["kl_mean"] == pytest.approx(sum(kls) / n, rel=1e-6)
    assert got["top1_agreement"] == pytest.approx(sum(same) / n)
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-6)
    assert got["ppl_reference"] == pytest.approx(math.exp(nll_ref / n), rel=1e-6)
    with torch.no_grad():
        self_kl = compare_to_reference(model, model, windows)
    assert self_kl["kl_mean"] == 0 and self_kl["top1_agreement"] == 1


def test_packed_scorer_equals_one_request_at_a_time(tiny):
    """Shared contexts (multiple choice), several groups per row, a row budget that splits the batch,
    and a context longer than max_length (left-truncated) all score as a lone unpadded sequence."""
    model, tok = tiny
    lm = LowbitLM(model, tok, row_tokens=48, token_budget=96)
    ctxs = ["Anna opens the box.", "Ben wipes the table and", "A long context " * 30]
    ends = [" Then she sits.", " He leaves the room now.", " x", " and a final tail of words"]
    pairs = [(c, e) for c in ctxs for e in ends]
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        c, t = lm._encode_pair(ctx, cont)  # lm-eval's own context / continuation split
        whole = ([tok.bos_id, *c] + t)[-65:]
        assert ll == pytest.approx(_logprob_of(model, whole[: len(whole) - len(t)] + t) -
                                   _logprob_of(model, whole[: len(whole) - len(t)]), abs=1e-5)
        with torch.no_grad():
            argmax = model(torch.tensor([whole[:-1]]))[0].argmax(-1)[-len(t):]
        assert greedy == bool((argmax == torch.tensor(t)).all())


def test_unknown_task_is_named_with_close_matches(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['hellaswagg'\].*hellaswag"):
        evaluate(model=model, tokenizer=tok, tasks="hellaswagg")
