import json

import pytest

from lowbit.cli import main
from lowbit.data import DataError
from lowbit.data.cloze import cloze_candidates, cloze_items
from lowbit.data.real_text import load_source, package_docs, python_docs, read_text_file


def test_real_sources_are_prose_and_disjoint():
    docs, readmes = python_docs(), package_docs()
    assert sum(map(len, docs)) > 200_000 and sum(map(len, readmes)) > 50_000
    assert not set(docs) & set(readmes)
    for p in docs[:200]:
        assert "```" not in p and ">>>" not in p and len(p) >= 80


def test_cloze_items_are_hellaswag_items_with_other_passages_as_distractors():
    paragraphs = python_docs()
    items = cloze_items(paragraphs, 120, seed=3, label="Docs")
    cands = cloze_candidates(paragraphs)
    truth = {c[2]: c[0] for c in cands}
    assert items == cloze_items(paragraphs, 120, seed=3, label="Docs")  # deterministic
    assert len({it["ctx_a"] for it in items}) == 120
    for it in items:
        assert set(it) >= {"activity_label", "ctx_a", "ctx_b", "endings", "label"} and it["ctx_b"] == ""
        gold = int(it["label"])
        endings = it["endings"]
        assert len(endings) == 4 and len(set(endings)) == 4
        para = it["source_paragraph"]
        # the true ending continues the context inside its own paragraph
        assert (it["ctx_a"] + " " + endings[gold]) in paragraphs[para]
        for j, e in enumerate(endings):
            if j != gold:
                assert truth[e] != para  # wrong endings come from other paragraphs
        lengths = sorted(len(e) for e in endings)
        assert lengths[-1] <= 3 * lengths[0] + 20  # length-matched: length alone does not give it away
    labels = [int(it["label"]) for it in items]
    assert [labels.count(k) for k in range(4)] == [30] * 4  # the gold position is balanced


def test_too_short_text_names_the_source(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("A sentence here is one. And here is another sentence that follows it nicely.\n")
    with pytest.raises(DataError, match=r"short\.txt is too short for 10 cloze items: it has 1 usable"):
        cloze_items(read_text_file(f), 10, source=str(f))


def test_binary_text_file_is_named(tmp_path):
    f = tmp_path / "bin.txt"
    f.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(DataError, match=r"bin\.txt: not UTF-8"):
        load_source(f)


def test_cli_writes_items_a_user_text_file(tmp_path, capsys):
    text = "\n\n".join(python_docs()[:300])
    src = tmp_path / "mine.txt"
    src.write_text(text)
    out = tmp_path / "items.jsonl"
    assert main(["data", "cloze", "--from", str(src), "--output", str(out), "--num-items", "25"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 25 and rows[0]["activity_label"] == "Mine"
    assert main(["data", "cloze", "--from", str(src), "--output", str(out), "--num-items", "100000"]) == 1
    assert "too short for 100000 cloze items" in capsys.readouterr().err.strip().splitlines()[-1]
