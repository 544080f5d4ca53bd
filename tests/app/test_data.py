"""`prepare-data` and the dataset checks: one big text file works, bad datasets fail early and clearly.

Nothing here spawns ranks: `prepare-data` runs in the test process, and `train` with a bad
dataset must fail in the launching process, before any rank (or any output) exists.
"""

import json

import pytest

from regla_megatron.app.cli import main
from regla_megatron.app.data import (
    JSON_KEYS,
    DatasetError,
    check_split,
    open_dataset,
    prepare_data,
    split_documents,
)


def _book(path, paragraphs=400, size=300):
    """One text file of `paragraphs` blank-line separated paragraphs of about `size` bytes."""
    text = "\n\n".join(f"Paragraph {i}. " + "word " * (size // 5) for i in range(paragraphs))
    path.write_text(text)
    return path


def test_split_documents_keeps_the_text_and_the_size():
    text = "a" * 10 + "\n\n" + "b" * 30 + "\n \n\n" + "c" * 5 + "\n" + "é" * 40
    assert split_documents(text, 1000) == [text]
    for limit in (7, 16, 50):
        docs = split_documents(text, limit)
        assert "".join(docs) == text
        assert all(len(d.encode()) <= limit for d in docs), (limit, docs)
    assert split_documents("   \n\n  ", 4) == []
    docs = split_documents("é" * 10, 1)  # a character never splits
    assert docs == ["é"] * 10


def test_check_split_follows_megatron():
    check_split(501, "969,30,1")
    with pytest.raises(DatasetError, match="501 documents"):
        check_split(500, "969,30,1")
    with pytest.raises(DatasetError, match=r"1 document\(s\) leave the train part of the demo's"):
        check_split(1, None)


def test_one_big_file_becomes_documents(tmp_path, capsys):
    book = _book(tmp_path / "book.txt")
    out = tmp_path / "out"
    assert main(["prepare-data", str(out), str(book), "--max-document-bytes", "2000", "--split", "90,10,0"]) == 0
    printed = capsys.readouterr().out
    assert "use --vocab-size 257 with Megatron-LM's NullTokenizer" in printed
    meta = json.loads((out / "corpus.json").read_text())
    assert sorted(meta) == sorted(JSON_KEYS)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eod"]) == ("byte", 257, 256)
    assert meta["sources"] == [str(book.resolve())]
    assert meta["documents"] > 50
    assert meta["tokens"] == book.stat().st_size + meta["documents"]
    info = open_dataset(out / "corpus")
    assert (info.num_documents, info.num_tokens) == (meta["documents"], meta["tokens"])


def test_too_few_documents_is_an_error_at_prepare_time(tmp_path, capsys):
    book = _book(tmp_path / "book.txt", paragraphs=20)
    out = tmp_path / "out"
    assert main(["prepare-data", str(out), str(book)]) == 2
    err = capsys.readouterr().err
    assert "leave the valid and test parts of the split 969,30,1 empty (it needs 501 documents)" in err
    assert "or --split 0,1,0" not in err and "--max-document-bytes" in err
    assert not out.exists()  # nothing half-written left behind


def test_existing_output_needs_force(tmp_path, capsys):
    src = _book(tmp_path / "book.txt", paragraphs=30)
    out = tmp_path / "out"
    args = ["prepare-data", str(out), str(src), "--max-document-bytes", "500", "--split", "8,1,1"]
    assert main(args) == 0
    before = (out / "corpus.bin").read_bytes()
    src.write_text(src.read_text() + "\n\nmore text")
    assert main(args) == 2
    assert "already exist(s): pass --force" in capsys.readouterr().err
    assert (out / "corpus.bin").read_bytes() == before
    assert main(args + ["--force"]) == 0
    assert (out / "corpus.bin").read_bytes() != before


@pytest.mark.parametrize("name", ["../x", "/tmp/abs", "a/b", "..", ""])
def test_name_must_stay_inside_the_output(tmp_path, capsys, name):
    src = _book(tmp_path / "book.txt", paragraphs=30)
    out = tmp_path / "sub" / "out"
    assert main(["prepare-data", str(out), str(src), "--name", name, "--split", "8,1,1",
                 "--max-document-bytes", "500"]) == 2
    assert "must be a plain file name" in capsys.readouterr().err
    assert not (tmp_path / "sub").exists() and not (tmp_path / "sub" / "x.bin").exists()


def test_truncated_bin_is_rejected_before_training(tmp_path, capsys):
    src = _book(tmp_path / "book.txt", paragraphs=60)
    data = tmp_path / "data"
    prepare_data(data, [src], max_document_bytes=1000, split=None)
    with open(data / "corpus.bin", "r+b") as f:
        f.truncate((data / "corpus.bin").stat().st_size - 100)
    with pytest.raises(DatasetError, match="corpus.bin holds .* bytes but corpus.idx describes .* tokens"):
        open_dataset(data / "corpus")
    work = tmp_path / "work"
    assert main(["train", "--tiny", "--workdir", str(work), "--data", str(data)]) == 2
    assert "the .bin is truncated" in capsys.readouterr().err
    assert not work.exists()


def test_damaged_index_and_json_are_rejected(tmp_path):
    src = _book(tmp_path / "book.txt", paragraphs=60)
    data = tmp_path / "data"
    prepare_data(data, [src], max_document_bytes=1000, split=None)
    idx, js = data / "corpus.idx", data / "corpus.json"
    raw, meta = idx.read_bytes(), js.read_text()
    info = open_dataset(data / "corpus")
    assert (info.num_documents, info.num_tokens) == (json.loads(meta)["documents"], json.loads(meta)["tokens"])
    for damaged, message in ((b"MMIDIDY" + raw[7:], "is not a Megatron indexed-dataset index"),
                             (raw[:20], "is not a Megatron indexed-dataset index"),
                             (raw[:-8], r"is cut short \(\d+ bytes for \d+ sequences\)")):
        idx.write_bytes(damaged)
        with pytest.raises(DatasetError, match=message):
            open_dataset(data / "corpus")
    idx.write_bytes(raw)
    js.write_text("{broken")
    with pytest.raises(DatasetError, match="corpus.json is not valid JSON"):
        open_dataset(data / "corpus")
    js.write_text(meta)
    assert open_dataset(data / "corpus") == info


def test_one_small_file_cannot_train(tmp_path, capsys):
    src = tmp_path / "one.txt"
    src.write_text("just one short document\n")
    work = tmp_path / "work"
    assert main(["train", "--tiny", "--workdir", str(work), "--data", str(src)]) == 2
    assert "1 document(s) leave the train part of the demo's train/validation split empty" in capsys.readouterr().err
    assert not work.exists()
