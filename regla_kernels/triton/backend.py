"""The Triton backend of `chunk_regla`: `chunk_regla_triton` picks the route for its inputs.

Routes: the one-pass Function (`function.ChunkReGLATriton`); the low-memory backward over time
windows (`windows.py`, `low_memory=True` or "backward"); few long sequences without a final
state asked for, cut into equal segments carried on this device (`segments.py`, the kernel path
of context parallelism; LAUNCH["segment_min_programs"]). The logits' bias goes into the kernels
on every route but the segments one, which adds it first.
"""

from typing import Optional, Tuple, Union

import torch

from regla_kernels.exchange import LocalSegmentExchange
from regla_kernels.gating import add_gate_bias, refined_log_gate
from regla_kernels.triton.buffers import arena_spilled
from regla_kernels.triton.function import ChunkReGLATriton
from regla_kernels.triton.launch import state_programs
from regla_kernels.triton.layout import batch_minor, chunk_tables, from_rows, one_layout, regular_tables
from regla_kernels.triton.segments import KeyMaxOfSequences, chunk_regla_segments_triton
from regla_kernels.triton.settings import CHUNK_SIZE, LAUNCH, check_supported, fast_limit, triton_supports
from regla_kernels.triton.windows import ChunkReGLATritonPackedWindowed, ChunkReGLATritonWindowed, chunks_per_window, packed_windows

__all__ = ["chunk_regla_triton", "empty_input_result", "fast_chunk_mask", "segments_per_sequence", "triton_supports"]


