"""The `regla-megatron` command.

  regla-megatron train [--tiny] [--steps N] [--tp 2 --cp 2 --pp 1] [--data FILE ...]
      the one-command demo: prepare the corpus, train a hybrid ReGLA GPT on several
      processes, save, resume, report validation perplexity and a greedy sample.
  regla-megatron prepare-data OUT [FILE ...] [--tokenizer byte|bpe]
      text files (default: this Python's stdlib sources) -> OUT/corpus.bin/.idx.
  regla-megatron patch PATH
      patch a Megatron-LM checkout for `--spec regla` and the `--regla-*` flags.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings


def _add_train(sub) -> None:
    from regla_megatron.demo import PRESETS, DemoConfig

    p = sub.add_parser("train", help="train the demo hybrid ReGLA model (CPU: gloo, GPU: NCCL)",
                       description="Defaults are the 'small' preset; --tiny is the CI-sized one. "
                       "Flags override the preset.")
    p.add_argument("--tiny", action="store_true", help="CI-sized model and run (seconds per step)")
    p.add_argument("--workdir", default=DemoConfig.workdir, help="data, checkpoints, metrics.json")
    p.add_argument("--data", nargs="+", help="text files/folders (default: Python stdlib sources)")
    p.add_argument("--tokenizer", choices=("byte", "bpe"), default="byte")
    p.add_argument("--max-bytes", type=int, help="use at most this many bytes of input text")
    for name in ("tp", "cp", "pp"):
        p.add_argument(f"--{name}", type=int, default=getattr(DemoConfig, name),
                       help=f"{name.upper()} size (default {getattr(DemoConfig, name)})")
    p.add_argument("--steps", type=int)
    p.add_argument("--save-at", type=int, help="save and restart from the checkpoint at this step")
    p.add_argument("--no-restart", action="store_true", help="train straight through (save at the end)")
    p.add_argument("--load", help="start from this checkpoint folder (any TP/CP/PP layout)")
    p.add_argument("--pattern", help="layer pattern, e.g. R*R* ('R' ReGLA, '*' softmax)")
    p.add_argument("--num-layers", type=int)
    p.add_argument("--seq-length", type=int)
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--log-every", type=int)
    p.add_argument("--prompt")
    p.set_defaults(func=_train, presets=PRESETS)


def _train(args) -> int:
    from regla_megatron.arguments import validate_regla_pattern
    from regla_megatron.demo import DemoConfig, run_demo

    overrides = {k: getattr(args, k) for k in (
        "workdir", "data", "tokenizer", "max_bytes", "tp", "cp", "pp", "steps", "save_at", "load",
        "pattern", "num_layers", "seq_length", "micro_batch_size", "lr", "log_every", "prompt")
        if getattr(args, k) is not None}
    if args.no_restart:
        overrides["save_at"] = None
    cfg = DemoConfig.preset("tiny" if args.tiny else "small", **overrides)
    if cfg.save_at is not None and not 0 < cfg.save_at < cfg.steps:
        cfg.save_at = None
    if "pattern" in overrides and "num_layers" not in overrides:
        cfg.num_layers = len(cfg.pattern)
    validate_regla_pattern(cfg.pattern, cfg.num_layers)
    t0 = time.time()
    metrics = run_demo(cfg)
    if metrics is None:  # a rank other than 0 under torchrun
        return 0
    losses = list(metrics["losses"].values())
    trained = (f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps, "
               f"{metrics['tokens_per_s']:,.0f} tokens/s, " if losses else "")
    print(f"done in {time.time() - t0:.0f}s: {trained}validation perplexity "
          f"{metrics['val_ppl']:.2f}; metrics in {cfg.workdir}/metrics.json")
    return 0


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare-data", help="text files -> Megatron .bin/.idx dataset")
    p.add_argument("out", help="output folder (gets corpus.bin, corpus.idx, tokenizer files)")
    p.add_argument("files", nargs="*", help="text files or folders (default: Python stdlib sources)")
    p.add_argument("--tokenizer", choices=("byte", "bpe"), default="byte")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--max-bytes", type=int, help="use at most this many bytes of input text")
    p.add_argument("--name", default="corpus", help="dataset file name prefix")
    p.set_defaults(func=_prepare)


def _prepare(args) -> int:
    from regla_megatron.data import prepare_data

    d = prepare_data(args.out, args.files or None, args.tokenizer, args.vocab_size,
                     args.max_bytes, args.name)
    print(f"wrote {d.prefix}.bin/.idx: {d.num_documents} documents, {d.num_tokens:,} tokens, "
          f"{d.tokenizer.kind} tokenizer (vocab {d.tokenizer.vocab_size}, eod {d.tokenizer.eod})")
    if d.tokenizer.kind == "byte":
        print(f"Megatron-LM: --data-path {d.prefix} --tokenizer-type NullTokenizer --vocab-size 256")
    else:
        print(f"Megatron-LM: --data-path {d.prefix} --tokenizer-type HuggingFaceTokenizer "
              f"--tokenizer-model {args.out}")
    return 0


def _add_patch(sub) -> None:
    p = sub.add_parser("patch", help="patch a Megatron-LM checkout for --spec regla / --regla-*")
    p.add_argument("path", help="Megatron-LM checkout (folder with pretrain_gpt.py)")
    p.set_defaults(func=_patch)


def _patch(args) -> int:
    from regla_megatron.patching import apply_patch

    for line in apply_patch(args.path):
        print(line)
    print("ok: use pretrain_gpt.py --spec regla --regla-pattern ... (see patches/README.md)")
    return 0


def main(argv=None) -> int:
    """Entry point of the `regla-megatron` console script."""
    parser = argparse.ArgumentParser(prog="regla-megatron", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_prepare(sub)
    _add_patch(sub)
    args = parser.parse_args(argv)
    # Megatron warns at import about missing TE/Apex in every rank; the demo needs neither.
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    warnings.filterwarnings("ignore")
    from regla_megatron.patching import PatchError

    try:
        return args.func(args)
    except (PatchError, ValueError, FileNotFoundError) as err:
        print(f"regla-megatron {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
