"""Megatron's layout on the Triton path in the interpreter: q, k, v, z, u as strided views of
an [s, b] projection, read in place, with o and the gradients written in the same order."""

import pytest
import torch

from regla_kernels import chunk_regla
from regla_kernels.triton.layout import one_layout
from regla_kernels.triton.settings import MIN_HEAD_DIM
from tests.kernels.triton.cases import make_inputs, relative_error

pytestmark = pytest.mark.interpreter

D = MIN_HEAD_DIM


@pytest.mark.parametrize(
    "gates_apart, packed",
    [(False, False), pytest.param(True, False, marks=pytest.mark.slow), pytest.param(False, True, marks=pytest.mark.slow)],
)
def test_strided_inputs_as_megatron_lays_them_out(gates_apart, packed, launch):
    """q, k, v, z, u as views of one [s, b, H, W] projection seen as [b, s] (Megatron's
    layout; z and u from a tensor of their own with gates_apart, as with a low-rank gate; B = 1
    with packed sequences): the kernels read them in place (no copy), write o and the input
    gradients in the same [s, b] order (nothing to transpose back), and give the outputs,
    final states and projection gradients of contiguous inputs through the fp64 recurrence."""
    launch.update(fast_limit=17.0)  # both kernel paths
    batch, length, heads, dk, dv = (1, 150, 2, 2 * D, D) if packed else (2, 150, 2, 2 * D, D)
    cu = torch.tensor([0, 37, 137, 150], dtype=torch.int32) if packed else None
    q, k, v, z, u, state = make_inputs(batch, length, heads, dk, dv, sequences=3 if packed else batch, logit_scale=1.0, seed=21)
    sizes = [dk, dk, dv] if gates_apart else [dk, dk, dv, dk, dk]
    parts = [q, k, v] if gates_apart else [q, k, v, z, u]
    proj = torch.cat(parts, dim=-1).transpose(0, 1).contiguous().requires_grad_(True)  # [s, b, H, W]
    gates = torch.cat([z, u], dim=-1).transpose(0, 1).contiguous().requires_grad_(True)
    state = state.requires_grad_(True)
    gen = torch.Generator().manual_seed(22)
    w_o = torch.randn(batch, length, heads, dv, generator=gen, dtype=torch.float64)
    w_s = torch.randn(state.shape, generator=gen, dtype=torch.float64)

    def run(backend, dtype):
        leaves = [x.detach().to(dtype).requires_grad_(True) for x in (proj, gates, state)]
        pieces = list(leaves[0].transpose(0, 1).split(sizes, dim=-1))
        if gates_apart:
            pieces += list(leaves[1].transpose(0, 1).split([dk, dk], dim=-1))
        if backend == "triton":
            assert all(x.data_ptr() >= leaves[0].data_ptr() for x in pieces[:3])
            assert one_layout(pieces[0], pieces[1]) == (pieces[0], pieces[1])  # read in place
            assert one_layout(pieces[3], pieces[4]) == (pieces[3], pieces[4])
        o, final = chunk_regla(*pieces, initial_state=leaves[2], output_final_state=True, cu_seqlens=cu, backend=backend)
        if backend == "triton" and not packed:  # o comes back in the [s, b] order of its inputs
            assert o.transpose(0, 1).is_contiguous()
            piece_grads = torch.autograd.grad((o.double() * w_o).sum(), pieces, retain_graph=True)
            assert all(g.transpose(0, 1).is_contiguous() for g in piece_grads)  # the gradients too
        loss = (o.double() * w_o).sum() + (final.double() * w_s).sum()
        grads = torch.autograd.grad(loss, leaves if gates_apart else [leaves[0], leaves[2]])
        return [o, final, *grads]

    got, ref = run("triton", torch.float32), run("naive", torch.float64)
    for index, (a, b) in enumerate(zip(got, ref)):
        assert torch.isfinite(a).all(), index
        error = relative_error(a, b)
        assert error < 2e-5, (index, error)
