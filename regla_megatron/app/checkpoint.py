"""Checkpoints of the demo: `dist_checkpointing` folders that appear whole, with their model.

Layout under a checkpoint root (`WORKDIR/checkpoint`, an owned folder, see `files`):
- `step<N>/`: model + optimizer from `dist_checkpointing` (loadable at any TP/CP/PP), plus
  `model_config.json` (`checkpoint_record`: the model's sizes, pattern, vocab, sequence
  length, tokenizer, the step and the run's settings), written last;
- `latest`: the name of the newest complete checkpoint.
A save fills a hidden sibling folder and renames it into place once every rank has written
and `model_config.json` is in, so an interrupted save leaves the previous checkpoints as
they were. Parameters are checked to be finite before a save and after a load.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from pathlib import Path
from typing import Optional

import torch

from regla_megatron.app.files import atomic_write_text, claim_dir, is_owned, mark_owned, publish_dir
from regla_megatron.app.training import NonFiniteError, padded_vocab

CONFIG_FILE = "model_config.json"
LATEST_FILE = "latest"
# Model settings that fix the parameter shapes (and so must match to load), with their flags.
MODEL_FLAGS = {"num_layers": "--num-layers", "hidden_size": "--hidden-size",
               "num_attention_heads": "--num-attention-heads", "ffn_hidden_size": "--ffn-hidden-size",
               "pattern": "--pattern", "padded_vocab_size": "the data's tokenizer"}


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, or made for another model."""


def model_settings(cfg, tokenizer) -> dict:
    """The model configuration stored with a checkpoint (JSON-ready: ints and strings)."""
    return {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
            "num_attention_heads": cfg.num_attention_heads, "ffn_hidden_size": cfg.ffn_hidden_size,
            "pattern": cfg.pattern, "vocab_size": tokenizer.vocab_size,
            "padded_vocab_size": padded_vocab(tokenizer.vocab_size, 1), "seq_length": cfg.seq_length,
            "tokenizer": {"kind": tokenizer.kind, "identity": tokenizer.identity(), "eod": tokenizer.eod}}


def checkpoint_record(cfg, tokenizer, step: int, corpus: Optional[str] = None) -> dict:
    """`model_config.json`: {"model": model_settings, "step", "run": the DemoConfig, "corpus"}."""
    return {"model": model_settings(cfg, tokenizer), "step": step, "run": dataclasses.asdict(cfg),
            "corpus": corpus}


