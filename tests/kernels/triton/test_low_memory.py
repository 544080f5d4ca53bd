"""The low-memory backward over time windows (`chunk_regla(low_memory=True or "backward")`) in
the interpreter: bit for bit the one-pass backward's numbers in fp32, the fp64 recurrence's,
the window count's memory rule, Megatron's layout and packed sequences."""

import math

import pytest
import torch

from regla_kernels import chunk_regla
from regla_kernels.triton.settings import CHUNK_SIZE, MIN_HEAD_DIM
from regla_kernels.triton.windows import chunks_per_window, window_bytes
from tests.kernels.triton.cases import NAMES, compare, low_memory_equals_one_pass, make_inputs, packed_offsets, relative_error, run_backend

pytestmark = pytest.mark.interpreter

D = MIN_HEAD_DIM


@pytest.mark.parametrize(
    "batch, length, windows, fast_limit, mode",
    [
        pytest.param(2, 150, 3, 17.0, True, marks=pytest.mark.slow),
        (1, 300, 8, 60.0, "backward"),
        pytest.param(2, 200, 2, -1.0, True, marks=pytest.mark.slow),
        pytest.param(2, 330, 0, 17.0, "backward", marks=pytest.mark.slow),
    ],
)
def test_low_memory_backward_over_windows(batch, length, windows, fast_limit, mode, launch):
    """low_memory=True (b computed again per window) and "backward" (b kept from the forward): the
    backward over time windows (each window's state pass from the start state the forward kept,
    the state gradient handed from window to window) gives in fp32 exactly the one-pass
    backward's numbers, bit for bit (the window start states are the fp32 states the one pass
    has there), and the fp64 recurrence's. Windows of 1, 2 and 2 chunks with a ragged last one,
    and as many as the memory rule picks (0); both kernel paths."""
    launch.update(backward_windows=windows, fast_limit=fast_limit)
    inputs = make_inputs(batch, length, 2, 2 * D, D, logit_scale=1.0, seed=41)
    low_memory_equals_one_pass(inputs, mode=mode)
    compare(inputs, bound=2e-5)


