"""The hooks that a patched Megatron-LM checkout calls (see patches/README.md), and the data checks.

The patch only adds calls to these functions, so its lines stay few and the logic lives
(and is tested) here:
- `add_arguments(parser)`: in `parse_args`, adds the `--regla-*` group;
- `finalize_args(args)`: right after parsing, validates the ReGLA flags, turns
  `--spec regla` into the plugin's spec entry point and checks the data flags
  (`check_data_args`);
- `config_class(args, config_class)`: in `core_transformer_config_from_args`, makes the
  config a `ReGLAConfig` when the ReGLA spec is selected (Megatron then fills its
  `regla_*` fields from the `--regla-*` flags by name).

Data checks: Megatron-LM fails late and obscurely on two data mistakes, so they are checked
when the arguments are parsed. A byte dataset's EOD id outside the embedding
(`--tokenizer-type NullTokenizer --vocab-size 256` for 257 ids) is a CUDA device-side assert
at the first step; a `--split` that leaves a set with weight > 0 without documents makes
Megatron hang, silently, while it builds that set's sample indices. `check_data_args` reads
the `PREFIX.json` that `regla-megatron prepare-data` writes beside `PREFIX.bin/.idx` and the
`.idx` header (`regla_megatron.indexed_data` holds those formats and Megatron's `--split`
rule). The zero-patch form has no parse hook: there `check_megatron_lm_data()` runs the same
check on Megatron-LM's global args (the spec entry points `regla_spec` and
`regla_hybrid_spec` call it inside pretrain_gpt.py), and the example launcher calls
`check_data` before torchrun.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from regla_megatron.indexed_data import (
    MEGATRON_DEFAULT_SPLIT,
    SPLIT_NAMES,
    dataset_meta,
    read_index_header,
    split_sizes,
)
from regla_megatron.megatron_lm.arguments import (
    REGLA_OPTIONS,
    add_regla_arguments,
    regla_config_kwargs,
    regla_env_kwargs,
)

SPEC_MODULE = "regla_megatron.specs"
STATIC_SPEC = "regla_hybrid_spec"  # a ModuleSpec object: Megatron-LM core_v0.16.x imports it as is
CALLABLE_SPEC = "regla_spec"  # f(config, vp_stage=None): Megatron-LM main calls it


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the `--regla-*` argument group (see `regla_megatron.megatron_lm.arguments`)."""
    return add_regla_arguments(parser)


def _megatron_calls_spec_callables() -> bool:
    # Megatron-LM main builds GPT models through GPTModelBuilder, which calls a callable
    # spec with (config, vp_stage); core_v0.16.x's gpt_builder uses the imported object as is.
    # Look at the file rather than importing it: main's models package needs Python >= 3.12.
    training = sys.modules.get("megatron.training")
    if training is None or not getattr(training, "__file__", None):
        return False
    return os.path.exists(os.path.join(os.path.dirname(training.__file__), "models", "gpt.py"))


