"""Checks of a demo configuration, made in the launching process before any rank starts.

Each problem is one `ConfigError` line that names the flag (the `DemoConfig` field of the
same name) and a value that works, instead of an exception inside a spawned rank:
- counts: `--steps`, `--tp`, `--seq-length`, ... must be positive (`--warmup` may be 0);
  `--save-at` must fall inside the run;
- the model: the pattern, heads that split `--hidden-size` into head dims the kernels take;
- the layout (`layout_problem`): heads, `--ffn-hidden-size` and the padded vocabulary split
  over TP; the sequence over 2 x CP chunks and, with TP > 1 (sequence parallel), each CP
  rank's part over TP; the layers over PP stages;
- the machine (`fit_layout`): one GPU per rank on a GPU machine.
"""

from __future__ import annotations

import math
from typing import Optional

from regla_megatron.app.training import padded_vocab

MAX_PARALLEL = 64  # the largest TP/CP/PP size proposed in messages

POSITIVE = {"steps": "--steps", "tp": "--tp", "cp": "--cp", "pp": "--pp", "num_layers": "--num-layers",
            "hidden_size": "--hidden-size", "num_attention_heads": "--num-attention-heads",
            "ffn_hidden_size": "--ffn-hidden-size", "seq_length": "--seq-length",
            "micro_batch_size": "--micro-batch-size", "num_microbatches": "num_microbatches",
            "log_every": "--log-every", "eval_batches": "--eval-batches", "bpe_vocab_size": "--vocab-size",
            "max_bytes": "--max-bytes", "max_document_bytes": "--max-document-bytes", "lr": "--lr"}
NON_NEGATIVE = {"warmup": "--warmup", "gen_tokens": "--gen-tokens", "min_lr": "min_lr"}


class ConfigError(ValueError):
    """A setting that cannot work, with the flag to change and a value that works."""


def _join(values: list) -> str:
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " or " + values[-1]


def check_counts(cfg) -> None:
    """Positive counts, non-negative ones, and `save_at` inside `1 .. steps - 1`."""
    for field, flag in POSITIVE.items():
        value = getattr(cfg, field)
        if value is not None and not value > 0:
            raise ConfigError(f"{flag} must be positive, got {value}")
    for field, flag in NON_NEGATIVE.items():
        if getattr(cfg, field) < 0:
            raise ConfigError(f"{flag} must be 0 or more, got {getattr(cfg, field)}")
    if cfg.save_at is not None and not 0 < cfg.save_at < cfg.steps:
        raise ConfigError(f"--save-at {cfg.save_at} is outside the run of --steps {cfg.steps}: give a step "
                          f"from 1 to {cfg.steps - 1} (such as --save-at {max(1, cfg.steps // 2)}), "
                          f"or --no-restart")
    if not cfg.prompt:
        raise ConfigError("--prompt must not be empty (generation continues it), e.g. --prompt 'def '")


def check_resume(cfg, start: int) -> None:
    """A run resumed at step `start` (from `--load`) must end at or after it and save after it."""
    if cfg.steps < start:
        raise ConfigError(f"--steps {cfg.steps} ends before the checkpoint's step {start}: use --steps "
                          f"{start} (evaluate only) or more")
    if cfg.save_at is not None and cfg.save_at <= start:
        raise ConfigError(f"--save-at {cfg.save_at} is not after the checkpoint's step {start}: give a "
                          f"step from {start + 1} to {cfg.steps - 1}, or --no-restart")