def resolve_checkpoint(path: str | Path) -> Path:
    """The complete checkpoint folder that `path` names: a `step<N>` folder, or a root with `latest`.

    Raises FileNotFoundError for a missing path, CheckpointError for a folder that is not a
    complete checkpoint written here (naming what is missing).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--load {path}: no such checkpoint folder")
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / LATEST_FILE).is_file():
        name = (path / LATEST_FILE).read_text().strip()
        target = path / name
        if not (target / CONFIG_FILE).is_file():
            raise CheckpointError(f"--load {path}: its {LATEST_FILE} file names {name}, which is missing "
                                  f"or incomplete; pass one of its step folders instead")
        return target
    if (path / "metadata.json").is_file():
        raise CheckpointError(f"--load {path}: a dist_checkpointing folder without {CONFIG_FILE}: not "
                              f"written by regla-megatron train, or its save did not finish")
    raise CheckpointError(f"--load {path}: not a checkpoint (no {CONFIG_FILE}, no {LATEST_FILE} file)")


def read_checkpoint(path: str | Path) -> tuple[Path, dict]:
    """(checkpoint folder, its `model_config.json` record) of `resolve_checkpoint(path)`."""
    folder = resolve_checkpoint(path)
    try:
        record = json.loads((folder / CONFIG_FILE).read_text())
        record["model"], record["step"]  # noqa: B018 (both keys must be there)
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"--load {folder}: unreadable {CONFIG_FILE} ({err})") from None
    return folder, record


def model_differences(saved: dict, wanted: dict) -> list[str]:
    """'what: checkpoint value vs this run's (flag)' for each shape-setting field of `wanted`
    (a `model_settings` dict, or part of one) that differs from `saved`."""
    out = []
    for key, flag in MODEL_FLAGS.items():
        if key in wanted and saved.get(key) != wanted[key]:
            out.append(f"{key} {saved.get(key)!r} in the checkpoint vs {wanted[key]!r} here ({flag})")
    if "tokenizer" in wanted:
        mine, theirs = wanted["tokenizer"].get("identity"), (saved.get("tokenizer") or {}).get("identity")
        if mine != theirs:
            out.append(f"tokenizer {theirs!r} in the checkpoint vs {mine!r} here (--tokenizer / --data)")
    return out


def check_same_model(folder: Path, saved: dict, wanted: dict) -> None:
    """Raises CheckpointError listing the differences when `saved` and `wanted` models differ.

    The sequence length may differ (RoPE has no learned positions); nothing else that sets a
    parameter shape may.
    """
    diff = model_differences(saved, wanted)
    if diff:
        flags = " ".join(f"{flag} {saved[key]}" for key, flag in MODEL_FLAGS.items()
                         if flag.startswith("--") and key in wanted and saved.get(key) != wanted[key])
        raise CheckpointError(f"--load {folder} holds another model: {'; '.join(diff)}"
                              + (f". Pass {flags} to match it" if flags else ""))


def sharded_state(model, optimizer, step: int, is_loading: bool) -> dict:
    """The sharded state dict `dist_checkpointing` saves/loads: model, optimizer (if any), step."""
    model_sd = model.module.sharded_state_dict()
    state = {"model": model_sd, "step": step}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
    return state


def nonfinite_parameters(model) -> list[str]:
    """Names of the parameters holding NaN or inf on any rank (gathered: every rank gets the list)."""
    local = [name for name, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    return sorted({name for names in gathered for name in names})


def _broadcast(obj):
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def save_checkpoint(path: str | Path, model, optimizer, step: int, record: dict,
                    extra_files: tuple = ()) -> None:
    """Saves model + optimizer at `path` (`<root>/step<N>`) on every rank, atomically.

    Args:
        path: the checkpoint's final folder; its parent (the root) is created as an owned
            folder. An earlier checkpoint of the same name is replaced only once the new one
            is complete (and only if regla-megatron made it).
        record: `checkpoint_record(...)` for `model_config.json`.
        extra_files: files copied into the checkpoint (e.g. a BPE `tokenizer.json`).
    Raises NonFiniteError (nothing written) when a parameter is NaN/inf.
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    bad = nonfinite_parameters(model)
    if bad:
        raise NonFiniteError(f"step {step}: parameters {', '.join(bad[:3])} are not finite; not saving "
                             f"the checkpoint {path}")
    tmp = None
    if torch.distributed.get_rank() == 0:
        claim_dir(path.parent, "checkpoints of regla-megatron train")
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
    tmp = Path(_broadcast(None if tmp is None else str(tmp)))
    try:
        dist_checkpointing.save(sharded_state(model, optimizer, step, False), str(tmp))
        torch.distributed.barrier()
        if torch.distributed.get_rank() == 0:
            mark_owned(tmp, f"checkpoint at step {step}")
            for f in extra_files:
                shutil.copy2(f, tmp / Path(f).name)
            (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=1) + "\n")
            publish_dir(tmp, path)
            atomic_write_text(path.parent / LATEST_FILE, path.name + "\n")
    except BaseException:
        if torch.distributed.get_rank() == 0 and tmp.exists():
            shutil.rmtree(tmp)  # made above, in this call
        raise
    torch.distributed.barrier()


def load_checkpoint(path: str | Path, model, optimizer=None) -> int:
    """Loads a `save_checkpoint` folder into `model` (and `optimizer` if given); returns its step.

    Raises NonFiniteError naming the checkpoint when a loaded parameter is NaN/inf.
    """
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(sharded_state(model, optimizer, 0, True), str(path))
    model.module.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    bad = nonfinite_parameters(model)
    if bad:
        raise NonFiniteError(f"checkpoint {path}: parameters {', '.join(bad[:3])} are not finite after "
                             f"loading; use an earlier checkpoint")
    return int(state["step"])


def check_checkpoint_target(path: str | Path) -> None:
    """Raises CheckpointError when `path` exists but regla-megatron did not make it (a save
    would not replace it): checked before a run starts."""
    path = Path(path)
    if path.exists() and not is_owned(path):
        raise CheckpointError(f"{path} exists and was not made by regla-megatron: a save there would not "
                              f"replace it; pass another --workdir")


__all__ = ["CONFIG_FILE", "LATEST_FILE", "CheckpointError", "check_checkpoint_target", "check_same_model",
           "checkpoint_record", "load_checkpoint", "model_differences", "model_settings",
           "nonfinite_parameters", "read_checkpoint", "resolve_checkpoint", "save_checkpoint",
           "sharded_state"]
