"""The one-pass Triton path of `chunk_regla` in the interpreter against the fp64 recurrence:
both kernel paths (whole-chunk products, sub-chunk kernels), block splits, saturated gates,
packed sequences, fp16, and the errors for what the kernels do not take."""

import pytest
import torch

from regla_kernels import chunk_regla, resolve_backend
from regla_kernels.triton.backend import fast_chunk_mask
from regla_kernels.triton.settings import MIN_HEAD_DIM
from tests.kernels.triton.cases import compare, make_inputs, packed_offsets

pytestmark = pytest.mark.interpreter

D = MIN_HEAD_DIM


@pytest.mark.parametrize("shape", [(2, 37, 2, 1, 1), pytest.param((1, 150, 2, 2, 1), marks=pytest.mark.slow)])
def test_forward_gradients_and_states_fp32(shape, launch):
    batch, length, heads, dk_mult, dv_mult = shape
    compare(make_inputs(batch, length, heads, D * dk_mult, D * dv_mult), bound=2e-5)


@pytest.mark.parametrize(
    "fast_limit", [pytest.param(-1.0, marks=pytest.mark.slow), 17.0, pytest.param(60.0, marks=pytest.mark.slow)]
)
def test_whole_chunk_products_and_sub_chunk_kernels(fast_limit, launch):
    """fast_limit -1: every chunk in the sub-chunk kernels; 17: a mix, chunk by chunk;
    60: every chunk of these inputs in the whole-chunk product kernels."""
    launch.update(fast_limit=fast_limit)
    inputs = make_inputs(2, 150, 2, 2 * D, D, logit_scale=1.0, seed=6)
    fast = fast_chunk_mask(inputs[3], inputs[4])
    expected = {-1.0: "none", 17.0: "some", 60.0: "all"}[fast_limit]
    observed = "all" if fast.all() else ("none" if not fast.any() else "some")
    assert observed == expected, fast
    compare(inputs, bound=2e-5)


@pytest.mark.slow
def test_split_key_and_value_blocks(launch):
    """Sequential state stages split over key and value blocks; the rest over value blocks
    (and the fast dq/dk stage over key blocks)."""
    launch.update(
        states_block_k=D, states_block_v=D, block_v=D, fast_output_block_v=D, fast_dv_block_v=D, fast_dqk_block_k=D, fast_dqk_block_v=D
    )
    compare(make_inputs(2, 150, 2, 2 * D, 2 * D, seed=1), bound=2e-5)


def test_saturated_gates(launch):
    compare(make_inputs(1, 150, 2, 2 * D, D, saturated=True, seed=2), bound=2e-5, gate_bound=1e-4)


def test_packed_sequences(launch):
    lengths = [37, 100, 1, 13]
    inputs = make_inputs(1, sum(lengths), 2, D, 2 * D, sequences=len(lengths), seed=3)
    compare(inputs, bound=2e-5, cu_seqlens=packed_offsets(lengths))


def test_fp16_inputs(launch):
    compare(make_inputs(1, 70, 2, D, D, dtype=torch.float16, seed=4), bound=3e-3)


@pytest.mark.slow
def test_inputs_with_strided_features_are_made_contiguous(launch):
    """Inputs whose features are not contiguous (and so q, k with different layouts) are made
    contiguous first and give exactly the contiguous inputs' results."""
    inputs = make_inputs(2, 70, 2, D, D, seed=31)
    flipped = [x.transpose(-1, -2).contiguous().transpose(-1, -2) for x in inputs[:5]]  # same values, stride(-1) > 1
    assert all(x.stride(-1) != 1 for x in flipped)
    want = chunk_regla(*inputs[:5], initial_state=inputs[5], output_final_state=True, backend="triton")
    got = chunk_regla(flipped[0], inputs[1], *flipped[2:], initial_state=inputs[5], output_final_state=True, backend="triton")
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_unsupported_shapes_and_dtypes_name_the_limit():
    x = torch.randn(1, 8, 1, 24)
    with pytest.raises(ValueError, match=r"dk=24 unsupported.*powers of two"):
        chunk_regla(x, x, x, x, x, backend="triton")
    y = torch.randn(1, 8, 1, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        chunk_regla(y, y, y, y, y, backend="triton")


def test_auto_backend_stays_on_torch_for_cpu_tensors():
    x = torch.randn(1, 8, 1, 16)
    assert resolve_backend("auto", x, x) == "torch"
    assert resolve_backend("triton", x, x) == "triton"
