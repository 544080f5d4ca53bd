"""The demo never deletes what it did not make, and trains on the data it was given.

All in the launching process (`prepare_corpus`, `check_workdir`, `main` failing early):
no ranks are spawned.
"""

import json
import os

import pytest

from regla_megatron.app.cli import main
from regla_megatron.app.corpus import prepare_corpus
from regla_megatron.app.files import MARKER, OwnershipError, claim_dir, new_temp_dir, publish_dir, remove_owned
from tests.app.helpers import one_rank_config


def _texts(folder, name, n=12):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{name}{i}.txt").write_text(f"{name} document {i}\n" + "text " * 200)
    return folder


def test_user_files_in_workdir_data_are_kept(tmp_path, capsys):
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "notes.txt").write_text("mine")
    assert main(["train", "--tiny", "--workdir", str(work)]) == 2
    assert "data is a folder not made by regla-megatron" in capsys.readouterr().err
    assert (work / "data" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in work.iterdir()) == ["data"]


def test_user_checkpoint_and_metrics_are_kept(tmp_path, capsys):
    work = tmp_path / "work"
    (work / "checkpoint" / "step6").mkdir(parents=True)
    assert main(["train", "--tiny", "--workdir", str(work)]) == 2
    assert "checkpoint exists and was not made by regla-megatron" in capsys.readouterr().err
    (work / "checkpoint").rename(tmp_path / "elsewhere")
    (work / "metrics.json").write_text('{"mine": 1}')
    assert main(["train", "--tiny", "--workdir", str(work)]) == 2
    assert "metrics.json exists and was not written by regla-megatron train" in capsys.readouterr().err
    assert (work / "metrics.json").read_text() == '{"mine": 1}'


def test_new_data_is_prepared_again(tmp_path):
    a, b = _texts(tmp_path / "a", "alpha"), _texts(tmp_path / "b", "beta")
    work = tmp_path / "work"
    said = []
    first = prepare_corpus(one_rank_config(work, data=[str(a)], max_bytes=None), said.append)
    again = prepare_corpus(one_rank_config(work, data=[str(a)], max_bytes=None), said.append)
    assert again == first and "using the corpus prepared earlier" in said[-1]
    second = prepare_corpus(one_rank_config(work, data=[str(b)], max_bytes=None), said.append)
    assert "other input files" in " ".join(said)
    assert second.fingerprint != first.fingerprint
    sources = json.loads((work / "data" / "corpus.json").read_text())["sources"]
    assert all("/b/beta" in s for s in sources), sources
    # The same path with new content: prepared again too.
    (b / "beta0.txt").write_text("changed\n" * 300)
    os.utime(b / "beta0.txt", ns=(1, 1))
    third = prepare_corpus(one_rank_config(work, data=[str(b)], max_bytes=None), said.append)
    assert "input files changed on disk" in said[-2] and third.fingerprint != second.fingerprint
    assert third == prepare_corpus(one_rank_config(work, data=[str(b)], max_bytes=None), said.append)
    # Other settings count as well.
    prepare_corpus(one_rank_config(work, data=[str(b)], max_bytes=None, max_document_bytes=500), said.append)
    assert "max_document_bytes" in said[-2]
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_a_prepared_dataset_is_used_in_place(tmp_path):
    src = _texts(tmp_path / "src", "gamma")
    out = tmp_path / "ds"
    assert main(["prepare-data", str(out), str(src), "--split", "10,1,1"]) == 0
    work = tmp_path / "work"
    corpus = prepare_corpus(one_rank_config(work, data=[str(out)]), lambda msg: None)
    assert corpus.path(work) == (out / "corpus").resolve() and not corpus.in_workdir
    assert not (work / "data").exists()


def test_owned_folders():
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp())
    mine = claim_dir(root / "mine", "test")
    assert (mine / MARKER).is_file()
    (root / "theirs").mkdir()
    with pytest.raises(OwnershipError, match="not made by regla-megatron"):
        claim_dir(root / "theirs", "test")
    with pytest.raises(OwnershipError, match="not deleting"):
        remove_owned(root / "theirs")
    tmp = new_temp_dir(root, "mine", "test")
    (tmp / "new.txt").write_text("new")
    publish_dir(tmp, mine)
    assert (mine / "new.txt").read_text() == "new" and not tmp.exists()
    tmp = new_temp_dir(root, "theirs", "test")
    with pytest.raises(OwnershipError, match="not replacing it"):
        publish_dir(tmp, root / "theirs")
    remove_owned(tmp)
    assert sorted(p.name for p in root.iterdir()) == ["mine", "theirs"]
    remove_owned(mine)
