"""`chunk_regla(gate_bias=...)` with the bias added inside the Triton kernels
in the interpreter, against the fp64 recurrence on biased logits."""

import pytest
import torch

from regla_kernels import chunk_regla
from regla_kernels.triton import function, windows
from tests.kernels.triton.cases import NAMES, make_inputs, packed_offsets, relative_error

pytestmark = pytest.mark.interpreter


def _run_with_bias(backend, inputs, bias, cu, low_memory):
    """o, the final state and every gradient (inputs, initial state, bias) of a fixed random
    projection, the gradients twice (retain_graph) and asserted equal."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (*inputs, bias)]
    o, state = chunk_regla(
        *leaves[:5], initial_state=leaves[5], gate_bias=leaves[6], cu_seqlens=cu, output_final_state=True, backend=backend,
        low_memory=low_memory,
    )
    gen = torch.Generator().manual_seed(99)
    loss = (o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
    loss = loss + (state.double() * torch.randn(state.shape, generator=gen, dtype=torch.float64)).sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    for index, (a, again) in enumerate(zip(first, torch.autograd.grad(loss, leaves))):
        assert torch.equal(a, again), index
    return [o.detach(), state.detach(), *first]


@pytest.mark.parametrize(
    "dk, dv, lengths, low_memory",
    [
        pytest.param(64, 64, None, False, marks=pytest.mark.slow),
        pytest.param(32, 16, None, True, marks=pytest.mark.slow),
        pytest.param(64, 64, None, "backward", marks=pytest.mark.slow),
        (32, 16, [37, 63, 50], False),
    ],
)
def test_gate_bias_inside_the_kernels(dk, dv, lengths, low_memory, launch, monkeypatch):
    """chunk_regla(gate_bias=...) on the Triton path: the bias goes into the kernels (no biased
    copy of the logits), through both kernel paths, the low-memory windows, packed sequences and
    a second backward; outputs and every gradient, the bias's included, against the fp64
    recurrence on biased logits."""
    launch.update(fast_limit=17.0, backward_windows=2)
    cu = None if lengths is None else packed_offsets(lengths)
    batch, length = (2, 150) if lengths is None else (1, sum(lengths))
    inputs = make_inputs(batch, length, 2, dk, dv, sequences=None if cu is None else len(lengths), logit_scale=1.0, seed=81)
    bias = torch.randn(2, 2 * dk, generator=torch.Generator().manual_seed(82))
    seen = []
    for module in (function, windows):  # the Functions' forwards turn the bias into the kernels' operand
        original = module.kernel_bias
        monkeypatch.setattr(module, "kernel_bias", lambda b, _f=original: seen.append(b) or _f(b))
    got = _run_with_bias("triton", inputs, bias, cu, low_memory)
    monkeypatch.undo()
    assert seen and seen[0] is not None, "the bias did not reach the kernels"
    ref = _run_with_bias("naive", [x.double() for x in inputs], bias.double(), cu, False)
    for name, a, b in zip(NAMES + ["dbias"], got, ref):
        assert relative_error(a, b) < 2e-5, name