def check_model(cfg) -> None:
    """The layer pattern, and head dims (hidden / heads) that the ReGLA kernels accept."""
    from regla_megatron.config import HEAD_DIM_K_MULTIPLE, MAX_HEAD_DIM
    from regla_megatron.megatron_lm.arguments import validate_regla_pattern

    validate_regla_pattern(cfg.pattern, cfg.num_layers)
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    ok_heads = [h for h in range(1, hidden + 1) if hidden % h == 0
                and (hidden // h) % HEAD_DIM_K_MULTIPLE == 0 and hidden // h <= MAX_HEAD_DIM]
    if hidden % heads or (hidden // heads) % HEAD_DIM_K_MULTIPLE or hidden // heads > MAX_HEAD_DIM:
        fix = (f"use --num-attention-heads {_join(ok_heads[:4])}" if ok_heads else
               f"use --hidden-size {max(heads, 1) * 64}")
        raise ConfigError(f"--num-attention-heads {heads}: --hidden-size {hidden} must split into heads of "
                          f"a multiple of {HEAD_DIM_K_MULTIPLE} up to {MAX_HEAD_DIM} dims; {fix}")


def seq_multiple(tp: int, cp: int) -> int:
    """What the sequence length must be a multiple of: 2 x CP chunks (CP > 1), and with
    TP > 1 (sequence parallel) each CP rank's tokens split over TP."""
    chunks = 2 * cp if cp > 1 else 1
    return math.lcm(chunks, cp * tp if tp > 1 else 1)


def _tp_reason(cfg, tp: int, vocab: int) -> Optional[str]:
    if cfg.num_attention_heads % tp:
        return f"the {cfg.num_attention_heads} attention heads do not split over {tp} tensor-parallel ranks"
    if cfg.ffn_hidden_size % tp:
        return f"--ffn-hidden-size {cfg.ffn_hidden_size} does not split over {tp} tensor-parallel ranks"
    if padded_vocab_rows(vocab) % tp:
        return (f"the embedding's {padded_vocab_rows(vocab)} rows (vocab {vocab} padded to a multiple of 64) "
                f"do not split over {tp} tensor-parallel ranks")
    return None


def padded_vocab_rows(vocab: int) -> int:
    """Rows of the embedding for a `vocab`-entry tokenizer (`padded_vocab`, TP-independent)."""
    return padded_vocab(vocab, 1)


def stage_patterns(pattern: str, pp: int) -> list[str]:
    """The layer pattern of each pipeline stage ('R*R*', 2 -> ['R*', 'R*'])."""
    per = len(pattern) // pp
    return [pattern[i * per:(i + 1) * per] for i in range(pp)]


def layout_problem(cfg, tp: int, cp: int, pp: int, vocab: int) -> Optional[str]:
    """The first reason TP x CP x PP cannot hold the model of `cfg`, as a one-line message; None if it can."""
    for flag, value in (("--tp", tp), ("--cp", cp), ("--pp", pp)):
        if value < 1:
            return f"{flag} must be positive, got {value}"
    seq = cfg.seq_length
    reason = _tp_reason(cfg, tp, vocab)
    if reason:
        base_cp = cp if seq % seq_multiple(1, cp) == 0 else 1  # judge TP at a CP size that works
        ok = [t for t in range(1, MAX_PARALLEL + 1) if not _tp_reason(cfg, t, vocab)
              and seq % seq_multiple(t, base_cp) == 0]
        return f"--tp {tp}: {reason}; use --tp {_join(ok[:4])}"
    if cp > 1 and seq % (2 * cp):
        ok = [c for c in range(1, MAX_PARALLEL + 1) if seq % seq_multiple(tp, c) == 0]
        fix = -(-seq // seq_multiple(tp, cp)) * seq_multiple(tp, cp)
        return (f"--cp {cp}: --seq-length {seq} must be a multiple of 2 x CP = {2 * cp} (each CP rank holds "
                f"two chunks); use --cp {_join(ok[:4])}, or --seq-length {fix}")
    if seq % seq_multiple(tp, cp):
        fix = -(-seq // seq_multiple(tp, cp)) * seq_multiple(tp, cp)
        return (f"--seq-length {seq}: each of the {cp} CP rank(s) holds {seq / cp:g} tokens, which sequence "
                f"parallelism splits over --tp {tp}; use --seq-length {fix}")
    if cfg.num_layers % pp:
        ok = [p for p in range(1, cfg.num_layers + 1) if cfg.num_layers % p == 0]
        example = ok[-2] if len(ok) > 1 else ok[0]
        stages = " | ".join(stage_patterns(cfg.pattern, example))
        return (f"--pp {pp}: the {cfg.num_layers} layers ({cfg.pattern}) do not split into {pp} pipeline "
                f"stages of equal size; use --pp {_join(ok[:4])} (--pp {example}: stages {stages})")
    return None


def check_layout(cfg, vocab: int) -> None:
    """Raises ConfigError with `layout_problem`'s message for the layout of `cfg`."""
    problem = layout_problem(cfg, cfg.tp, cfg.cp, cfg.pp, vocab)
    if problem:
        raise ConfigError(problem)


def expected_vocab(cfg) -> int:
    """The vocab the data will have: 257 for bytes, `bpe_vocab_size` for BPE (at most)."""
    return 257 if cfg.tokenizer == "byte" else cfg.bpe_vocab_size


def check_demo_config(cfg, vocab: Optional[int] = None, gpus: Optional[int] = None,
                      world: Optional[int] = None) -> None:
    """Every check of this module for `cfg`; `vocab` defaults to `expected_vocab(cfg)`.

    `gpus`: the machine's GPU count (None: CPU, no limit); `world`: the process count of an
    outer torchrun (None: the demo spawns its own). Raises ConfigError.
    """
    from regla_megatron.app.tokenizer import bpe_available

    if cfg.tokenizer not in ("byte", "bpe"):
        raise ConfigError(f"--tokenizer {cfg.tokenizer!r}: use byte or bpe")
    if cfg.tokenizer == "bpe" and not bpe_available():
        raise ConfigError("--tokenizer bpe needs the optional 'tokenizers' package: pip install "
                          "'regla-megatron[bpe]' (or use --tokenizer byte)")
    check_counts(cfg)
    check_model(cfg)
    check_layout(cfg, vocab or expected_vocab(cfg))
    fit_layout(cfg, explicit={"tp", "cp", "pp"}, gpus=gpus, world=world, vocab=vocab or expected_vocab(cfg))


def _describe(tp: int, cp: int, pp: int) -> str:
    return f"TP {tp} x CP {cp} x PP {pp}"


def fit_layout(cfg, explicit: set, gpus: Optional[int], world: Optional[int] = None,
               vocab: Optional[int] = None) -> tuple[int, int, int, Optional[str]]:
    """The layout to run: `cfg`'s, or a smaller one where the machine cannot hold it.

    Each rank takes one GPU. Under an outer torchrun (`world` processes) TP x CP x PP must
    equal `world`; on a GPU machine otherwise it must be at most `gpus`; on CPU (`gpus`
    None) any layout runs. When `cfg`'s layout does not fit, the sizes not in `explicit`
    (given on the command line) change: the largest layout that fits wins, keeping TP, then
    CP, then PP where it can. Returns (tp, cp, pp, a line saying what changed or None).
    Raises ConfigError, saying what to pass, when nothing fits.
    """
    vocab = vocab or expected_vocab(cfg)
    want = (cfg.tp, cfg.cp, cfg.pp)
    size = math.prod(want)
    fits = (lambda n: n == world) if world is not None else (lambda n: gpus is None or n <= gpus)
    if fits(size):
        return (*want, None)
    limit = world or gpus or 1

    def candidates(free: set) -> list[tuple]:
        ranges = [range(1, limit + 1) if name in free else (value,)
                  for name, value in zip(("tp", "cp", "pp"), want)]
        found = [(t, c, p) for t in ranges[0] for c in ranges[1] for p in ranges[2]
                 if fits(t * c * p) and layout_problem(cfg, t, c, p, vocab) is None]
        return sorted(found, key=lambda lay: (math.prod(lay), lay[0] == want[0], lay[1] == want[1],
                                              lay[2] == want[2], lay[0], lay[1]), reverse=True)

    chosen = candidates({"tp", "cp", "pp"} - set(explicit))
    if chosen:
        tp, cp, pp = chosen[0]
        where = f"torchrun started {world} processes" if world is not None else f"this machine has {gpus} GPU(s)"
        return tp, cp, pp, (f"{where}: running {_describe(tp, cp, pp)} instead of {_describe(*want)} "
                            f"(pass --tp/--cp/--pp to choose)")
    other = candidates({"tp", "cp", "pp"})
    hint = f"pass e.g. --tp {other[0][0]} --cp {other[0][1]} --pp {other[0][2]}" if other else \
        "no layout of this model fits"
    given = " ".join(f"--{name} {value}" for name, value in zip(("tp", "cp", "pp"), want) if name in explicit)
    if world is not None:
        raise ConfigError(f"{given or _describe(*want)}: {_describe(*want)} is {size} processes but torchrun "
                          f"started {world}; {hint}")
    raise ConfigError(f"{given or _describe(*want)}: {_describe(*want)} needs {size} GPUs (one per rank) "
                      f"but this machine has {gpus}; {hint}")
