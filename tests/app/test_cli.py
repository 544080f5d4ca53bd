"""Bad input gives clear errors: `--regla-*` values, patterns, REGLA_* env vars, patch targets."""

import argparse
import subprocess
import sys

import pytest

from regla_megatron import megatron_lm
from regla_megatron.app.cli import main
from regla_megatron.megatron_lm.arguments import add_regla_arguments, regla_config_kwargs, regla_env_kwargs
from regla_megatron.megatron_lm.patching import PatchError, apply_patch


def _parse(*argv, num_layers=4):
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-layers", type=int, default=num_layers)
    parser.add_argument("--spec", nargs="*")
    add_regla_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("flag, value", [("--regla-norm", "batchnorm"), ("--regla-backend", "cuda"),
                                         ("--regla-cp-layout", "ring"), ("--regla-num-heads", "four")])
def test_unknown_flag_values_are_argparse_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(flag, value)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and value in err


def test_unset_flags_leave_config_defaults():
    args = _parse("--regla-norm", "layernorm", "--no-regla-output-gate")
    assert regla_config_kwargs(args) == {"regla_norm": "layernorm", "regla_output_gate": False}
    assert regla_config_kwargs(_parse("--regla-low-memory")) == {"regla_low_memory": True}
    assert regla_config_kwargs(_parse("--regla-low-memory", "--regla-low-memory-keep-gates")) == {
        "regla_low_memory": True, "regla_low_memory_keep_gates": True,
    }
    assert not hasattr(args, "regla_pattern")  # so Megatron keeps ReGLAConfig's default


@pytest.mark.parametrize("pattern, message", [("R*R", "describes 3 layer(s) but --num-layers is 4"),
                                              ("RxR*", "unknown symbol(s) ['x']")])
def test_bad_pattern_is_a_clear_error(pattern, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        regla_config_kwargs(_parse("--regla-pattern", pattern))


def test_finalize_args_resolves_spec_and_checks_flags():
    args = megatron_lm.finalize_args(_parse("--spec", "regla", "--regla-pattern", "R*R*"))
    assert args.spec[0] == "regla_megatron.specs"
    with pytest.raises(ValueError, match="without --spec regla"):
        megatron_lm.finalize_args(_parse("--regla-pattern", "R*R*"))
    with pytest.raises(ValueError, match="--num-layers is 4"):
        megatron_lm.finalize_args(_parse("--spec", "regla", "--regla-pattern", "R*"))


def test_env_vars():
    assert regla_env_kwargs({"REGLA_PATTERN": "R*", "REGLA_OUTPUT_GATE": "1", "PATH": "/bin"},
                            num_layers=2) == {"regla_pattern": "R*", "regla_output_gate": True}
    with pytest.raises(ValueError, match="REGLA_NORM: invalid choice 'batchnorm'"):
        regla_env_kwargs({"REGLA_NORM": "batchnorm"})
    with pytest.raises(ValueError, match="REGLA_PATERN; did you mean REGLA_PATTERN"):
        regla_env_kwargs({"REGLA_PATERN": "R*"})
    assert regla_env_kwargs({"REGLA_TESTS_SEE_GPU": "1"}) == {}  # not an option, not a typo
    with pytest.raises(ValueError, match="--num-layers is 3"):
        regla_env_kwargs({"REGLA_PATTERN": "R*"}, num_layers=3)


def test_config_from_plain_transformer_config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from regla_megatron.megatron_lm.arguments import regla_config_from

    plain = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4)
    config = regla_config_from(plain, environ={"REGLA_PATTERN": "*R", "REGLA_NORM": "layernorm"})
    assert (config.regla_pattern, config.regla_norm, config.hidden_size) == ("*R", "layernorm", 64)


def test_patch_target_not_a_checkout(tmp_path, capsys):
    with pytest.raises(PatchError, match="not a Megatron-LM checkout: missing pretrain_gpt.py"):
        apply_patch(tmp_path)
    with pytest.raises(PatchError, match="no such directory"):
        apply_patch(tmp_path / "absent")
    (tmp_path / "megatron" / "core").mkdir(parents=True)
    with pytest.raises(PatchError, match="installed megatron-core package"):
        apply_patch(tmp_path)
    assert main(["patch", str(tmp_path)]) == 2
    assert "is not a Megatron-LM checkout" in capsys.readouterr().err


def test_patch_rejects_unknown_megatron_version(tmp_path):
    for f in ("pretrain_gpt.py", "megatron/training/arguments.py", "megatron/core/__init__.py"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("# not the real file\n")
    with pytest.raises(PatchError, match="no regla-megatron patch applies"):
        apply_patch(tmp_path)


def test_console_script_bad_pattern():
    result = subprocess.run([sys.executable, "-m", "regla_megatron.app.cli", "train", "--tiny",
                             "--pattern", "R*Q"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown symbol(s) ['Q']" in result.stderr
