"""Shared inputs and checks of the interpreter tests: the Triton kernels against the fp64 naive
recurrence, at tiny shapes (head dims 16 to 128, T not a multiple of the chunk).

Not a test module. bf16 is checked on the GPU only (tests/gpu/): the interpreter's bf16
emulation does not reproduce the GPU's bf16 products.
"""

from typing import Callable, List, Optional, Sequence

import torch
import triton
import triton.language as tl

from regla_kernels import LocalSegmentExchange, chunk_regla, chunk_regla_segments, sequence_key_max
from regla_kernels.triton.stages import gate_slots

#: What `run_with` returns, in order.
NAMES = ["o", "final_state", "dq", "dk", "dv", "dgate", "drefine", "dinitial"]


def make_inputs(batch, length, heads, dk, dv, sequences=None, dtype=torch.float32, logit_scale=2.0, seed=0, saturated=False):
    """[q, k, v, z, u] ([B, T, H, dk], v [B, T, H, dv], in `dtype`) and an fp32 initial state
    [sequences or B, H, dk, dv], drawn in fp64 from `seed`. The gate logits are N(1, logit_scale^2),
    the refine logits N(0, logit_scale^2); `saturated`: both at +-30 (every gate rounds to 0 or 1)."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda d, s=1.0: s * torch.randn(batch, length, heads, d, generator=gen, dtype=torch.float64)
    q, k, v = draw(dk), draw(dk), draw(dv)
    if saturated:
        z, u = 30.0 * torch.sign(draw(dk)), 30.0 * torch.sign(draw(dk))
    else:
        z, u = draw(dk, logit_scale) + 1.0, draw(dk, logit_scale)
    state = torch.randn(sequences or batch, heads, dk, dv, generator=gen, dtype=torch.float64)
    return [x.to(dtype) for x in (q, k, v, z, u)] + [state.float()]


def packed_offsets(lengths: Sequence[int]) -> torch.Tensor:
    """cu_seqlens (int32 [N + 1]) of packed sequences of these lengths."""
    return torch.tensor([0] + list(torch.tensor(list(lengths)).cumsum(0)), dtype=torch.int32)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in fp64 (want's norm clamped away from 0)."""
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-300)).item()


def run_with(function: Callable, inputs: List[torch.Tensor], cu_seqlens=None) -> List[Optional[torch.Tensor]]:
    """Output, final state (None if `function` gives none) and every input gradient (`NAMES`) of
    a fixed random projection of both. function(q, k, v, z, u, initial_state=, cu_seqlens=)
    returns (o, final state or None); inputs as `make_inputs` gives them (fresh leaves here)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    o, state = function(*leaves[:5], initial_state=leaves[5], cu_seqlens=cu_seqlens)
    gen = torch.Generator().manual_seed(99)
    loss = (o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
    if state is not None:
        loss = loss + (state.double() * torch.randn(state.shape, generator=gen, dtype=torch.float64)).sum()
    loss.backward()
    return [o.detach(), None if state is None else state.detach()] + [x.grad for x in leaves]


def run_backend(backend: str, inputs, cu_seqlens=None, with_state=True, **options):
    """`run_with` of `chunk_regla(backend=backend, output_final_state=with_state, **options)`."""

    def function(*args, **kwargs):
        return chunk_regla(*args, **kwargs, output_final_state=with_state, backend=backend, **options)

    return run_with(function, inputs, cu_seqlens)


def compare(inputs, bound, cu_seqlens=None, gate_bound=None):
    """The Triton path against the fp64 naive recurrence: every output and gradient finite and
    within `bound` relative error. With `gate_bound` (saturated gates) the gate gradients are
    bound by their error against the key gradient's norm instead: their true values are ~1e-13
    (F is 0 or 1 to fp64), and the reverse-cumsum identity gives them to an absolute error of
    fp32 rounding of the q.dq and k.dk terms."""
    got = run_backend("triton", inputs, cu_seqlens)
    ref = run_backend("naive", [x.double() for x in inputs], cu_seqlens)
    for name, a, b in zip(NAMES, got, ref):
        assert torch.isfinite(a).all(), name
        if name in ("dgate", "drefine") and gate_bound is not None:
            error = ((a.double() - b).norm() / ref[3].norm()).item()
            assert error < gate_bound, (name, error)
        else:
            error = relative_error(a, b)
            assert error < bound, (name, error)


def assert_outputs_match(got, inputs, bound=2e-5, cu_seqlens=None):
    """`run_with` results of a path that gives no final state (segments) against the fp64
    recurrence's output and gradients."""
    ref = run_backend("naive", [x.double() for x in inputs], cu_seqlens, with_state=False)
    for name, a, b in zip(NAMES, got, ref):
        if name == "final_state":
            continue
        assert torch.isfinite(a).all(), name
        error = relative_error(a, b)
        assert error < bound, (name, error)


def cut_into_segments(x: torch.Tensor, segments: int) -> torch.Tensor:
    """[B, T, ...] -> [S B, T / S, ...] segment-major (segment j of every sequence, then j + 1)."""
    batch, length = x.shape[:2]
    return x.reshape(batch, segments, length // segments, *x.shape[2:]).transpose(0, 1).flatten(0, 1)


def join_segments(o: torch.Tensor, segments: int) -> torch.Tensor:
    """The inverse of `cut_into_segments`: [S B, L, ...] -> [B, S L, ...]."""
    batch = o.shape[0] // segments
    return o.reshape(segments, batch, *o.shape[1:]).transpose(0, 1).reshape(batch, segments * o.shape[1], *o.shape[2:])


def by_segments(segments: int, slots: int = 1, exchange_of=None, key_max_of=None):
    """A `run_with` function computing chunk_regla's output as `segments` equal segments per
    sequence (`chunk_regla_segments`), the state carried by a `LocalSegmentExchange` of `slots`
    slots (or `exchange_of(segments)`); key_max_of(k) may give the key max as a function."""

    def run(q, k, v, z, u, initial_state=None, cu_seqlens=None):
        key_max = sequence_key_max(k).repeat(segments, 1) if key_max_of is None else key_max_of(k)
        exchange = LocalSegmentExchange(segments, slots) if exchange_of is None else exchange_of(segments)
        pieces = (cut_into_segments(x, segments) for x in (q, k, v, z, u))
        o = chunk_regla_segments(*pieces, exchange, key_max=key_max, initial_state=initial_state)
        return join_segments(o, segments), None

    return run


def low_memory_equals_one_pass(inputs, cu_seqlens=None, mode=True):
    """The Triton path's outputs and gradients (`run_with`) with low_memory=mode, asserted bit for
    bit equal to the one-pass backward's; returns them."""
    one_pass = lambda *a, **kw: chunk_regla(*a, **kw, output_final_state=True, backend="triton")
    want = run_with(one_pass, inputs, cu_seqlens)
    got = run_with(lambda *a, **kw: one_pass(*a, **kw, low_memory=mode), inputs, cu_seqlens)
    for name, a, b in zip(NAMES, got, want):
        assert torch.equal(a, b), name
    return got


@triton.jit
def gate_slots_kernel(out_ptr, DK: tl.constexpr):
    """out[c] = gate_slots(c) for the DK features of a row of b (int64)."""
    cols = tl.arange(0, DK)
    tl.store(out_ptr + cols, gate_slots(cols, DK))


def feature_slots(dk: int) -> torch.Tensor:
    """`gate_slots` of features 0..dk-1: where a row of b keeps each feature (int64 [dk])."""
    slots = torch.empty(dk, dtype=torch.int64)
    gate_slots_kernel[(1,)](slots, DK=dk)
    return slots
