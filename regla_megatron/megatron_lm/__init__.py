"""Megatron-LM integration: the `--regla-*` flags, the hooks a patched checkout calls, and the patch.

A patched `megatron/training/arguments.py` calls `add_arguments` and `finalize_args`, and
`core_transformer_config_from_args` calls `config_class` (`patches/README.md`).
"""

from regla_megatron.megatron_lm.hooks import add_arguments, config_class, finalize_args, uses_regla

__all__ = ["add_arguments", "config_class", "finalize_args", "uses_regla"]
