"""`finalize_args`: the REGLA_* variables of the zero-patch form fill the --regla-* flags not
given (a patched checkout builds its ReGLAConfig from args, so they would be lost otherwise)."""

import argparse

import pytest

from regla_megatron.megatron_lm import hooks


def _args(spec, **flags):
    return argparse.Namespace(spec=spec, num_layers=4, data_path=None, mock_data=False, **flags)


def test_environment_fills_flags_not_given(monkeypatch):
    monkeypatch.setenv("REGLA_PATTERN", "R*R*")
    monkeypatch.setenv("REGLA_NORM", "layernorm")
    args = hooks.finalize_args(_args(["regla_megatron.specs", "regla_hybrid_spec"], regla_norm="rmsnorm"))
    assert (args.regla_pattern, args.regla_norm) == ("R*R*", "rmsnorm")  # a given flag wins


def test_environment_is_checked_like_flags(monkeypatch):
    monkeypatch.setenv("REGLA_PATTERN", "R*")
    with pytest.raises(ValueError, match="--num-layers is 4"):
        hooks.finalize_args(_args(["regla"]))


def test_environment_ignored_without_the_regla_spec(monkeypatch):
    monkeypatch.setenv("REGLA_PATTERN", "R*R*")
    args = hooks.finalize_args(_args(None))
    assert not hasattr(args, "regla_pattern")
