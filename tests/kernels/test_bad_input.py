"""Bad input to the PyTorch backends: NaN and Inf behave like the causal fp64 recurrence, empty
and mixed-dtype inputs work, and malformed decode states raise a clear ValueError."""

import math

import pytest
import torch

from regla_kernels import chunk_regla, regla_step, sequence_key_max
from tests.kernels.bad_inputs import FIELDS, check_bad_value

BACKENDS = ["torch", "naive"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("field", list(FIELDS))
@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("packed", [False, True])
def test_nan_and_inf_stay_causal(backend, field, value, packed):
    check_bad_value(backend, field, value, packed)


def test_key_max_ignores_non_finite_keys():
    k = torch.tensor([[1.0, math.nan], [math.inf, 2.0], [-math.inf, -3.0]]).reshape(1, 3, 1, 2)
    assert sequence_key_max(k).tolist() == [[2.0]]
    assert sequence_key_max(torch.full((2, 4, 1, 2), math.nan)).tolist() == [[0.0], [0.0]]
    assert sequence_key_max(torch.zeros(2, 0, 3, 4)).tolist() == [[0.0] * 3] * 2


def empty_case_inputs(batch, length, heads=2, dk=16, dv=16, dtype=torch.float32):
    """Leaves [q, k, v, z, u, initial state] of the given (possibly empty) shape."""
    shapes = [(batch, length, heads, dk)] * 2 + [(batch, length, heads, dv)] + [(batch, length, heads, dk)] * 2
    tensors = [torch.randn(s, dtype=dtype) for s in shapes] + [torch.randn(batch, heads, dk, dv)]
    return [x.requires_grad_(True) for x in tensors]


def check_empty(backend, batch, length, cu_seqlens=None, sequences=None):
    """o, final state and every gradient of the right shapes; empty sequences keep the initial state."""
    leaves = empty_case_inputs(batch, length)
    state0 = leaves[5] if sequences is None else torch.randn(sequences, 2, 16, 16).requires_grad_(True)
    leaves[5] = state0
    o, state = chunk_regla(*leaves[:5], initial_state=state0, output_final_state=True, cu_seqlens=cu_seqlens, backend=backend)
    assert o.shape == (batch, length, 2, 16) and state.shape == state0.shape and state.dtype == torch.float32
    (o.sum() + state.sum()).backward()
    for x in leaves:
        assert x.grad is not None and x.grad.shape == x.shape
    return state, state0


@pytest.mark.parametrize("backend", ["torch", "naive"])
@pytest.mark.parametrize("batch, length", [(2, 0), (0, 40), (0, 0)])
def test_empty_batch_or_sequence(backend, batch, length):
    state, state0 = check_empty(backend, batch, length)
    if length == 0:
        torch.testing.assert_close(state, state0.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_empty_packed_sequences_keep_the_initial_state(backend):
    cu = torch.tensor([0, 0, 30, 30, 70, 70], dtype=torch.int32)
    state, state0 = check_empty(backend, 1, 70, cu_seqlens=cu, sequences=5)
    for n in (0, 2, 4):
        torch.testing.assert_close(state[n], state0[n].detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "naive"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32), (torch.float64, torch.float16)])
def test_mixed_dtypes_work(backend, dtypes):
    q_dtype, other = dtypes
    q, k, v, z, u, _ = empty_case_inputs(1, 40, dtype=torch.float64)
    mixed = [q.detach().to(q_dtype)] + [x.detach().to(other) for x in (k, v, z, u)]
    o, state = chunk_regla(*mixed, output_final_state=True, backend=backend)
    assert o.dtype == q_dtype and torch.isfinite(o).all() and torch.isfinite(state).all()
    same = [x.to(torch.float64) for x in mixed]
    want, _ = chunk_regla(*same, output_final_state=True, backend="naive")
    torch.testing.assert_close(o.double(), want, rtol=2e-2, atol=2e-3)


def step_inputs(batch=2, heads=3, dk=16, dv=16):
    """q, k, v, z, u of one decode step, a state and a running key max of the right shapes."""
    q, k, z, u = (torch.randn(batch, heads, dk) for _ in range(4))
    return [q, k, torch.randn(batch, heads, dv), z, u], torch.randn(batch, heads, dk, dv), torch.randn(batch, heads)


def check_step_validation(backend):
    """Every malformed state / running key max raises a ValueError naming it and both shapes."""
    step, state, running = step_inputs()
    cases = [
        ("state", state[:, :, :8], running, "(2, 3, 16, 16)", "(2, 3, 8, 16)"),
        ("state", state[:1], running, "(2, 3, 16, 16)", "(1, 3, 16, 16)"),
        ("running_key_max", state, running[:, :2], "(2, 3)", "(2, 2)"),
        ("running_key_max", state, running[..., None], "(2, 3)", "(2, 3, 1)"),
    ]
    for name, bad_state, bad_running, expected, given in cases:
        with pytest.raises(ValueError, match=name) as error:
            regla_step(*step, bad_state, bad_running, backend=backend)
        assert expected in str(error.value) and given in str(error.value)
    with pytest.raises(ValueError, match="state"):
        regla_step(*step, state.to(torch.int32), running, backend=backend)


def test_step_validates_state_and_running_max():
    check_step_validation("torch")
