"""The gate side of the Triton kernels in the interpreter: the log-gate derivatives, the gates
kernel (b, chunk decays, flags, work list, key max), b's row layout (`gate_slots`) and the gate
gradients written over b."""

import pytest
import torch
import triton
import triton.language as tl

from regla_kernels import chunk_regla, refined_log_gate, sequence_key_max
from regla_kernels.triton.backend import fast_chunk_mask, segments_per_sequence
from regla_kernels.triton.buffers import gate_arena
from regla_kernels.triton.launch import gates, work_list
from regla_kernels.triton.layout import chunk_tables
from regla_kernels.triton.settings import CHUNK_SIZE, MIN_HEAD_DIM
from regla_kernels.triton.stages import GATE_BLOCK, refined_log_gate_grad_tl
from tests.kernels.triton.cases import NAMES, compare, feature_slots, make_inputs, packed_offsets, relative_error, run_backend

pytestmark = pytest.mark.interpreter

D = MIN_HEAD_DIM


@triton.jit
def _gate_derivatives_kernel(z_ptr, u_ptr, dz_ptr, du_ptr, BLOCK: tl.constexpr):
    """refined_log_gate_grad_tl over BLOCK logits per program (fp32)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    dz, du = refined_log_gate_grad_tl(tl.load(z_ptr + cols), tl.load(u_ptr + cols))
    tl.store(dz_ptr + cols, dz)
    tl.store(du_ptr + cols, du)


def _exact_gate_derivatives(z: float, u: float):
    """(d log F / dz, d log F / du) at 50 digits (mpmath): fp64 autograd of the log-space gate
    loses up to 1e-3 relative where 1 - g is about 1e-13 (saturated logits)."""
    import mpmath

    with mpmath.workdps(50):
        g, r = 1 / (1 + mpmath.exp(-z)), 1 / (1 + mpmath.exp(-u))
        w = g + 2 * r * (1 - g)
        return float((1 - g) + g * (1 - g) * (1 - 2 * r) / w), float(2 * r * (1 - r) * (1 - g) / w)


def test_gate_logit_derivatives_against_exact_values():
    """refined_log_gate_grad_tl (the backward's chain rule, 7 special-function calls) against
    50-digit values: logits of std 6 and the saturated corners, each derivative within fp32
    rounding of its own size (every term is positive: no cancellation, so even the 1e-26
    derivatives of saturated gates keep their relative accuracy)."""
    gen = torch.Generator().manual_seed(31)
    corners = torch.tensor([[-30.0, -30.0], [-30.0, 30.0], [30.0, -30.0], [30.0, 30.0], [0.0, 0.0], [-70.0, -60.0]])
    z = torch.cat([6 * torch.randn(250, generator=gen), corners[:, 0]])
    u = torch.cat([6 * torch.randn(250, generator=gen), corners[:, 1]])
    dz, du = torch.empty_like(z), torch.empty_like(u)
    _gate_derivatives_kernel[(z.numel() // 128,)](z, u, dz, du, BLOCK=128)
    exact = torch.tensor([_exact_gate_derivatives(a, b) for a, b in zip(z.tolist(), u.tolist())], dtype=torch.float64)
    for name, got, want in (("dz", dz, exact[:, 0]), ("du", du, exact[:, 1])):
        assert torch.isfinite(got).all(), name
        assert ((got.double() - want).abs() / want.abs()).max().item() < 1e-5, name


@pytest.mark.parametrize("warps, stages", [(1, 2), pytest.param(2, 1, marks=pytest.mark.slow)])
def test_gates_kernel(warps, stages, launch):
    """The token-by-token gates kernel gives each chunk's cumulative log gate b, total decay,
    fast-path flag (`fast_chunk_mask`, its torch twin), the sub-chunk work list and each
    sequence's key max as the torch functions do (packed sequences, fast and sub-chunk chunks
    mixed), and the whole forward and backward on top of it match the fp64 recurrence."""
    lengths = [37, 100, 13]
    cu = packed_offsets(lengths)
    inputs = make_inputs(1, sum(lengths), 2, 2 * D, 2 * D, sequences=len(lengths), logit_scale=1.0, seed=11)
    launch.update(fast_limit=17.0, gates_warps=warps, gates_stages=stages)
    offsets, table, total = chunk_tables(cu, CHUNK_SIZE)
    z, u, k = (x[0].contiguous() for x in (inputs[3], inputs[4], inputs[1]))
    work = work_list(chunks=total, heads=2, device=z.device)
    b, chunk_decay, flags, key_max = gates(z, u, k, cu, table, total, work=work)
    want_b, want_decay, want_flags, want_max = [], [], [], []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        zs, us = inputs[3][:, start:end].double(), inputs[4][:, start:end].double()
        log_f = refined_log_gate(zs, us)[0]  # [L, H, dk]
        padded = torch.nn.functional.pad(log_f, (0, 0, 0, 0, 0, (-(end - start)) % CHUNK_SIZE))
        cumulative = padded.reshape(-1, CHUNK_SIZE, *log_f.shape[1:]).cumsum(dim=1)
        want_b.append(cumulative.flatten(0, 1)[: end - start])
        want_decay.append(cumulative[:, -1])
        want_flags.append(fast_chunk_mask(zs, us)[0])
        want_max.append(sequence_key_max(inputs[1][:, start:end])[0])
    assert flags.any() and not flags.all(), flags
    assert torch.equal(flags.bool(), torch.cat(want_flags))
    count = work[0].item()
    assert sorted(work[1 : 1 + count].tolist()) == (flags.flatten() == 0).nonzero().flatten().tolist()  # the sub-chunk work list
    assert torch.equal(key_max, torch.stack(want_max).float())
    b = b[..., feature_slots(b.shape[-1])]  # b's rows are in `gate_slots` order
    torch.testing.assert_close(b.double(), torch.cat(want_b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunk_decay.double(), torch.cat(want_decay), rtol=1e-5, atol=1e-5)
    compare(inputs, bound=2e-5, cu_seqlens=cu)


@pytest.mark.parametrize("dk", [16, 64, 128, 256])
def test_gate_slots_keep_each_key_block_in_its_own_gradient_bytes(dk):
    """`gate_slots`: a permutation of a row of b under which the key features of each dq/dk key block
    (GATE_BLOCK wide) occupy exactly the bytes of that block's dz and du in a 16-bit row (dz's dk
    16-bit values, then du's), so a dq/dk program overwrites only the b it read."""
    slots = feature_slots(dk)
    assert sorted(slots.tolist()) == list(range(dk))
    block = min(dk, GATE_BLOCK.value)
    for first in range(0, dk, block):
        b_bytes = {4 * s + i for s in slots[first : first + block].tolist() for i in range(4)}
        grad_bytes = {2 * (half * dk + j) + i for half in (0, 1) for j in range(first, first + block) for i in range(2)}
        assert b_bytes == grad_bytes


