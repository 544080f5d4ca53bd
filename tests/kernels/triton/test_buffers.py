"""The gradient arena in the interpreter: the chunk-start states h kept in the dq/dk buffer where
they fit (`buffers.GradArena`), its byte layout (`stages.state_offsets`), the rules that keep h
apart elsewhere, and the row copy of `copy_rows`."""

import pytest
import torch
import triton
import triton.language as tl

from regla_kernels import chunk_regla
from regla_kernels.triton import buffers
from regla_kernels.triton.layout import batch_minor
from regla_kernels.triton.rows import copy_rows_kernel
from regla_kernels.triton.stages import GATE_BLOCK, state_offsets
from tests.kernels.triton.cases import NAMES, low_memory_equals_one_pass, make_inputs, relative_error

pytestmark = pytest.mark.interpreter


@triton.jit
def _state_offsets_kernel(out_ptr, start, eos, R_T, spill, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BV: tl.constexpr):
    rk = tl.arange(0, DK)
    zero = tl.program_id(0)  # chunk 0 of sequence 0 (a grid of one program)
    for iv in tl.static_range(DV // BV):
        rv = iv * BV + tl.arange(0, BV)
        offsets = state_offsets(zero, zero, zero + 1, 2, rk, rv, start, eos, R_T, 0, spill, DK, DV, C, BV, True)
        tl.store(out_ptr + rk[:, None] * DV + rv[None, :], offsets)


@pytest.mark.parametrize("dk, dv, block_v", [(64, 64, 64), (128, 64, 32), (64, 128, 128), (128, 128, 64), (128, 128, 32)])
def test_states_in_the_gradient_arena_take_their_key_blocks_bytes(dk, dv, block_v):
    """`state_offsets` with IN_GRADS (h in the dq/dk gradient arena, `GradArena`): the GATE_BLOCK key
    rows ik of a whole chunk's h (head 1 of 2, tokens 5..68 of a sequence, read in value blocks of
    block_v) take distinct elements among exactly that chunk's dq and dk columns of key block ik,
    so a dq/dk program overwrites only the h it read; a shorter last chunk's h goes to the spill."""
    heads, head, first, chunk = 2, 1, 5, 64
    offsets = torch.empty(dk, dv, dtype=torch.int64)
    _state_offsets_kernel[(1,)](offsets, first, first + chunk, heads, 10**6, DK=dk, DV=dv, C=chunk, BV=block_v)
    assert offsets.unique().numel() == dk * dv
    block = GATE_BLOCK.value
    for ik in range(dk // block):
        owned = {
            ((first + t) * heads + head) * 2 * dk + part * dk + ik * block + j
            for t in range(chunk) for part in (0, 1) for j in range(block)
        }
        assert set(offsets[ik * block : (ik + 1) * block].flatten().tolist()) <= owned
    _state_offsets_kernel[(1,)](offsets, first, first + chunk - 1, heads, 10**6, DK=dk, DV=dv, C=chunk, BV=block_v)
    spill = 10**6 + head * dk * dv
    assert offsets.flatten().tolist() == list(range(spill, spill + dk * dv))


_PACKED = torch.tensor([0, 37, 137, 137, 138, 198], dtype=torch.int32)
# route: (batch, length, heads, dk, dv, cu_seqlens, low_memory)
_ROUTES = {
    "one pass": (2, 150, 2, 64, 64, None, False),
    "two key blocks": (1, 130, 1, 128, 64, None, False),
    "one h row per token": (2, 128, 1, 64, 128, None, False),
    "packed": (1, 198, 2, 64, 64, _PACKED, False),
    "low memory": (2, 150, 2, 64, 64, None, True),
    "low memory keeping b and h": (2, 150, 2, 64, 64, None, "backward"),
    "megatron order": (2, 150, 2, 64, 128, None, False),
    "megatron order, low memory": (2, 150, 2, 64, 64, None, True),
}
_DEFAULT_ROUTES = ("two key blocks",)


@pytest.mark.parametrize("route", [pytest.param(r, marks=() if r in _DEFAULT_ROUTES else pytest.mark.slow) for r in _ROUTES])
def test_states_in_the_gradient_arena(route, launch, monkeypatch):
    """Where h fits (fp32, dk a multiple of GATE_BLOCK, dv = GATE_BLOCK or twice it) the chunk-start
    states live in the dq/dk gradient arena (`GradArena`): the forward keeps them there and the
    dq/dk kernels write over them (the low-memory windows: recomputed per window into their rows,
    or kept). Both kernel paths (fast_limit 17), shorter last chunks (the spill), packed sequences
    with an empty and a one-token one, two key blocks: outputs and every gradient against the fp64
    recurrence; the low-memory modes bit for bit the one-pass backward's; a second backward
    through the same graph (the first overwrote h) bit for bit the first's. Megatron order: the
    inputs as [s, b] memory seen as [b, s] (the gradients' rows in that order too)."""
    batch, length, heads, dk, dv, cu, low_memory = _ROUTES[route]
    launch.update(fast_limit=17.0, backward_windows=2)
    made = []
    grad_arena = buffers.grad_arena
    monkeypatch.setattr(buffers, "grad_arena", lambda *args: made.append(args) or grad_arena(*args))
    sequences = None if cu is None else cu.numel() - 1
    inputs = make_inputs(batch, length, heads, dk, dv, sequences=sequences, logit_scale=1.0, seed=71)
    if route.startswith("megatron order"):  # [s, b] memory seen as [b, s]
        inputs = [x.transpose(0, 1).contiguous().transpose(0, 1) for x in inputs[:5]] + inputs[5:]
    if low_memory:
        low_memory_equals_one_pass(inputs, cu, low_memory)
    leaves = [x.detach().clone().requires_grad_(True) if x.dim() < 4 else x.detach().requires_grad_(True) for x in inputs]
    made.clear()
    o, state = chunk_regla(
        *leaves[:5], initial_state=leaves[5], cu_seqlens=cu, output_final_state=True, backend="triton", low_memory=low_memory,
    )
    gen = torch.Generator().manual_seed(99)
    w_o, w_s = (torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in (o, state))
    loss = (o.double() * w_o).sum() + (state.double() * w_s).sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    monkeypatch.undo()
    assert made, "h did not go to the gradient arena"
    if route.startswith("megatron order"):
        assert batch_minor(leaves[0]) and first[2].transpose(0, 1).is_contiguous()
    for name, a, again in zip(NAMES[2:], first, second):
        assert torch.equal(a, again), name
    # the fp64 recurrence, without the empty sequence (it takes none; its state passes through)
    kept = list(range(w_s.shape[0])) if cu is None else [n for n in range(cu.numel() - 1) if cu[n + 1] > cu[n]]
    ref_cu = None if cu is None else torch.unique_consecutive(cu)
    ref_leaves = [x.double().requires_grad_(True) for x in (*inputs[:5], inputs[5][kept])]
    ref_o, ref_state = chunk_regla(
        *ref_leaves[:5], initial_state=ref_leaves[5], cu_seqlens=ref_cu, output_final_state=True, backend="naive"
    )
    ref_loss = (ref_o * w_o).sum() + (ref_state * w_s[kept]).sum()
    ref = torch.autograd.grad(ref_loss, ref_leaves)
    for name, a, b in zip(NAMES[2:], (*first[:5], first[5][kept]), ref):
        assert relative_error(a, b) < 2e-5, name
    assert relative_error(o, ref_o) < 2e-5


def test_states_stay_apart_where_they_do_not_fit():
    """fp16 keeps fp32 states (twice the gradients' bytes), dv = 16 and dk = 32 key blocks have no
    room: h keeps a buffer of its own there; so do packed sequences whose spill (one state per
    sequence, all of them where one has a shorter last chunk) would outgrow h (one per chunk)."""
    assert buffers.states_fit_grads(64, 64, torch.float32) and buffers.states_fit_grads(128, 128, torch.bfloat16)
    assert not buffers.states_fit_grads(64, 64, torch.float16)
    assert not buffers.states_fit_grads(64, 16, torch.float32)
    assert not buffers.states_fit_grads(32, 64, torch.float32)
    q, v = torch.zeros(1, 10, 2, 64), torch.zeros(1, 10, 2, 64)
    many_empty = torch.tensor([0, 0, 0, 0, 10], dtype=torch.int32)
    assert buffers.arena_spilled(q, v, many_empty, 1, None) is None
    assert buffers.arena_spilled(q, v, torch.tensor([0, 10], dtype=torch.int32), 1, None) == 1
    assert buffers.arena_spilled(q, v, torch.tensor([0, 128], dtype=torch.int32), 2, 128) == 0


@pytest.mark.parametrize("d", [16, 128])
def test_row_copy_kernel_copies_strided_rows(d):
    """`copy_rows_kernel` (`copy_rows` on CUDA): rows of a strided source (a gradient pair
    buffer's second half) into a strided destination (a fused gradient's slice), nothing else
    written; a row count that is no multiple of its row block."""
    gen = torch.Generator().manual_seed(3)
    src = torch.randn(37, 2, d, generator=gen).to(torch.float16)[:, 1]
    dst = torch.zeros(37, 3 * d, dtype=torch.float16)
    copy_rows_kernel[(triton.cdiv(37, 8),)](src, dst[:, d:], 37, src.stride(0), dst.stride(0), D=d, BLOCK_ROWS=8)
    assert torch.equal(dst[:, d : 2 * d], src)
    assert not dst[:, :d].any() and not dst[:, 2 * d :].any()
