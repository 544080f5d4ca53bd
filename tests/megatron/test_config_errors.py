"""ReGLAConfig: defaults resolve, and every bad input fails at construction with a clear message."""

import pytest
import torch

from regla_megatron.config import ReGLAConfig, layer_is_regla

BASE = dict(num_layers=4, hidden_size=64, num_attention_heads=4, params_dtype=torch.float32)


def make(**overrides):
    return ReGLAConfig(**{**BASE, **overrides})


def test_defaults_resolve_from_attention_fields():
    config = make()
    assert (config.regla_num_heads, config.regla_head_dim_k, config.regla_head_dim_v) == (4, 16, 16)
    assert config.regla_norm == "rmsnorm" and config.regla_gate_rank == 0 and not config.regla_output_gate
    assert config.regla_backend == "auto" and config.regla_cp_layout == "zigzag"
    assert all(layer_is_regla(config, n) for n in range(1, 5))
    assert not config.hetereogenous_dist_checkpoint


def test_pattern_is_read_per_global_layer_and_marks_checkpoint_heterogeneous():
    config = make(regla_pattern="R*RR")
    assert [layer_is_regla(config, n) for n in range(1, 5)] == [True, False, True, True]
    assert config.hetereogenous_dist_checkpoint
    assert not make(regla_pattern="RRRR").hetereogenous_dist_checkpoint


def test_layer_number_out_of_range():
    with pytest.raises(ValueError, match=r"layer_number 5 is outside 1\.\.4"):
        layer_is_regla(make(), 5)
    with pytest.raises(ValueError, match=r"layer_number 0 is outside"):
        layer_is_regla(make(), 0)


def test_softmax_layers_allowed_under_context_parallelism():
    make(regla_pattern="R*R*", context_parallel_size=2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(regla_num_heads=3, regla_head_dim_k=16, tensor_model_parallel_size=2),
         r"regla_num_heads \(3\) must be divisible by tensor_model_parallel_size \(2\)"),
        (dict(regla_num_heads=0), r"regla_num_heads must be positive"),
        (dict(regla_pattern="R*R"), r"regla_pattern 'R\*R' describes 3 layer\(s\) but num_layers is 4"),
        (dict(regla_pattern="R*RX"), r"unknown symbol\(s\) \['X'\].*'R' for a ReGLA layer"),
        (dict(regla_pattern="r*r*"), r"unknown symbol\(s\) \['r'\]"),
        (dict(regla_norm="batchnorm"), r"unknown regla_norm 'batchnorm'.*rmsnorm.*layernorm"),
        (dict(regla_head_dim_k=0), r"regla_head_dim_k = 0 is outside the kernels' limits \(1\.\.256\)"),
        (dict(regla_head_dim_v=-8), r"regla_head_dim_v = -8 is outside the kernels' limits"),
        (dict(regla_head_dim_v=512), r"regla_head_dim_v = 512 is outside the kernels' limits \(1\.\.256\)"),
        (dict(regla_head_dim_k=272), r"regla_head_dim_k = 272 is outside the kernels' limits"),
        (dict(regla_head_dim_k=24), r"regla_head_dim_k = 24 must be a multiple of 16"),
        (dict(hidden_size=32), r"regla_head_dim_k = 8 must be a multiple of 16"),  # from kv_channels
        (dict(regla_backend="cuda"), r"unknown regla_backend 'cuda'.*auto.*triton.*torch"),
        (dict(regla_backend="triton", regla_head_dim_k=48),
         r"regla_backend='triton' needs head dims that are powers of two.*regla_head_dim_k = 48"),
        (dict(regla_backend="triton", regla_head_dim_v=256), r"powers of two in \[16, 128\].*regla_head_dim_v = 256"),
        (dict(regla_cp_layout="ring"), r"unknown regla_cp_layout 'ring'.*zigzag.*contiguous"),
        (dict(regla_gate_rank=-1), r"regla_gate_rank must be 0 \(full rank\) or a positive rank"),
        (dict(regla_norm_eps=0.0), r"regla_norm_eps must be positive"),
        (dict(regla_low_memory=True, context_parallel_size=2),
         r"regla_low_memory is not implemented with context parallelism \(context_parallel_size = 2\)"),
        (dict(regla_low_memory_keep_gates=True), r"regla_low_memory_keep_gates only changes regla_low_memory, which is off"),
    ],
)
def test_bad_input_raises_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        make(**overrides)
