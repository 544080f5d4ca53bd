"""`regla-megatron eval`: validation loss and perplexity of a demo checkpoint, at any layout.

The model is rebuilt from the configuration stored with the checkpoint (`model_config.json`),
at the TP/CP/PP asked for, and evaluated with the training run's own function on the
validation part of the dataset (the demo's split, `demo_split`). With the training run's
data, `--eval-batches`, micro-batch size and sequence length (the defaults), it reads the
same batches and reproduces the validation loss the run printed.

Data: a dataset written by `prepare-data` (used in place), text files (prepared with the
checkpoint's tokenizer into a temporary folder that is deleted afterwards), or by default
the dataset the checkpoint was trained on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from regla_megatron.app.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from regla_megatron.app.checks import ConfigError, check_counts, check_layout, check_model, fit_layout
from regla_megatron.app.corpus import Corpus, share_corpus
from regla_megatron.app.data import MAX_DOCUMENT_BYTES, check_split, find_dataset, open_dataset, prepare_data
from regla_megatron.app.files import atomic_write_text, mark_owned
from regla_megatron.app.launch import available_gpus, check_gpus_per_node, init_model_parallel, launch, under_torchrun
from regla_megatron.app.tokenizer import BPE_FILE, BPETokenizer, load_tokenizer
from regla_megatron.app.training import build_datasets, build_model_and_optimizer, evaluate, tokens_per_step

RESULT = "eval.json"


@dataclasses.dataclass
class EvalConfig:
    """Settings of `regla-megatron eval` (flags map 1:1); None: the training run's value."""

    load: str
    data: Optional[list] = None
    tp: int = 1
    cp: int = 1
    pp: int = 1
    eval_batches: Optional[int] = None
    micro_batch_size: Optional[int] = None
    seq_length: Optional[int] = None
    max_bytes: Optional[int] = None
    max_document_bytes: int = MAX_DOCUMENT_BYTES


def eval_run_config(cfg: EvalConfig, record: dict):
    """The `DemoConfig` the evaluation runs with: the checkpoint's run, `cfg`'s layout and overrides."""
    from regla_megatron.app.demo import DemoConfig

    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    run = DemoConfig(**{k: v for k, v in record["run"].items() if k in fields})
    run.tp, run.cp, run.pp = cfg.tp, cfg.cp, cfg.pp
    for key in ("eval_batches", "micro_batch_size", "seq_length"):
        if getattr(cfg, key) is not None:
            setattr(run, key, getattr(cfg, key))
    run.load, run.save_at = None, None
    return run


def _dataset(cfg: EvalConfig, record: dict, folder: Path, scratch: Path) -> Path:
    """The dataset prefix to evaluate on (preparing text inputs into `scratch`)."""
    if not cfg.data:
        prefix = record.get("corpus")
        if not prefix:
            raise CheckpointError(f"--load {folder}: the checkpoint does not say which data it was trained "
                                  f"on; pass --data")
        return Path(prefix)
    given = find_dataset(cfg.data[0]) if len(cfg.data) == 1 else None
    if given is not None:
        return given
    kind = record["model"]["tokenizer"]["kind"]
    tokenizer = BPETokenizer.load(folder / BPE_FILE) if kind == "bpe" else "byte"
    return prepare_data(scratch, cfg.data, tokenizer, max_bytes=cfg.max_bytes, name="eval",
                        max_document_bytes=cfg.max_document_bytes, split=None).prefix


def run_eval(cfg: EvalConfig, explicit: frozenset = frozenset(("tp", "cp", "pp"))) -> Optional[dict]:
    """Evaluates `cfg.load`; returns rank 0's result (None on other torchrun ranks).

    Result: `val_loss` (mean per token), `val_ppl` (exp of it), `step`, `tokens` evaluated,
    `checkpoint`, `dataset`, `tokenizer`. `explicit`: the layout sizes given on the command
    line (the others may shrink to fit the machine, see `fit_layout`). Raises ValueError
    (ConfigError, CheckpointError, DatasetError) before any rank starts.
    """
    check_gpus_per_node()
    folder, record = read_checkpoint(cfg.load)
    run = eval_run_config(cfg, record)
    check_counts(run)
    check_model(run)
    world = int(os.environ["WORLD_SIZE"]) if under_torchrun() else None
    vocab = record["model"]["vocab_size"]
    run.tp, run.cp, run.pp, note = fit_layout(run, set(explicit), gpus=available_gpus(), world=world, vocab=vocab)
    rank = int(os.environ["RANK"]) if world is not None else 0
    if note and rank == 0:
        print(note, flush=True)
    check_layout(run, vocab)
    scratch = Path(tempfile.mkdtemp(prefix="regla-eval-"))
    mark_owned(scratch, "regla-megatron eval's temporary files")
    try:
        corpus = None
        if rank == 0:
            prefix = _dataset(cfg, record, folder, scratch).resolve()
            info = open_dataset(prefix)
            check_split(info.num_documents, None)
            theirs = record["model"]["tokenizer"]["identity"]
            mine = load_tokenizer(prefix).identity()
            if mine != theirs:
                raise ConfigError(f"--data {prefix}: tokenized with {mine!r}, but the checkpoint's model "
                                  f"reads {theirs!r} tokens; prepare the text with that tokenizer")
            corpus = Corpus(str(prefix), info.fingerprint, False, info.num_documents, info.num_tokens)
        launch(eval_worker, run.world_size, run, corpus, str(folder.resolve()), str(scratch / RESULT))
        if rank != 0:
            return None
        return json.loads((scratch / RESULT).read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # made above, by this call


def eval_worker(run, corpus: Optional[Corpus], folder: str, result_path: str) -> None:
    """One rank of `run_eval`: build the model, load `folder`, evaluate; rank 0 writes `result_path`."""
    init_model_parallel(run.tp, run.cp, run.pp, run.seed)
    corpus = share_corpus(os.getcwd(), corpus, probe_workdir=False)
    prefix = corpus.path(os.getcwd())
    tokenizer = load_tokenizer(prefix)
    _, valid = build_datasets(run, prefix, tokenizer)
    model, _ = build_model_and_optimizer(run, tokenizer, with_optimizer=False)
    step = load_checkpoint(folder, model)
    val_loss = evaluate(run, model, valid)
    if torch.distributed.get_rank() == 0:
        result = {"checkpoint": folder, "step": step, "dataset": str(prefix), "tokenizer": tokenizer.kind,
                  "val_loss": val_loss, "val_ppl": math.exp(val_loss),
                  "tokens": run.eval_batches * tokens_per_step(run),
                  "layout": {"tp": run.tp, "cp": run.cp, "pp": run.pp}}
        atomic_write_text(result_path, json.dumps(result, indent=1))
