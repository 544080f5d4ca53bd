"""The three hooks that a patched Megatron-LM checkout calls (see patches/README.md).

The patch only adds calls to these functions, so its lines stay few and the logic lives
(and is tested) here:
- `add_arguments(parser)`: in `parse_args`, adds the `--regla-*` group;
- `finalize_args(args)`: right after parsing, validates the ReGLA flags and turns
  `--spec regla` into the plugin's spec entry point;
- `config_class(args, config_class)`: in `core_transformer_config_from_args`, makes the
  config a `ReGLAConfig` when the ReGLA spec is selected (Megatron then fills its
  `regla_*` fields from the `--regla-*` flags by name).
"""

from __future__ import annotations

import argparse
import os
import sys

from regla_megatron.arguments import REGLA_OPTIONS, add_regla_arguments, regla_config_kwargs

SPEC_MODULE = "regla_megatron.specs"
STATIC_SPEC = "regla_hybrid_spec"  # a ModuleSpec object: Megatron-LM core_v0.16.x imports it as is
CALLABLE_SPEC = "regla_spec"  # f(config, vp_stage=None): Megatron-LM main calls it


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the `--regla-*` argument group (see `regla_megatron.arguments`)."""
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
    """Validates the ReGLA flags on parsed Megatron-LM args and resolves `--spec regla`.

    Raises ValueError with a message naming the flag: a pattern that does not match
    `--num-layers`, a bad value, `--regla-*` flags without `--spec regla`.
    """
    given = [o.cli for o in REGLA_OPTIONS if hasattr(args, o.field)]
    if given and not uses_regla(args):
        raise ValueError(f"{', '.join(given)} given without --spec regla: the ReGLA flags "
                         f"only apply to the ReGLA hybrid spec")
    if not uses_regla(args):
        return args
    if args.spec == ["regla"]:
        name = CALLABLE_SPEC if _megatron_calls_spec_callables() else STATIC_SPEC
        args.spec = [SPEC_MODULE, name]
    elif len(args.spec) != 2:
        raise ValueError(f"--spec {' '.join(args.spec)}: use '--spec regla' or "
                         f"'--spec {SPEC_MODULE} {CALLABLE_SPEC}|{STATIC_SPEC}'")
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
