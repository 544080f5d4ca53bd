"""Checkpoints appear whole, carry their model, and never hold (or hand out) NaN.

One rank in the test process (`single_rank`): `worker` trains the tiny model for 2 steps
at TP = CP = PP = 1, saving at steps 1 and 2.
"""

import json
import shutil

import pytest
import torch

from regla_megatron.app.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    sharded_state,
)
from regla_megatron.app.cli import main
from regla_megatron.app.demo import check_load, worker
from regla_megatron.app.files import MARKER
from regla_megatron.app.tokenizer import ByteTokenizer
from regla_megatron.app.training import NonFiniteError, build_model_and_optimizer
from tests.app.helpers import one_rank_config, prepared


def _trained(tmp_path, **overrides):
    cfg = one_rank_config(tmp_path / "work", **overrides)
    worker(cfg, prepared(cfg))
    return cfg, tmp_path / "work" / "checkpoint"


def _listing(folder):
    return sorted((p.name, p.read_bytes()) for p in folder.iterdir())


def test_checkpoints_carry_their_model_and_a_latest_marker(single_rank, tmp_path):
    cfg, root = _trained(tmp_path)
    assert (root / "latest").read_text() == "step2\n"
    assert resolve_checkpoint(root) == root / "step2"
    record = json.loads((root / "step2" / CONFIG_FILE).read_text())
    assert record["step"] == 2
    assert record["model"] == {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 128,
                               "pattern": "R*", "vocab_size": 257, "padded_vocab_size": 320, "seq_length": 64,
                               "tokenizer": {"kind": "byte", "identity": "byte", "eod": 256}}
    assert record["run"]["micro_batch_size"] == cfg.micro_batch_size
    assert (root / "step1" / MARKER).is_file() and (root / MARKER).is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".") and p.name != MARKER]


def test_an_interrupted_save_keeps_the_previous_checkpoint(single_rank, tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    cfg, root = _trained(tmp_path)
    before = _listing(root / "step2")
    model, optimizer = build_model_and_optimizer(cfg, ByteTokenizer())

    def dies_halfway(state, path, **kwargs):
        (torch.distributed.get_rank() == 0) and open(f"{path}/__0_0.distcp", "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(dist_checkpointing, "save", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(root / "step2", model, optimizer, 2, {"model": {}, "step": 2})
    assert _listing(root / "step2") == before
    assert (root / "latest").read_text() == "step2\n"
    assert sorted(p.name for p in root.iterdir()) == [MARKER, "latest", "step1", "step2"]


def test_a_nonfinite_loss_stops_the_run_before_any_save(single_rank, tmp_path):
    with pytest.raises(NonFiniteError, match=r"step 2: the (loss|gradient norm) is nan; stopping here"):
        _trained(tmp_path, lr=1e30, steps=3, save_at=2)
    assert not (tmp_path / "work" / "checkpoint").exists()


def test_nonfinite_parameters_are_neither_saved_nor_loaded(single_rank, tmp_path):
    from megatron.core import dist_checkpointing

    cfg, root = _trained(tmp_path)
    model, optimizer = build_model_and_optimizer(cfg, ByteTokenizer())
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"step 7: parameters .* are not finite; not saving"):
        save_checkpoint(root / "step7", model, optimizer, 7, {"model": {}, "step": 7})
    assert not (root / "step7").exists()

    bad = tmp_path / "bad"
    bad.mkdir()
    dist_checkpointing.save(sharded_state(model, None, 7, False), str(bad))
    shutil.copy(root / "step2" / CONFIG_FILE, bad / CONFIG_FILE)
    fresh, _ = build_model_and_optimizer(cfg, ByteTokenizer(), with_optimizer=False)
    with pytest.raises(NonFiniteError, match=f"checkpoint {bad}: parameters .* are not finite after loading"):
        load_checkpoint(resolve_checkpoint(bad), fresh)


def test_loading_another_model_says_what_differs(single_rank, tmp_path, capsys):
    cfg, root = _trained(tmp_path)
    other = one_rank_config(tmp_path / "other", load=str(root), steps=4, save_at=None, num_layers=4,
                            pattern="R*R*", hidden_size=128)
    with pytest.raises(CheckpointError) as err:
        check_load(other)
    message = str(err.value)
    assert f"--load {root / 'step2'} holds another model" in message
    assert "num_layers 2 in the checkpoint vs 4 here (--num-layers)" in message
    assert "pattern 'R*' in the checkpoint vs 'R*R*' here (--pattern)" in message
    assert "Pass --num-layers 2 --hidden-size 64 --pattern R* to match it" in message
    work = tmp_path / "cli"
    assert main(["train", "--tiny", "--workdir", str(work), "--load", str(root), "--pattern", "R*R*"]) == 2
    assert "holds another model: num_layers 2 in the checkpoint vs 4 here" in capsys.readouterr().err
    assert not work.exists()
    assert check_load(one_rank_config(tmp_path / "same", load=str(root), steps=4, save_at=None)) == 2
    with pytest.raises(ValueError, match="--steps 1 ends before the checkpoint's step 2"):
        check_load(one_rank_config(tmp_path / "same", load=str(root), steps=1, save_at=None))


def test_what_load_accepts(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        resolve_checkpoint(tmp_path / "absent")
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / "metadata.json").write_text("{}")
    with pytest.raises(CheckpointError, match="without model_config.json: not written by regla-megatron train"):
        resolve_checkpoint(tmp_path / "dist")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "latest").write_text("step9\n")
    with pytest.raises(CheckpointError, match="names step9, which is missing or incomplete"):
        resolve_checkpoint(tmp_path / "root")
