import json

import pytest

from lowbit.data import DataError, load_texts, pack_documents, read_jsonl
from lowbit.models.tokenizer import load_tokenizer, train_bpe_tokenizer


def test_malformed_jsonl_names_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b"\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:3: malformed JSON"):
        read_jsonl(p)
    p.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: missing key\(s\) \['text'\]"):
        read_jsonl(p, required=("text",))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_user_text_and_jsonl_go_through_datasets(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    assert load_texts(tmp_path / "a.txt") == ["first doc", "second doc"]
    j = tmp_path / "b.jsonl"
    j.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(["x y", "z"])))
    assert load_texts(j) == ["x y", "z"]
    with pytest.raises(ValueError, match="b.jsonl.*'body'"):
        load_texts(j, text_field="body")
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        load_texts(tmp_path / "missing_dir")


def test_pack_documents_frames_each_doc_with_bos_eos(tmp_path):
    texts = ["the cat sat on the mat"] * 20
    tok = load_tokenizer(train_bpe_tokenizer(texts, 300, tmp_path / "tok"))
    rows = pack_documents(tok, texts, seq_len=15)
    ids = tok.encode(texts[0], add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert rows.shape[1] == 16
    flat = rows.flatten().tolist()
    assert flat == (ids * 20)[: len(flat)]
    assert tok.decode(tok.encode(texts[0], add_bos=False, add_eos=False)) == texts[0]


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"", "{}: empty (no non-blank lines)"),
    ("blank.txt", b"\n  \n", "{}: empty (no non-blank lines)"),
    ("latin1.txt", "first\ncaf\u00e9 au lait\n".encode("latin-1"),
     "{}:2: not UTF-8 text (byte 0xe9 at column 4)"),
    ("binary.txt", b"ok\n\x00\x01\x02\x03", "{}:2: not text (NUL byte at column 1)"),
    ("empty.jsonl", b"\n", "{}: empty (no JSON objects)"),
    ("binary.jsonl", b'{"text": "a"}\n\xff\xfe{}\n', "{}:2: not UTF-8 text (byte 0xff at column 1)"),
    ("int.jsonl", b'{"text": "a"}\n{"text": 5}\n', "{}:2: field 'text' is int 5, expected a string"),
    ("null.jsonl", b'{"text": "a"}\n\n{"text": null}\n', "{}:3: field 'text' is null, expected a string"),
    ("array.json", b'[{"text": "a"}, {"text": ["b"]}]',
     "{}: record 2: field 'text' is list ['b'], expected a string"),
    ("lines.json", b'{"text": "a"}\n{"text": 1.5}\n', "{}:2: field 'text' is float 1.5, expected a string"),
])
def test_empty_binary_or_non_string_data_names_file_and_line(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_texts(p)
    assert str(e.value).startswith(message.format(p))


def test_bad_file_in_a_directory_is_named(tmp_path):
    (tmp_path / "a.txt").write_text("fine text\n")
    (tmp_path / "b.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(DataError, match=rf"{tmp_path / 'b.txt'}:1: not UTF-8 text \(byte 0x89 at column 1\)"):
        load_texts(tmp_path)
