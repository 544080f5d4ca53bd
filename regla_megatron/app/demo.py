"""`regla-megatron train`: train a small hybrid ReGLA GPT with Megatron-Core, end to end.

Read top to bottom: `DemoConfig` (every knob), `run_demo` (check everything, prepare the
data, launch ranks), `worker` (per rank: train, save, resume, evaluate, generate). The
model, training loop and generation are in `training`, checkpoints in `checkpoint`, the
data in `corpus`, the checks made before any rank starts in `checks`.

The demo writes only inside its workdir: `data/` (the prepared corpus), `checkpoint/`
(`step<N>` folders and `latest`) and `metrics.json`. It deletes only folders it made (they
carry a marker file, see `files`), and will not start when one of these paths holds
something else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import torch

from regla_megatron.app.checkpoint import (
    check_checkpoint_target,
    check_same_model,
    checkpoint_record,
    load_checkpoint,
    model_settings,
    read_checkpoint,
    save_checkpoint,
)
from regla_megatron.app.checks import ConfigError, check_demo_config, check_layout, check_resume
from regla_megatron.app.corpus import Corpus, check_corpus_target, prepare_corpus, share_corpus
from regla_megatron.app.data import MAX_DOCUMENT_BYTES
from regla_megatron.app.files import atomic_write_text
from regla_megatron.app.launch import available_gpus, check_gpus_per_node, init_model_parallel, launch, under_torchrun
from regla_megatron.app.tokenizer import BPE_FILE, load_tokenizer
from regla_megatron.app.training import (
    build_datasets,
    build_model_and_optimizer,
    count_params,
    evaluate,
    generate,
    tokens_per_step,
    train,
)

SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "pattern")
METRICS = "metrics.json"
METRICS_WRITER = "regla-megatron train"

PRESETS = {
    # ~0.9M parameters: the loss falls from 5.6 to about 2 in a few CPU minutes.
    "small": dict(num_layers=4, hidden_size=128, num_attention_heads=4, ffn_hidden_size=512,
                  pattern="R*R*", seq_length=256, micro_batch_size=8, steps=250, save_at=150,
                  lr=3e-3, warmup=20, eval_batches=4, gen_tokens=48, max_bytes=4_000_000),
    # CI-sized: seconds per step, enough to see the loss move and to test resuming.
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                 pattern="R*", seq_length=64, micro_batch_size=2, steps=6, save_at=3,
                 lr=1e-2, warmup=0, eval_batches=1, gen_tokens=8, max_bytes=300_000),
}


@dataclasses.dataclass
class DemoConfig:
    """All settings of the demo run (CLI flags of `regla-megatron train` map 1:1)."""

    workdir: str = "runs/demo"
    data: Optional[list] = None  # text files/folders; None = this Python's stdlib sources
    tokenizer: str = "byte"  # 'byte' | 'bpe' (needs the optional `tokenizers` package)
    bpe_vocab_size: int = 2048
    max_bytes: Optional[int] = None
    max_document_bytes: int = MAX_DOCUMENT_BYTES  # larger input files are cut into documents
    tp: int = 2
    cp: int = 2
    pp: int = 1
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    ffn_hidden_size: int = 512
    pattern: str = "R*R*"
    seq_length: int = 256
    micro_batch_size: int = 8
    num_microbatches: int = 1
    steps: int = 250
    save_at: Optional[int] = 150  # save here, then restart from the checkpoint; None: no restart
    load: Optional[str] = None  # start from this checkpoint (any TP/CP/PP layout)
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 20
    log_every: int = 10
    eval_batches: int = 4
    gen_tokens: int = 48
    prompt: str = "def __init__(self"
    seed: int = 1234

    @classmethod
    def preset(cls, name: str, **overrides) -> "DemoConfig":
        """The preset `name` of `PRESETS` ('small' or 'tiny') with `overrides` applied."""
        return cls(**{**PRESETS[name], **overrides})

    @property
    def world_size(self) -> int:
        """Processes of the run: TP x CP x PP (data parallel size 1)."""
        return self.tp * self.cp * self.pp


def planned_saves(cfg, start: int = 0) -> list[int]:
    """The steps at which the run saves: `save_at` (then restarts) and `steps`, after `start`."""
    return sorted({s for s in (cfg.save_at, cfg.steps) if s is not None and start < s <= cfg.steps})


def check_workdir(cfg, start: int = 0) -> None:
    """Raises before any work when an output path holds something the demo did not write."""
    work = Path(cfg.workdir)
    if work.exists() and not work.is_dir():
        raise ConfigError(f"--workdir {work} is a file: name a folder")
    check_corpus_target(cfg)
    root = work / "checkpoint"
    check_checkpoint_target(root)
    for step in planned_saves(cfg, start):
        check_checkpoint_target(root / f"step{step}")
    metrics = work / METRICS
    if metrics.exists():
        try:
            ours = json.loads(metrics.read_text()).get("written_by") == METRICS_WRITER
        except (ValueError, AttributeError):
            ours = False
        if not ours:
            raise ConfigError(f"{metrics} exists and was not written by regla-megatron train: it is left "
                              f"alone; pass another --workdir")


def check_load(cfg) -> int:
    """The step of `cfg.load` (0 without it), after checking that the checkpoint holds this
    run's model (sizes and pattern; the vocab once the data is prepared) and fits its steps."""
    if not cfg.load:
        return 0
    folder, record = read_checkpoint(cfg.load)
    shapes = {key: getattr(cfg, key) for key in SHAPE_FIELDS}
    check_same_model(folder, record["model"], shapes)
    check_resume(cfg, record["step"])
    return int(record["step"])


