"""The plugin's public surface: what `regla_megatron` exports, that importing it is cheap, and the
one layer-pattern check shared by the config and the command line."""

import subprocess
import sys

import pytest

import regla_megatron
from regla_megatron.pattern import PATTERN_SYMBOLS, REGLA_SYMBOL, SOFTMAX_SYMBOL, validate_regla_pattern


def test_import_loads_neither_megatron_nor_triton():
    code = (
        "import sys, regla_megatron; "
        "loaded = [m for m in ('triton', 'megatron', 'regla_kernels') if m in sys.modules]; "
        "assert not loaded, loaded; "
        "assert sorted(dir(regla_megatron)) == sorted(set(dir(regla_megatron)) | set(regla_megatron.__all__))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_every_exported_name_resolves_to_its_module_object():
    from regla_megatron import config, context_parallel, cpu_shim, mixer, specs

    homes = {
        "ReGLAConfig": config, "ReGLAMixer": mixer, "ReGLAMixerSubmodules": mixer,
        "apply_cpu_shim": cpu_shim, "context_parallel_regla": context_parallel,
        "get_hybrid_block_spec": specs, "get_regla_layer_spec": specs, "get_softmax_layer_spec": specs,
        "regla_hybrid_spec": specs, "regla_spec": specs,
    }
    assert sorted(regla_megatron.__all__) == sorted(homes)
    for name, module in homes.items():
        assert getattr(regla_megatron, name) is getattr(module, name), name
    with pytest.raises(AttributeError, match="no attribute 'chunk_regla'"):
        _ = regla_megatron.chunk_regla


def test_pattern_symbols_are_shared():
    from regla_megatron.megatron_lm import arguments

    assert PATTERN_SYMBOLS == {REGLA_SYMBOL: "ReGLA layer", SOFTMAX_SYMBOL: "softmax attention layer"}
    assert arguments.validate_regla_pattern is validate_regla_pattern


@pytest.mark.parametrize(
    "pattern, num_layers, message",
    [
        ("R*R", 4, r"ReGLA pattern 'R\*R' describes 3 layer\(s\) but --num-layers is 4: give exactly one symbol \('R' or '\*'\)"),
        ("RxR*", 4, r"unknown symbol\(s\) \['x'\]; use 'R' for a ReGLA layer and '\*' for a softmax attention layer"),
        (["R"], 1, r"ReGLA pattern must be a string such as 'R\*R\*', got \['R'\]"),
    ],
)
def test_bad_patterns(pattern, num_layers, message):
    with pytest.raises(ValueError, match=message):
        validate_regla_pattern(pattern, num_layers)


def test_good_patterns_come_back_unchanged():
    assert validate_regla_pattern("R*R*", 4) == "R*R*"
    assert validate_regla_pattern("**", None) == "**"  # no layer count: symbols only
