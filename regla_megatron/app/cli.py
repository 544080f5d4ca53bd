"""The `regla-megatron` command.

  regla-megatron train [--tiny] [--steps N] [--tp 2 --cp 2 --pp 1] [--data FILE ...]
      the one-command demo: prepare the corpus, train a hybrid ReGLA GPT on several
      processes, save, resume, report validation perplexity and a greedy sample.
  regla-megatron eval --load CKPT [--data DATASET|FILE ...] [--tp 1 --cp 1 --pp 1]
      validation loss and perplexity of a checkpoint, at any layout.
  regla-megatron prepare-data OUT [FILE ...] [--tokenizer byte|bpe] [--force]
      text files (default: this Python's stdlib sources) -> OUT/corpus.bin/.idx/.json.
  regla-megatron patch PATH
      patch a Megatron-LM checkout for `--spec regla` and the `--regla-*` flags.

Bad settings are reported as one line before any process starts (exit status 2).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

LAYOUT_HELP = (
    "Layout: TP x CP x PP processes, one per GPU on a GPU machine (NCCL), gloo processes on CPU. "
    "On a GPU machine with fewer GPUs than the layout needs, the layout sizes not given on the "
    "command line shrink to the largest layout that fits (keeping TP, then CP, then PP where it "
    "can: the default TP 2 x CP 2 on 2 GPUs runs TP 2 x CP 1), with a printed line saying so; "
    "--tp/--cp/--pp given explicitly that do not fit are an error naming a layout that does. "
    "Under torchrun the layout must use exactly its processes, adapted the same way.")


def _positive(flag_type=int):
    def parse(text: str):
        value = flag_type(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _add_train(sub) -> None:
    from regla_megatron.app.data import MAX_DOCUMENT_BYTES
    from regla_megatron.app.demo import PRESETS, DemoConfig

    p = sub.add_parser("train", help="train the demo hybrid ReGLA model (CPU: gloo, GPU: NCCL)",
                       description="Defaults are the 'small' preset; --tiny is the CI-sized one. "
                       "Flags override the preset. " + LAYOUT_HELP)
    p.add_argument("--tiny", action="store_true", help="CI-sized model and run (seconds per step)")
    p.add_argument("--workdir", default=DemoConfig.workdir,
                   help="data/, checkpoint/, metrics.json (nothing else there is touched)")
    p.add_argument("--data", nargs="+", help="text files/folders (default: Python stdlib sources), or "
                   "one dataset folder written by prepare-data")
    p.add_argument("--tokenizer", choices=("byte", "bpe"), default="byte")
    p.add_argument("--vocab-size", dest="bpe_vocab_size", metavar="N", type=_positive(), help="BPE vocabulary size")
    p.add_argument("--max-bytes", type=_positive(), help="use at most this many bytes of input text")
    p.add_argument("--max-document-bytes", type=_positive(),
                   help=f"cut larger files into documents at blank lines (default {MAX_DOCUMENT_BYTES})")
    for name in ("tp", "cp", "pp"):
        p.add_argument(f"--{name}", type=_positive(), help=f"{name.upper()} size (default {getattr(DemoConfig, name)})")
    p.add_argument("--steps", type=_positive())
    p.add_argument("--save-at", type=_positive(), help="save and restart from the checkpoint at this step "
                   "(1 .. steps-1)")
    p.add_argument("--no-restart", action="store_true", help="train straight through (save at the end)")
    p.add_argument("--load", help="start from this checkpoint (a step folder, or a checkpoint folder "
                   "with a 'latest' file; any TP/CP/PP layout)")
    p.add_argument("--pattern", help="layer pattern, e.g. R*R* ('R' ReGLA, '*' softmax)")
    for flag in ("--num-layers", "--hidden-size", "--num-attention-heads", "--ffn-hidden-size",
                 "--seq-length", "--micro-batch-size", "--log-every", "--eval-batches"):
        p.add_argument(flag, type=_positive())
    for flag in ("--warmup", "--gen-tokens", "--seed"):
        p.add_argument(flag, type=_non_negative)
    p.add_argument("--lr", type=_positive(float))
    p.add_argument("--prompt")
    p.set_defaults(func=_train, presets=PRESETS)


TRAIN_FIELDS = ("workdir", "data", "tokenizer", "bpe_vocab_size", "max_bytes", "max_document_bytes", "tp", "cp",
                "pp", "steps", "save_at", "load", "pattern", "num_layers", "hidden_size", "num_attention_heads",
                "ffn_hidden_size", "seq_length", "micro_batch_size", "log_every", "eval_batches", "warmup",
                "gen_tokens", "seed", "lr", "prompt")


def _train(args) -> int:
    from regla_megatron.app.checks import fit_layout
    from regla_megatron.app.demo import DemoConfig, run_demo
    from regla_megatron.app.launch import available_gpus, under_torchrun

    overrides = {k: getattr(args, k) for k in TRAIN_FIELDS if getattr(args, k) is not None}
    if args.no_restart:
        overrides["save_at"] = None
    cfg = DemoConfig.preset("tiny" if args.tiny else "small", **overrides)
    if "pattern" in overrides and "num_layers" not in overrides:
        cfg.num_layers = len(cfg.pattern)
    if "save_at" not in overrides and cfg.save_at is not None and cfg.save_at >= cfg.steps:
        print(f"no restart: the preset's save step {cfg.save_at} is not before --steps {cfg.steps} "
              f"(pass --save-at to choose one)")
        cfg.save_at = None
    world = int(os.environ["WORLD_SIZE"]) if under_torchrun() else None
    explicit = {k for k in ("tp", "cp", "pp") if k in overrides}
    cfg.tp, cfg.cp, cfg.pp, note = fit_layout(cfg, explicit, gpus=available_gpus(), world=world)
    if note and int(os.environ.get("RANK", 0)) == 0:
        print(note, flush=True)
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


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint",
                       description="Evaluates a checkpoint of `train` on the validation part of a dataset "
                       "(the demo's split: the last 2% of documents, at least one), with the model "
                       "configuration stored in the checkpoint. " + LAYOUT_HELP)
    p.add_argument("--load", required=True, help="checkpoint: a step folder, or a folder with 'latest'")
    p.add_argument("--data", nargs="+", help="a dataset folder written by prepare-data, or text files/folders "
                   "(prepared into a temporary folder); default: the checkpoint's training data")
    for name in ("tp", "cp", "pp"):
        p.add_argument(f"--{name}", type=_positive(), help=f"{name.upper()} size (default 1)")
    for flag in ("--eval-batches", "--micro-batch-size", "--seq-length", "--max-bytes", "--max-document-bytes"):
        p.add_argument(flag, type=_positive(), help="default: the training run's" if "bytes" not in flag else None)
    p.set_defaults(func=_eval)


def _eval(args) -> int:
    from regla_megatron.app.evaluate import EvalConfig, run_eval

    cfg = EvalConfig(**{k: getattr(args, k) for k in (
        "load", "data", "tp", "cp", "pp", "eval_batches", "micro_batch_size", "seq_length", "max_bytes",
        "max_document_bytes") if getattr(args, k) is not None})
    result = run_eval(cfg, explicit={k for k in ("tp", "cp", "pp") if getattr(args, k) is not None})
    if result is not None:
        print(f"validation of {result['checkpoint']} (step {result['step']}) on {result['dataset']}: "
              f"loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f} per "
              f"{result['tokenizer']} token over {result['tokens']:,} tokens")
    return 0


def _add_prepare(sub) -> None:
    from regla_megatron.app.data import MAX_DOCUMENT_BYTES, MEGATRON_LM_SPLIT

    p = sub.add_parser("prepare-data", help="text files -> Megatron .bin/.idx dataset (+ .json)")
    p.add_argument("out", help="output folder (gets NAME.bin, NAME.idx, NAME.json, tokenizer files)")
    p.add_argument("files", nargs="*", help="text files or folders (default: Python stdlib sources)")
    p.add_argument("--tokenizer", choices=("byte", "bpe"), default="byte")
    p.add_argument("--vocab-size", type=_positive(), default=4096, help="BPE vocabulary size")
    p.add_argument("--max-bytes", type=_positive(), help="use at most this many bytes of input text")
    p.add_argument("--max-document-bytes", type=_positive(), default=MAX_DOCUMENT_BYTES,
                   help="files larger than this are cut into documents at blank lines (paragraph "
                   f"groups up to this size; default {MAX_DOCUMENT_BYTES})")
    p.add_argument("--split", default=MEGATRON_LM_SPLIT, help="the train,valid,test split the dataset must "
                   f"give documents to (Megatron-LM's --split; default {MEGATRON_LM_SPLIT})")
    p.add_argument("--name", default="corpus", help="dataset file name prefix (a plain name)")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.set_defaults(func=_prepare)


def _prepare(args) -> int:
    from regla_megatron.app.data import prepare_data

    d = prepare_data(args.out, args.files or None, args.tokenizer, args.vocab_size, args.max_bytes,
                     args.name, max_document_bytes=args.max_document_bytes, split=args.split, force=args.force)
    print(f"wrote {d.prefix}.bin/.idx/.json: {d.num_documents} documents, {d.num_tokens:,} tokens, "
          f"{d.tokenizer.kind} tokenizer (vocab {d.tokenizer.vocab_size}, eod {d.tokenizer.eod})")
    if d.tokenizer.kind == "byte":
        print(f"the byte tokenizer's EOD is {d.tokenizer.eod}, so the embedding needs >= "
              f"{d.tokenizer.eod + 1} rows: use --vocab-size {d.tokenizer.eod + 1} with Megatron-LM's "
              f"NullTokenizer")
        print(f"Megatron-LM: --data-path {d.prefix} --split {args.split} --tokenizer-type NullTokenizer "
              f"--vocab-size {d.tokenizer.eod + 1}")
    else:
        print(f"Megatron-LM: --data-path {d.prefix} --split {args.split} --tokenizer-type "
              f"HuggingFaceTokenizer --tokenizer-model {args.out}")
    return 0


def _add_patch(sub) -> None:
    p = sub.add_parser("patch", help="patch a Megatron-LM checkout for --spec regla / --regla-*")
    p.add_argument("path", help="Megatron-LM checkout (folder with pretrain_gpt.py)")
    p.set_defaults(func=_patch)


def _patch(args) -> int:
    from regla_megatron.megatron_lm.patching import apply_patch

    for line in apply_patch(args.path):
        print(line)
    print("ok: use pretrain_gpt.py --spec regla --regla-pattern ... (see patches/README.md)")
    return 0


def main(argv=None) -> int:
    """Entry point of the `regla-megatron` console script; returns the exit status (2: bad input)."""
    parser = argparse.ArgumentParser(prog="regla-megatron", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_prepare(sub)
    _add_patch(sub)
    args = parser.parse_args(argv)
    # Megatron warns at import about missing TE/Apex in every rank; the demo needs neither.
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    warnings.filterwarnings("ignore")
    from regla_megatron.app.corpus import SharedFilesystemError
    from regla_megatron.app.launch import RankError
    from regla_megatron.app.training import NonFiniteError
    from regla_megatron.megatron_lm.patching import PatchError

    try:
        return args.func(args)
    except (PatchError, ValueError, FileNotFoundError, RankError, NonFiniteError, SharedFilesystemError) as err:
        print(f"regla-megatron {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