def run_demo(cfg: DemoConfig) -> Optional[dict]:
    """Checks `cfg`, prepares the corpus, trains on `cfg.world_size` ranks; returns rank 0's metrics.

    The metrics (also in `<workdir>/metrics.json`): `losses` {step: loss}, `val_loss`,
    `val_ppl`, `generated`, `tokens_per_s`, `seconds`. Bad settings raise ValueError
    (ConfigError, CheckpointError, DatasetError, OwnershipError) before any rank starts.
    Under an outer torchrun every rank calls this; rank 0 prepares the data, the others get
    it from rank 0 once the process group is up, and return None.
    """
    check_gpus_per_node()
    world = int(os.environ["WORLD_SIZE"]) if under_torchrun() else None
    check_demo_config(cfg, gpus=available_gpus(), world=world)
    start = check_load(cfg)
    check_workdir(cfg, start)
    rank = int(os.environ["RANK"]) if world is not None else 0
    corpus = None
    if rank == 0:
        corpus = prepare_corpus(cfg, say=lambda msg: print(msg, flush=True))
        tokenizer = load_tokenizer(corpus.path(cfg.workdir))
        check_layout(cfg, tokenizer.vocab_size)
        if cfg.load:
            folder, record = read_checkpoint(cfg.load)
            check_same_model(folder, record["model"], model_settings(cfg, tokenizer))
    launch(worker, cfg.world_size, cfg, corpus)
    if rank != 0:
        return None
    return json.loads((Path(cfg.workdir) / METRICS).read_text())


def worker(cfg: DemoConfig, corpus: Optional[Corpus]) -> None:
    """One rank: train (with a save/restart in the middle), evaluate, generate.

    `corpus` is rank 0's (`prepare_corpus`); other ranks may pass None and get it from rank 0.
    """
    from megatron.core import parallel_state as ps

    init_model_parallel(cfg.tp, cfg.cp, cfg.pp, cfg.seed)
    say = _printer()
    corpus = share_corpus(cfg.workdir, corpus)
    prefix = corpus.path(cfg.workdir)
    tokenizer = load_tokenizer(prefix)
    train_ds, valid_ds = build_datasets(cfg, prefix, tokenizer)
    say(f"world {cfg.world_size} = TP {cfg.tp} x CP {cfg.cp} x PP {cfg.pp} x DP "
        f"{ps.get_data_parallel_world_size()} on {'cuda' if torch.cuda.is_available() else 'cpu'} "
        f"({torch.distributed.get_backend()}); {len(train_ds):,} train / {len(valid_ds):,} valid "
        f"sequences of {cfg.seq_length} tokens")

    ckpt = Path(cfg.workdir) / "checkpoint"
    extra = (prefix.parent / BPE_FILE,) if tokenizer.kind == "bpe" else ()
    losses, start, seconds, tokens = {}, 0, 0.0, 0
    model, optimizer = build_model_and_optimizer(cfg, tokenizer)
    say(f"model: pattern {cfg.pattern}, {count_params(model):,} parameters on this rank")
    if cfg.load:
        folder, _ = read_checkpoint(cfg.load)
        start = load_checkpoint(folder, model, optimizer)
        say(f"loaded {folder} at step {start}")
    for stop in planned_saves(cfg, start):
        t0 = time.time()
        losses.update(train(cfg, model, optimizer, train_ds, start, stop, say))
        seconds += time.time() - t0
        tokens += (stop - start) * tokens_per_step(cfg)
        path = ckpt / f"step{stop}"
        save_checkpoint(path, model, optimizer, stop, checkpoint_record(cfg, tokenizer, stop, str(prefix.resolve())), extra)
        say(f"saved checkpoint {path}")
        if stop < cfg.steps:  # restart from the checkpoint, as a new job would
            del model, optimizer
            model, optimizer = build_model_and_optimizer(cfg, tokenizer)
            start = load_checkpoint(path, model, optimizer)
            say(f"resumed from {path} with a freshly built model and optimizer")
        start = stop

    val_loss = evaluate(cfg, model, valid_ds)
    say(f"validation: loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f} (per "
        f"{tokenizer.kind} token)")
    prompt_ids = tokenizer.tokenize(cfg.prompt)
    new_ids = generate(cfg, model, prompt_ids, cfg.gen_tokens, tokenizer.eod)
    text = tokenizer.detokenize(new_ids)
    say(f"greedy: {cfg.prompt!r} -> {text!r}")
    metrics = dict(written_by=METRICS_WRITER, workdir=cfg.workdir,
                   losses={str(k): v for k, v in losses.items()}, val_loss=val_loss,
                   val_ppl=math.exp(val_loss), generated=text, generated_ids=new_ids,
                   tokens_per_s=tokens / max(seconds, 1e-9), seconds=seconds)
    if torch.distributed.get_rank() == 0:
        atomic_write_text(Path(cfg.workdir) / METRICS, json.dumps(metrics, indent=1))


def _printer():
    rank = torch.distributed.get_rank()

    def say(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    return say


__all__ = ["PRESETS", "DemoConfig", "check_load", "check_workdir", "planned_saves",
           "run_demo", "worker"]