def test_gate_arena_rows_are_b_rows():
    """`gate_arena`, 16-bit: b (fp32) and the gate-logit gradients share one buffer, row (t, h) of b
    being the bytes of row (t, h) of dz and then of du, and no other's; fp32: three buffers."""
    b, dz, du = gate_arena(5, 3, 16, torch.float16, torch.device("cpu"))
    assert b.dtype == torch.float32 and b.shape == dz.shape == du.shape == (5, 3, 16) and b.is_contiguous()
    assert dz.stride(-1) == du.stride(-1) == 1
    before = torch.randn(b.shape)
    b.copy_(before)
    dz[2, 1], du[2, 1] = 1.0, -2.0
    assert (b != before).any(-1).nonzero().tolist() == [[2, 1]] and (b[2, 1] != before[2, 1]).all()
    b, dz, du = gate_arena(5, 3, 16, torch.float32, torch.device("cpu"))
    assert len({x.data_ptr() for x in (b, dz, du)}) == 3


ROUTES = ["one pass", "low memory", "packed low memory", "segments", "one pass dk 128"]
DEFAULT_ROUTES = {("packed low memory", torch.float32), ("segments", torch.float16)}


@pytest.mark.parametrize(
    "route, dtype, bound",
    [
        pytest.param(route, dtype, bound, marks=() if (route, dtype) in DEFAULT_ROUTES else pytest.mark.slow)
        for route in ROUTES
        for dtype, bound in ((torch.float32, 2e-5), (torch.float16, 3e-3))
    ],
)
def test_gate_gradients_over_b_and_a_second_backward(route, dtype, bound, launch):
    """Every route keeps b in the gate gradients' buffer and writes them over it (`gate_arena`;
    16-bit: interleaved pairs): its results against the fp64 recurrence, and a second backward
    through the same graph (retain_graph: the first overwrote b) computes b again and gives the
    same gradients bit for bit."""
    launch.update(backward_windows=3, fast_limit=17.0, segment_min_programs=10**6)
    lengths = [37, 100, 1, 60] if route == "packed low memory" else None
    cu = None if lengths is None else packed_offsets(lengths)
    batch, length = (1, sum(lengths)) if lengths else (2, 128)
    dk, heads = (2 * D, 2) if route != "one pass dk 128" else (128, 1)  # 128: two key blocks, b's row permuted
    inputs = make_inputs(batch, length, heads, dk, D, sequences=len(lengths) if lengths else None, dtype=dtype, logit_scale=1.0, seed=61)
    with_state = route != "segments"  # without a final state asked for, these sequences go as 2 segments
    if route == "segments":
        assert segments_per_sequence(batch, heads, dk, D, length) == 2
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    o, state = chunk_regla(
        *leaves[:5], initial_state=leaves[5], cu_seqlens=cu, output_final_state=with_state, backend="triton",
        low_memory="backward" if route.endswith("low memory") else False,  # the windowed route that keeps b
    )
    gen = torch.Generator().manual_seed(99)
    loss = (o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
    if with_state:
        loss = loss + (state.double() * torch.randn(state.shape, generator=gen, dtype=torch.float64)).sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    ref = run_backend("naive", [x.double() for x in inputs], cu, with_state=with_state)
    for name, a, again, b in zip(NAMES[2:], first, second, ref[2:]):
        assert torch.equal(a, again), name
        assert relative_error(a, b) < bound, name
    assert relative_error(o, ref[0]) < bound
