"""ReGLA over segments of longer sequences whose other segments are processed elsewhere:
context parallelism by state passing (REGLA_SPEC section 4) in the Triton kernels.

Segment i of a sequence (global order) receives the state S_in(i) built by the segments
before it, S_in(i + 1) = Diag(exp(Lambda_i)) S_in(i) + S_loc(i), where S_loc(i) is its final
state from a zero start and Lambda_i its total log decay. Here, for the local segments:

forward : gates and states from a zero start (S_loc, Lambda and the chunk-start states h);
          `exchange.incoming(S_loc, Lambda, initial_state)` -> S_in (the communication);
          the output kernels with h + exp(decay from the segment start to the chunk) S_in,
          added while they load h (no extra pass, no re-run of the state pass).
backward: states again from a zero start, then the state gradients from this segment's
          own outputs only (G_i = their gradient w.r.t. S_in(i));
          `exchange.outgoing(G)` -> D(i + 1), the gradient at each local segment's end,
          from the reverse scan D(i) = G_i + Diag(exp(Lambda_i)) D(i + 1);
          the gradient kernels with h as above and dh + exp(decay from the chunk end to
          the segment end) D(i + 1), added while they load dh.
Both corrections are exact: the states and state gradients are linear in S_in and D, so
every gradient, gate logits included, is the one-sequence gradient.
"""

from typing import Optional, Tuple

import torch

from .segments import SegmentExchange
from .triton_chunk import (
    CHUNK_SIZE,
    _bwd_dstates,
    _bwd_main,
    _check,
    _chunk_tables,
    _fwd_output,
    _fwd_states,
    _gates,
)


def segment_chunk_decays(chunk_decay: torch.Tensor, segments: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From each chunk's own total log decay [chunks, H, dk] (equal-length segments, chunks in
    segment-major order): per chunk, the log decay from its segment's start to the chunk start
    and from the chunk end to the segment end (fp32 [chunks, H, dk] each), and each segment's
    total Lambda (fp32 [segments, H, dk])."""
    per_segment = chunk_decay.view(segments, -1, *chunk_decay.shape[1:])
    before = per_segment.cumsum(dim=1) - per_segment
    after = per_segment.flip(1).cumsum(dim=1).flip(1) - per_segment
    return before.reshape(chunk_decay.shape), after.reshape(chunk_decay.shape), per_segment.sum(dim=1)


class _SegmentsReGLATriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, z, u, initial_state, scale, key_max, exchange, cu, offsets, table, total):
        segments = cu.numel() - 1
        b, chunk_decay, flags, key_max = _gates(z, u, k, cu, table, total, key_max)
        h, local_states = _fwd_states(k, v, b, key_max, None, cu, offsets, total, True)
        before, after, log_decays = segment_chunk_decays(chunk_decay, segments)
        incoming = exchange.incoming(local_states, log_decays, initial_state).float().contiguous()
        o, q_max = _fwd_output(q, k, v, b, flags, key_max, h, table, cu, scale, total, h_carry=(incoming, before))
        del h
        ctx.save_for_backward(q, k, v, z, u, b, flags, key_max, q_max, incoming, before, after, cu, offsets, table)
        ctx.scale, ctx.total, ctx.exchange = scale, total, exchange
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, z, u, b, flags, key_max, q_max, incoming, before, after, cu, offsets, table = ctx.saved_tensors
        scale, total = ctx.scale, ctx.total
        do = do.contiguous()
        h, _ = _fwd_states(k, v, b, key_max, None, cu, offsets, total, False)
        dh, own = _bwd_dstates(q, q_max, b, do, None, cu, offsets, scale, total, v.shape[-1])
        at_end, initial_grad = ctx.exchange.outgoing(own)
        grads = _bwd_main(
            q, k, v, z, u, b, flags, key_max, q_max, h, dh, do, table, cu, scale, total,
            h_carry=(incoming, before), dh_carry=(at_end.float().contiguous(), after),
        )
        if ctx.initial_dtype is not None and initial_grad is not None:
            initial_grad = initial_grad.to(ctx.initial_dtype)
        else:
            initial_grad = None
        return (*grads, initial_grad, None, None, None, None, None, None, None)


def chunk_regla_segments_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_logits: torch.Tensor,
    refine_logits: torch.Tensor,
    scale: float,
    key_max: Optional[torch.Tensor],
    exchange: SegmentExchange,
    initial_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """ReGLA on N equal-length segments, each continuing the state `exchange` hands it.

    Args:
        q, k, gate_logits, refine_logits, v: the local segments, [N, L, H, d] each (dk for
            all but v, dv for v), any batch folded into N segment-major.
        scale: score factor.
        key_max: [N, H], the key max of each segment's whole sequence (detached); None takes
            each segment's own, which is right only for segments that are whole sequences.
        exchange: see `SegmentExchange`.
        initial_state: handed to `exchange.incoming` (the scan starts from it); its gradient
            is what `exchange.outgoing` returns for it.
    Returns:
        o [N, L, H, dv] in q's dtype.
    """
    _check(q, v)
    segments, length, heads, dk = q.shape
    dtype = q.dtype
    k, v, gate_logits, refine_logits = (x.to(dtype) for x in (k, v, gate_logits, refine_logits))
    cu = torch.arange(0, (segments + 1) * length, length, device=q.device, dtype=torch.int32)[: segments + 1]
    offsets, table, total = _chunk_tables(cu, CHUNK_SIZE)
    if key_max is not None:  # else the gates kernel takes each segment's own
        key_max = key_max.detach().float().contiguous()
    flat = [x.reshape(segments * length, heads, x.shape[-1]).contiguous() for x in (q, k, v, gate_logits, refine_logits)]
    o = _SegmentsReGLATriton.apply(
        *flat, initial_state, float(scale), key_max, exchange, cu, offsets, table, total
    )
    return o.reshape(segments, length, heads, v.shape[-1])
