"""ReGLA over segments of longer sequences whose other segments are processed elsewhere:
context parallelism by state passing (REGLA_SPEC section 4) in the Triton kernels.

Segment i of a sequence (global order) receives the state S_in(i) built by the segments
before it, S_in(i + 1) = Diag(exp(Lambda_i)) S_in(i) + S_loc(i), where S_loc(i) is its final
state from a zero start and Lambda_i its total log decay. Here, for the local segments:

forward : gates and states from a zero start (S_loc, Lambda and the chunk-start states h);
          the exchange turns (S_loc, Lambda) into S_in (the communication);
          the output kernels with h + exp(decay from the segment start to the chunk) S_in
          (the fast kernel as a second product, q exp(b + decay) S_in; no extra pass, no
          re-run of the state pass).
          With an asynchronous exchange the local segments go in slots (Megatron's zigzag
          layout: the rank's early and late segment), and each slot's communication runs
          while the next slot's gates and states, then the previous slot's output, compute.
backward: the state gradients from this segment's own outputs only (G_i = their gradient
          w.r.t. S_in(i)); the exchange turns G into D(i + 1), the gradient at each local
          segment's end, by the reverse scan D(i) = G_i + Diag(exp(Lambda_i)) D(i + 1),
          while the chunk-start states are recomputed (that pass needs no D);
          the gradient kernels with h as above and dh + exp(decay from the chunk end to
          the segment end) D(i + 1) (the fast dv kernel as a second product).
Both corrections are exact: the states and state gradients are linear in S_in and D, so
every gradient, gate logits included, is the one-sequence gradient.
"""

from typing import Callable, Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from regla_kernels.exchange import SegmentExchange, start_incoming, start_outgoing
from regla_kernels.gating import sequence_key_max
from regla_kernels.triton.buffers import empty, gate_arena, value_grads
from regla_kernels.triton.fast import CARRY_REACH, REACHED_FROM_END, REACHED_FROM_START
from regla_kernels.triton.function import kept_arena
from regla_kernels.triton.launch import bwd_dstates, bwd_main, fwd_output, fwd_states, gates
from regla_kernels.triton.layout import regular_tables
from regla_kernels.triton.settings import check_supported, state_dtype


@triton.jit
def segment_decays_kernel(
    decay_ptr, before_ptr, after_ptr, total_ptr, reach_ptr, CHUNKS, H, DK, HB: tl.constexpr, BLOCK_DK: tl.constexpr,
):
    """One segment, HB of its heads (all DK features): walks the segment's CHUNKS chunks forward
    for the log decay from the segment start to each chunk start (exclusive running sum) and
    the total, then backward for the log decay from each chunk end to the segment end. Per
    chunk and head also the reach flags (int8): bit 1 when the state entering the segment still
    reaches the chunk (some feature's decay before it >= CARRY_REACH), bit 2 likewise for the
    state gradient from the segment end."""
    segment = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * HB + tl.arange(0, HB)
    features = tl.arange(0, BLOCK_DK)
    inside = heads < H
    cols = heads[:, None] * DK + features[None, :]
    tile = inside[:, None] & (features < DK)[None, :]
    base = segment * CHUNKS * H * DK + cols
    flags = segment * CHUNKS * H + heads
    start = tl.where(tile, 0.0, float("-inf"))  # padding features never count as reached
    running = start
    for c in range(CHUNKS):
        tl.store(before_ptr + base + c * H * DK, running, mask=tile)
        reached = (tl.max(running, axis=1) >= CARRY_REACH).to(tl.int8)
        tl.store(reach_ptr + flags + c * H, reached * REACHED_FROM_START, mask=inside)
        running += tl.load(decay_ptr + base + c * H * DK, mask=tile, other=0.0)
    tl.store(total_ptr + segment * H * DK + cols, running, mask=tile)
    running = start
    for step in range(CHUNKS):
        c = CHUNKS - 1 - step
        tl.store(after_ptr + base + c * H * DK, running, mask=tile)
        reached = (tl.max(running, axis=1) >= CARRY_REACH).to(tl.int8)
        start_bit = tl.load(reach_ptr + flags + c * H, mask=inside, other=0)
        tl.store(reach_ptr + flags + c * H, start_bit | (reached * REACHED_FROM_END), mask=inside)
        running += tl.load(decay_ptr + base + c * H * DK, mask=tile, other=0.0)