def uses_regla(args: argparse.Namespace) -> bool:
    """True when `args.spec` selects the plugin (`--spec regla` or `--spec regla_megatron.specs X`)."""
    spec = getattr(args, "spec", None) or []
    return bool(spec) and spec[0] in ("regla", SPEC_MODULE)


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Validates the ReGLA and data flags on parsed Megatron-LM args and resolves `--spec regla`.

    With the ReGLA spec selected, `REGLA_*` environment variables (the zero-patch form's
    channel) fill the `--regla-*` flags not given; a given flag wins.

    Raises ValueError with a message naming the flag: a pattern that does not match
    `--num-layers`, a bad value, `--regla-*` flags without `--spec regla`, and the data
    mistakes of `check_data_args` (checked for every run of the patched checkout).
    """
    given = [o.cli for o in REGLA_OPTIONS if hasattr(args, o.field)]
    if given and not uses_regla(args):
        raise ValueError(f"{', '.join(given)} given without --spec regla: the ReGLA flags "
                         f"only apply to the ReGLA hybrid spec")
    check_data_args(args)
    if not uses_regla(args):
        return args
    if args.spec == ["regla"]:
        name = CALLABLE_SPEC if _megatron_calls_spec_callables() else STATIC_SPEC
        args.spec = [SPEC_MODULE, name]
    elif len(args.spec) != 2:
        raise ValueError(f"--spec {' '.join(args.spec)}: use '--spec regla' or "
                         f"'--spec {SPEC_MODULE} {CALLABLE_SPEC}|{STATIC_SPEC}'")
    # The config is a ReGLAConfig built from args here, so the REGLA_* variables of the
    # zero-patch form would otherwise be ignored: they fill the flags not given.
    for field, value in regla_env_kwargs(num_layers=getattr(args, "num_layers", None)).items():
        if not hasattr(args, field):
            setattr(args, field, value)
    regla_config_kwargs(args)
    return args


def config_class(args: argparse.Namespace, config_class):
    """Returns `ReGLAConfig` when the ReGLA spec is selected, else `config_class` unchanged."""
    if not uses_regla(args):
        return config_class
    from megatron.core.transformer.transformer_config import TransformerConfig

    from regla_megatron.config import ReGLAConfig

    if config_class not in (None, TransformerConfig, ReGLAConfig):
        raise ValueError(f"--spec regla cannot be combined with options that select "
                         f"{config_class.__name__} (e.g. MLA, heterogeneous layers)")
    return ReGLAConfig


# --------------------------------------------------------------------------- data checks


def data_prefixes(paths: Optional[Sequence[str]]) -> list[str]:
    """The dataset prefixes of a `--data-path` list: prefixes alone, or `weight prefix` pairs."""
    if not paths:
        return []
    paths = list(paths)
    if len(paths) % 2 == 0:
        try:
            [float(w) for w in paths[0::2]]
        except ValueError:
            return [p.strip() for p in paths]
        return [p.strip() for p in paths[1::2]]
    return [p.strip() for p in paths]


def _suggest_split(sequences: int) -> str:
    return f"--split {sequences - 1},1,0" if sequences >= 2 else ""


def check_vocab(prefix: str, tokenizer_type: Optional[str], vocab_size: Optional[int]) -> None:
    """ValueError if `--vocab-size` (NullTokenizer) is below the vocabulary in `PREFIX.json`."""
    meta = dataset_meta(prefix)
    if meta is None or tokenizer_type != "NullTokenizer" or vocab_size is None:
        return
    needed = int(meta.get("vocab_size", 0))
    if vocab_size < needed:
        raise ValueError(
            f"--vocab-size {vocab_size} is too small for {prefix}: its {meta.get('tokenizer', '?')} "
            f"tokenizer has {needed} ids (EOD {meta.get('eod', '?')}, from {prefix}.json), and with "
            f"--tokenizer-type NullTokenizer the embedding has --vocab-size rows; use --vocab-size {needed}")


def check_split(prefix: str, split: str) -> None:
    """ValueError if `split` leaves a set with weight > 0 of `PREFIX.idx` without documents."""
    index = Path(prefix + ".idx")
    if not index.is_file():
        return
    header = read_index_header(index)
    sizes = split_sizes(header.sequences, split)
    for name, size in zip(SPLIT_NAMES, sizes):
        if size != 0:
            continue
        counts = ", ".join(f"{n} {s or 0}" for n, s in zip(SPLIT_NAMES, sizes))
        suggestion = _suggest_split(header.sequences)
        fix = (f"give a split that leaves every set with weight > 0 at least one document "
               f"(e.g. {suggestion}), " if suggestion else "")
        raise ValueError(
            f"--split {split!r} leaves the {name} set of {prefix} with no documents: the dataset has "
            f"{header.documents} document(s) and Megatron splits whole documents ({counts}); Megatron-LM "
            f"would hang building the {name} indices. Prepare more documents (more text, or prepare-data "
            f"with a smaller --max-document-bytes), {fix}or give the {name} set weight 0")


def check_data(data_path: Optional[Sequence[str]], split: Optional[str], tokenizer_type: Optional[str],
               vocab_size: Optional[int], per_split_paths: Sequence[Optional[Sequence[str]]] = ()) -> None:
    """Checks Megatron-LM's data flags against the prepared files; raises ValueError naming the flag.

    Args:
        data_path: `--data-path` (prefixes, or weight/prefix pairs), None when not given.
        split: `--split`; None means Megatron-LM's default when `--data-path` is given.
        tokenizer_type, vocab_size: `--tokenizer-type`, `--vocab-size`.
        per_split_paths: `--train-data-path`, `--valid-data-path`, `--test-data-path` (vocab only).
    """
    prefixes = data_prefixes(data_path)
    for paths in (data_path, *per_split_paths):
        for prefix in data_prefixes(paths):
            check_vocab(prefix, tokenizer_type, vocab_size)
    for prefix in prefixes:
        check_split(prefix, split or MEGATRON_DEFAULT_SPLIT)


def check_data_args(args: argparse.Namespace) -> None:
    """`check_data` on parsed Megatron-LM args (nothing to check with `--mock-data`)."""
    if getattr(args, "mock_data", False):
        return
    check_data(getattr(args, "data_path", None), getattr(args, "split", None),
               getattr(args, "tokenizer_type", None), getattr(args, "vocab_size", None),
               [getattr(args, name, None) for name in ("train_data_path", "valid_data_path", "test_data_path")])


_CHECKED_ARGS: list = []  # the Megatron-LM args object already checked in this process


def check_megatron_lm_data() -> bool:
    """The zero-patch form's data check: `check_data_args` on Megatron-LM's global args, once.

    Returns True if it checked; False outside a Megatron-LM run (no `megatron.training`
    loaded, or its args not parsed yet: Megatron-Bridge, tests), where nothing is read.
    Raises ValueError as `check_data_args` does.
    """
    if "megatron.training.global_vars" not in sys.modules:
        return False
    from megatron.training.global_vars import get_args

    try:
        args = get_args()
    except AssertionError:  # Megatron's "args is not initialized"
        return False
    if not any(seen is args for seen in _CHECKED_ARGS):
        check_data_args(args)
        _CHECKED_ARGS.append(args)
    return True