def fast_chunk_mask(gate_logits: torch.Tensor, refine_logits: torch.Tensor, limit: Optional[float] = None) -> torch.Tensor:
    """Which chunks take the whole-chunk product kernels: the torch twin of `stages.chunk_fast_flag`.

    Args:
        gate_logits, refine_logits: [B, T, H, dk] (one sequence per batch row).
        limit: the fast-path limit (default LAUNCH["fast_limit"]).
    Returns:
        bool [B, ceil(T / CHUNK_SIZE), H].
    """
    limit = fast_limit() if limit is None else float(limit)
    batch, length, heads, dk = gate_logits.shape
    log_f = refined_log_gate(gate_logits, refine_logits)
    pad = (-length) % CHUNK_SIZE
    log_f = torch.nn.functional.pad(log_f, (0, 0, 0, 0, 0, pad))
    b = log_f.reshape(batch, -1, CHUNK_SIZE, heads, dk).cumsum(dim=2)
    b_ref, b_end = b[:, :, CHUNK_SIZE // 2 - 1], b[:, :, -1]
    fast = (b_ref.amin(-1) >= -limit) & ((b_end - b_ref).amin(-1) >= -limit)
    return fast & (limit >= 0)


def segments_per_sequence(batch: int, heads: int, dk: int, dv: int, length: int) -> int:
    """How many equal segments (int: 1, 2, 4 or 8) `chunk_regla_triton` cuts each of B sequences
    of T tokens (H heads, head dims dk, dv) into when no final state is asked for
    (LAUNCH["segment_below_programs"], LAUNCH["segment_min_programs"])."""
    target = LAUNCH["segment_min_programs"]
    programs = state_programs(dk, dv, batch * heads)
    segments = 1
    if programs >= LAUNCH["segment_below_programs"]:
        return segments
    while target > 0 and segments < 8 and programs * segments < target and length % (2 * segments * CHUNK_SIZE) == 0:
        segments *= 2
    return segments


def by_segments(q, k, v, gate_logits, refine_logits, scale, key_max, initial_state, segments):
    """o [B, T, H, dv] in q's dtype with every sequence of q, k, z, u [B, T, H, dk], v [B, T, H,
    dv] cut into `segments` equal segments (sequence-major: a view), the states carried between
    them on this device; key_max [B, H] or None (found by the gates kernel)."""
    batch, length = q.shape[:2]
    cut = lambda x: x.reshape(batch * segments, length // segments, *x.shape[2:])
    key_max = KeyMaxOfSequences(segments) if key_max is None else key_max.repeat_interleave(segments, dim=0)
    exchange = LocalSegmentExchange(segments, sequence_major=True)
    o = chunk_regla_segments_triton(
        *(cut(x) for x in (q, k, v, gate_logits, refine_logits)), scale, key_max, exchange, initial_state,
    )
    return o.reshape(batch, length, *o.shape[2:])


def empty_input_result(q, k, v, gate_logits, refine_logits, initial_state, sequences: int):
    """(o, final state) of inputs without tokens (B = 0 or T = 0), which no kernel launches for:
    o [B, T, H, dv] empty in q's dtype, still depending on every input (gradients of their
    shapes), and the final state [N, H, dk, dv] fp32: initial_state, or zeros."""
    o = torch.einsum("bthk,bthk,bthk,bthk,bthv->bthv", q, k, gate_logits, refine_logits, v)
    state = q.new_zeros(sequences, q.shape[2], q.shape[3], v.shape[-1], dtype=torch.float32)
    if initial_state is not None:
        state = state + initial_state.float()
    return o, state


def chunk_regla_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_logits: torch.Tensor,
    refine_logits: torch.Tensor,
    scale: float,
    key_max: Optional[torch.Tensor],
    initial_state: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    output_final_state: bool = True,
    low_memory: Union[bool, str] = False,
    gate_bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Backend function of `chunk_regla` (`regla_kernels.api` has the contract): q, k,
    gate_logits, refine_logits [B, T, H, dk], v [B, T, H, dv] (bf16, fp16 or fp32; k, v and the
    logits are cast to q's dtype), key_max [N, H] or None, initial_state [N, H, dk, dv] or None,
    cu_seqlens [N + 1] int or None (then B = 1).

    gate_bias: [H, 2 dk], added to the logits inside the kernels (the segments route adds it
    first: its kernels take no bias).

    low_memory: True or "backward": the backward over time windows (`windows.ChunkReGLATritonWindowed`,
    with cu_seqlens `windows.ChunkReGLATritonPackedWindowed`, which keeps h per window in a buffer of
    its own), never as segments; "backward" keeps b from the forward, and h where it fits the
    gradient arena (without cu_seqlens; else the window start states), True computes both again.

    Returns o [B, T, H, dv] in q's dtype and the final state [N, H, dk, dv] in fp32 (None
    when output_final_state is False and the sequences went as segments, see
    LAUNCH["segment_min_programs"]).
    """
    check_supported(q, v)
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    dtype = q.dtype
    k, v, gate_logits, refine_logits = (x.to(dtype) for x in (k, v, gate_logits, refine_logits))
    if batch == 0 or length == 0:
        sequences = batch if cu_seqlens is None else cu_seqlens.numel() - 1
        return empty_input_result(q, k, v, gate_logits, refine_logits, initial_state, sequences)
    segments = 1 if cu_seqlens is not None or output_final_state or low_memory else segments_per_sequence(batch, heads, dk, dv, length)
    if gate_bias is not None and segments > 1:
        # added first: the segments path takes no bias of its own
        gate_logits, refine_logits = add_gate_bias(gate_logits, refine_logits, gate_bias)
        gate_bias = None
    if segments > 1:
        return by_segments(q, k, v, gate_logits, refine_logits, scale, key_max, initial_state, segments), None
    if cu_seqlens is None:
        cu, offsets, table, total = regular_tables(batch, length, q.device)
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
        offsets, table, total = chunk_tables(cu, CHUNK_SIZE)
    # Strided views go in as they are (no copies): q and k with one layout, z and u with another.
    q, k = one_layout(q, k)
    (v,) = one_layout(v)
    gate_logits, refine_logits = one_layout(gate_logits, refine_logits)
    if key_max is not None:  # else the gates kernel computes it
        key_max = key_max.detach().float().contiguous()
    h0 = None if initial_state is None else initial_state.contiguous()
    minor = cu_seqlens is None and batch_minor(q)
    args = (q, k, v, gate_logits, refine_logits, float(scale), key_max, h0, cu, offsets, table, total, minor)
    keep_gates = low_memory == "backward"
    if low_memory and cu_seqlens is not None and total > 0:
        windows = packed_windows(cu, offsets, total, chunks_per_window(1, total, heads, dk, dv, dtype, length))
        o, state = ChunkReGLATritonPackedWindowed.apply(*args, windows, keep_gates, gate_bias)
    elif low_memory and total > 0:
        spilled = arena_spilled(q, v, cu, total, length)
        in_grads = spilled is not None
        window_chunks = chunks_per_window(
            batch, total // batch, heads, dk, dv, dtype, batch * length, in_grads, starts=not (in_grads and keep_gates),
        )
        o, state = ChunkReGLATritonWindowed.apply(*args, window_chunks, keep_gates, spilled, gate_bias)
    else:
        spilled = arena_spilled(q, v, cu, total, None if cu_seqlens is not None else length)
        o, state = ChunkReGLATriton.apply(*args, spilled, gate_bias)
    return from_rows(o, batch, length, minor), state



# What `chunk_regla` may hand this backend (see `regla_kernels.api.chunk_regla`).
chunk_regla_triton.supports_cu_seqlens = True
chunk_regla_triton.computes_key_max = True
chunk_regla_triton.optional_final_state = True
chunk_regla_triton.supports_low_memory = True
chunk_regla_triton.supports_gate_bias = True