def segment_chunk_decays(chunk_decay: torch.Tensor, segments: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """From each chunk's own total log decay [chunks, H, dk] (equal-length segments, chunks in
    segment-major order): per chunk, the log decay from its segment's start to the chunk start
    and from the chunk end to the segment end (fp32 [chunks, H, dk] each), each segment's
    total Lambda (fp32 [segments, H, dk]), and the reach flags (int8 [chunks, H], bits
    REACHED_FROM_START / REACHED_FROM_END: whether a state carried from the segment start, or a
    gradient from its end, is not yet decayed to 0 there; `segment_decays_kernel`). One launch,
    running sums in fp32 (no difference of sums)."""
    chunk_decay = chunk_decay.float().contiguous()
    chunks, heads, dk = chunk_decay.shape
    before, after = torch.empty_like(chunk_decay), torch.empty_like(chunk_decay)
    total = torch.empty(segments, heads, dk, device=chunk_decay.device, dtype=torch.float32)
    reach = torch.empty(chunks, heads, device=chunk_decay.device, dtype=torch.int8)
    block_dk = triton.next_power_of_2(dk)
    per_program = max(1, 256 // block_dk)
    segment_decays_kernel[(segments, triton.cdiv(heads, per_program))](
        chunk_decay, before, after, total, reach, chunks // segments, heads, dk, HB=per_program, BLOCK_DK=block_dk, num_warps=2,
    )
    return before, after, total, reach


class KeyMaxOfSequences:
    """`key_max` of `chunk_regla_segments_triton` for sequences cut into `per_sequence` segments
    on this device, each sequence's in a row (sequence-major, one slot): the gates kernel takes
    each segment's key max and a sequence's is the max over its segments (no pass over k of its
    own)."""

    def __init__(self, per_sequence: int):
        self.per_sequence = per_sequence

    def combine(self, per_segment: torch.Tensor) -> torch.Tensor:
        """[N, H] per segment -> [N, H] per segment's sequence."""
        heads = per_segment.shape[-1]
        whole = per_segment.view(-1, self.per_sequence, heads).amax(1)
        return whole.repeat_interleave(self.per_sequence, dim=0)


class _Slot:
    """Slot `index` of `count` equal slots: its rows (tokens), chunks and segments, as slices of
    the flat segment-major tensors (contiguous views: the kernels write into them in place)."""

    def __init__(self, index: int, count: int, tokens: int, chunks: int, segments: int):
        part = lambda size: slice(index * size // count, (index + 1) * size // count)
        self.index, self.rows, self.chunks, self.segments = index, part(tokens), part(chunks), part(segments)


class _SegmentsReGLATriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, z, u, initial_state, scale, key_max, exchange, cu, offsets, table, total, slots):
        """Slot by slot (a slot: `segments / slots` whole segments, contiguous in memory): gates and
        states of every slot, each slot's summaries handed to the exchange as soon as they exist,
        then each slot's output once its incoming state is known. With an exchange that starts
        its communication asynchronously (`start_incoming`), slot s's communication runs while
        slot s + 1's gates and states (and slot s - 1's output) compute."""
        segments, (tokens, heads, dk), dv = cu.numel() - 1, q.shape, v.shape[-1]
        new = lambda *shape, dtype=torch.float32: empty(*shape, device=q.device, dtype=dtype)  # NaN under POISON
        arena = gate_arena(tokens, heads, dk, z.dtype, z.device)  # b, then the gate gradients over it
        b, chunk_decay = arena[0], new(total, heads, dk)
        flags = torch.empty(total, heads, device=q.device, dtype=torch.int8)
        h, local_states = new(total, heads, dk, dv, dtype=state_dtype(q.dtype)), new(segments, heads, dk, dv)
        o, q_max = new(tokens, heads, dv, dtype=q.dtype), new(tokens, heads)
        parts = [_Slot(i, slots, tokens, total, segments) for i in range(slots)]
        per, chunks = segments // slots, total // slots
        slot_cu, slot_offsets, slot_table = cu[: per + 1], offsets[:per], table[:chunks]

        waits, befores, afters, reaches = [], [], [], []
        for p in parts:
            rows = lambda x: x[p.rows]
            known, own = torch.is_tensor(key_max), isinstance(key_max, KeyMaxOfSequences)
            out = (rows(b), chunk_decay[p.chunks], flags[p.chunks])
            *_, found = gates(rows(z), rows(u), rows(k), slot_cu, slot_table, chunks, key_max if known else None, out=out, need_key_max=own)
            if own:
                key_max = key_max.combine(found)
            elif not known:
                key_max = key_max()  # a collective that ran during the first gates kernel
            out = (h[p.chunks], local_states[p.segments])
            fwd_states(rows(k), rows(v), rows(b), key_max[p.segments], None, slot_cu, slot_offsets, chunks, True, out=out)
            before, after, log_decays, reach = segment_chunk_decays(chunk_decay[p.chunks], per)
            befores.append(before)
            afters.append(after)
            reaches.append(reach)
            waits.append(start_incoming(exchange, p.index, local_states[p.segments], log_decays, initial_state))
        incoming = []
        for p, wait, before, reach in zip(parts, waits, befores, reaches):
            rows = lambda x: x[p.rows]
            incoming.append(wait().float().contiguous())
            fwd_output(
                rows(q), rows(k), rows(v), rows(b), flags[p.chunks], key_max[p.segments], h[p.chunks], slot_table, slot_cu,
                scale, chunks, h_carry=(incoming[-1], before, reach), out=(rows(o), rows(q_max)),
            )
        del h
        ctx.save_for_backward(
            q, k, v, z, u, *arena, flags, key_max, q_max, torch.cat(incoming), torch.cat(befores), torch.cat(afters), torch.cat(reaches),
            cu, offsets, table,
        )
        ctx.scale, ctx.total, ctx.exchange = scale, total, exchange
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        return o

    @staticmethod
    def backward(ctx, do):
        """The state-gradient pass first (it needs no h), its communication started, the
        chunk-start states recomputed meanwhile, then the gradient kernels."""
        q, k, v, z, u, b, dz, du, flags, key_max, q_max, incoming, before, after, reach, cu, offsets, table = ctx.saved_tensors
        scale, total = ctx.scale, ctx.total
        b, dz, du = kept_arena(ctx, (b, dz, du), z, u, k, key_max, cu, table, total)
        do = do.contiguous()
        dh, own = bwd_dstates(q, q_max, b, do, None, cu, offsets, scale, total, v.shape[-1])
        wait = start_outgoing(ctx.exchange, own)
        h, _ = fwd_states(k, v, b, key_max, None, cu, offsets, total, False)
        at_end, initial_grad = wait()
        grads = bwd_main(
            q, k, v, z, u, b, flags, key_max, q_max, h, dh, do, table, cu, scale, total,
            h_carry=(incoming, before, reach), dh_carry=(at_end.float().contiguous(), after, reach),
            out=(*value_grads(q, k, v), dz, du),
        )
        if ctx.initial_dtype is not None and initial_grad is not None:
            initial_grad = initial_grad.to(ctx.initial_dtype)
        else:
            initial_grad = None
        return (*grads, initial_grad, None, None, None, None, None, None, None, None)


def chunk_regla_segments_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_logits: torch.Tensor,
    refine_logits: torch.Tensor,
    scale: float,
    key_max: Union[torch.Tensor, Callable[[], torch.Tensor], "KeyMaxOfSequences", None],
    exchange: SegmentExchange,
    initial_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """ReGLA on N equal-length segments, each continuing the state `exchange` hands it.

    Args:
        q, k, gate_logits, refine_logits, v: the local segments, [N, L, H, d] each (dk for
            all but v, dv for v), any batch folded into N segment-major.
        scale: score factor.
        key_max: [N, H], the key max of each segment's whole sequence (detached), or a
            function returning it (called after the first gates kernel, so a collective that
            produces it overlaps that kernel), or `KeyMaxOfSequences` (sequences cut on this
            device: the gates kernel finds it); None takes each segment's own, which is right
            only for segments that are whole sequences.
        exchange: see `SegmentExchange` (its `slots`, when it has `start_incoming`, cuts the
            N segments into that many groups, processed as `_SegmentsReGLATriton` says).
        initial_state: handed to the exchange (the scan starts from it); its gradient is
            what the exchange returns for it.
    Returns:
        o [N, L, H, dv] in q's dtype.
    """
    check_supported(q, v)
    segments, length, heads, dk = q.shape
    dtype = q.dtype
    k, v, gate_logits, refine_logits = (x.to(dtype) for x in (k, v, gate_logits, refine_logits))
    slots = getattr(exchange, "slots", 1) if hasattr(exchange, "start_incoming") else 1
    if segments % slots:
        raise ValueError(f"chunk_regla_segments: {segments} segments do not split into the exchange's {slots} slots")
    cu, offsets, table, total = regular_tables(segments, length, q.device)
    if key_max is None:
        key_max = sequence_key_max(k)
    if isinstance(key_max, KeyMaxOfSequences):
        if slots != 1 or segments % key_max.per_sequence:
            raise ValueError("chunk_regla_segments: KeyMaxOfSequences needs one slot and whole sequences of segments")
    elif torch.is_tensor(key_max):
        key_max = key_max.detach().float().contiguous()
    else:
        pending = key_max
        key_max = lambda: pending().detach().float().contiguous()
    flat = [x.reshape(segments * length, heads, x.shape[-1]).contiguous() for x in (q, k, v, gate_logits, refine_logits)]
    o = _SegmentsReGLATriton.apply(
        *flat, initial_state, float(scale), key_max, exchange, cu, offsets, table, total, slots
    )
    return o.reshape(segments, length, heads, v.shape[-1])