@pytest.mark.parametrize("in_grads, starts", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("batch, length, heads", [(32, 2048, 16), (8, 8192, 16), (2, 32768, 16), (1, 640, 2), (64, 128, 4)])
def test_window_count_keeps_the_memory_rule(batch, length, heads, in_grads, starts, launch):
    """backward_windows = 0: the fewest windows whose buffers (and start states, where the windows
    compute h again) stay within window_memory_fraction of the outputs (one window fewer would
    not), or where none does, the count with the fewest bytes; never more windows than chunks.
    For each accounting the low-memory modes use: h apart (fp16, packed), h in the gradient arena
    computed again per window (True), kept from the forward ("backward")."""
    d, dtype = 128, torch.bfloat16
    chunks = math.ceil(length / CHUNK_SIZE)
    launch.update(backward_windows=0)
    windows = math.ceil(chunks / chunks_per_window(batch, chunks, heads, d, d, dtype, batch * length, in_grads, starts))
    assert 1 <= windows <= min(16, chunks)
    budget = launch["window_memory_fraction"] * batch * length * heads * 6 * d * 2
    cost = lambda w: window_bytes(w, batch, chunks, heads, d, d, dtype, in_grads, starts)
    if cost(windows) <= budget:
        assert windows == 1 or cost(windows - 1) > budget
    else:
        assert all(cost(w) >= cost(windows) for w in range(1, min(16, chunks) + 1))
    if (batch, length) == (8, 8192):  # the record shape: under 2 GB with o and the gradients
        assert batch * length * heads * 6 * d * 2 + cost(windows) < 1.98e9


@pytest.mark.slow
def test_low_memory_backward_in_megatron_layout(launch):
    """The windowed backward on [s, b] views (Megatron's layout: b of a window has the whole
    tensors' row order there) against the one-pass backward, bit for bit, and its gradients in
    the same [s, b] order."""
    launch.update(backward_windows=3, fast_limit=17.0)
    inputs = make_inputs(3, 150, 2, D, D, logit_scale=1.0, seed=43)
    minor = [x.transpose(0, 1).contiguous().transpose(0, 1) for x in inputs[:5]] + inputs[5:]
    low_memory_equals_one_pass(minor)
    leaves = [x.detach().requires_grad_(True) for x in minor[:5]]
    o, _ = chunk_regla(*leaves, backend="triton", low_memory=True)
    grads = torch.autograd.grad(o.sum(), leaves)
    assert all(g.transpose(0, 1).is_contiguous() for g in grads)


@pytest.mark.parametrize("low_memory", [pytest.param(False, marks=pytest.mark.slow), True])
def test_gradients_through_one_output_alone(low_memory, launch):
    """A loss of the final state alone (o's gradient is None: not materialized as zeros) and of
    o alone (the final state's is None) against the fp64 recurrence."""
    launch.update(backward_windows=2)
    inputs = make_inputs(2, 100, 2, D, D, logit_scale=1.0, seed=45)
    for which in (0, 1):
        grads = []
        for backend, cast in (("triton", lambda x: x), ("naive", lambda x: x.double())):
            leaves = [cast(x).detach().requires_grad_(True) for x in inputs]
            outputs = chunk_regla(
                *leaves[:5], initial_state=leaves[5], output_final_state=True, backend=backend,
                **({"low_memory": low_memory} if backend == "triton" else {}),
            )
            found = torch.autograd.grad(outputs[which].double().pow(2).sum(), leaves, allow_unused=True)
            grads.append([torch.zeros_like(x) if g is None else g for g, x in zip(found, leaves)])  # q: no path to the state
        for index, (a, b) in enumerate(zip(*grads)):
            error = relative_error(a, b)
            assert error < 2e-5 or (b.norm() == 0 and a.norm() == 0), (which, index, error)


@pytest.mark.parametrize(
    "windows, lengths, mode",
    [
        pytest.param(3, [37, 100, 0, 1, 13, 190], True, marks=pytest.mark.slow),
        pytest.param(5, [300], "backward", marks=pytest.mark.slow),
        pytest.param(0, [64, 64, 65, 1], "backward", marks=pytest.mark.slow),
    ],
)
def test_low_memory_backward_with_packed_sequences(windows, lengths, mode, launch):
    """low_memory (True and "backward") with cu_seqlens: windows of global chunks holding pieces of one or more
    sequences (sequences cut by window edges, whole ones, an empty and a one-token one; one
    sequence over five windows; the window count of the memory rule): in fp32 bit for bit the
    one-pass backward's outputs and gradients (initial states included), and the fp64
    recurrence's where no sequence is empty."""
    launch.update(backward_windows=windows, fast_limit=17.0)
    cu = packed_offsets(lengths)
    inputs = make_inputs(1, sum(lengths), 2, 2 * D, D, sequences=len(lengths), logit_scale=1.0, seed=53)
    got = low_memory_equals_one_pass(inputs, cu, mode)
    if 0 in lengths:  # the fp64 recurrence takes no empty sequence (its key max)
        return
    ref = run_backend("naive", [x.double() for x in inputs], cu)
    for name, a, b in zip(NAMES, got, ref):
        assert relative_error(a, b) < 2e-5, name


def test_low_memory_with_no_tokens(launch):
    """Packed sequences that are all empty: the initial states come back as the final states and
    their gradients pass through, as without low_memory."""
    x = torch.zeros(1, 0, 2, D)
    h0 = torch.randn(2, 2, D, D, requires_grad=True)
    cu = torch.tensor([0, 0, 0], dtype=torch.int32)
    o, state = chunk_regla(x, x, x, x, x, initial_state=h0, cu_seqlens=cu, output_final_state=True, backend="triton", low_memory=True)
    assert o.shape == (1, 0, 2, D) and torch.equal(state, h0)
    weights = torch.randn(state.shape)
    (grad,) = torch.autograd.grad((state * weights).sum(), h0)
    assert torch.equal(grad, weights)
