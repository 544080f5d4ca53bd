"""ReGLA under context parallelism: state passing over the CP group (REGLA_SPEC section 4).

Each CP rank holds some segments of every sequence (`layout.CP_LAYOUTS`: Megatron's zigzag,
or contiguous). The layer output is exactly the one-process output, computed in one of two
ways with the same math.

Triton (CUDA tensors, `backend` "auto" or "triton"): `regla_kernels.chunk_regla_segments` with
`communication.CPSegmentExchange`: the incoming states and the state gradients are added inside
the kernels (no correction pass); the all-gathers carry (S_loc, Lambda) forward and the state
gradients backward.

Torch (CPU, any backend):
1. key max: all-reduce(MAX) of the local per-(batch, head) key maxima;
2. a local `chunk_regla` pass per segment from a zero state, returning its final state
   S_loc, and the segment's total log decay Lambda;
3. ONE differentiable all-gather of (S_loc, Lambda) for every segment (backward: the sum
   of the gradients over the group, i.e. a reduce-scatter);
4. a scan over the segments in sequence order (`regla_kernels.cp_state_scan`) giving the
   state entering each local segment, S_in;
5. the correction `regla_kernels.inter_segment_output` added to the local output.

Communication per layer and micro-batch: forward one all-gather of
N_seg * B * H * dk * (dv + 1) fp32 values in total (N_seg = 2 CP zigzag, CP contiguous)
plus an all-reduce of B * H fp32; backward the matching reduce-scatter. Independent of
the sequence length.
"""

from typing import Optional

import torch
import torch.distributed as dist

from regla_kernels import (
    chunk_regla,
    chunk_regla_segments,
    cp_state_scan,
    default_scale,
    inter_segment_output,
    resolve_backend,
    segment_log_decay,
    sequence_key_max,
)
from regla_megatron.context_parallel.communication import CPSegmentExchange, all_gather_cp, cp_key_max, cp_key_max_async
from regla_megatron.context_parallel.layout import check_cp_layout, cp_num_segments, cp_segment_indices, in_sequence_order


def _to_segments(x: torch.Tensor, segments: int) -> torch.Tensor:
    """[B, n L, H, D] -> [n B, L, H, D], segment-major."""
    batch, length, heads, dim = x.shape
    return (
        x.reshape(batch, segments, length // segments, heads, dim)
        .transpose(0, 1)
        .reshape(segments * batch, -1, heads, dim)
    )


def _from_segments(x: torch.Tensor, segments: int) -> torch.Tensor:
    """[n B, L, H, D] -> [B, n L, H, D]."""
    batch = x.shape[0] // segments
    return x.reshape(segments, batch, *x.shape[1:]).transpose(0, 1).reshape(batch, -1, *x.shape[2:])


def context_parallel_regla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_logits: torch.Tensor,
    refine_logits: torch.Tensor,
    *,
    scale: Optional[float] = None,
    cp_group=None,
    layout: str = "zigzag",
    backend: str = "auto",
    initial_state: Optional[torch.Tensor] = None,
    overlap_forward: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`chunk_regla` over a sequence sharded across the context-parallel group.

    Every rank of `cp_group` must call it with the same B, H, dk, dv and T_local.

    Args:
        q, k, gate_logits, refine_logits: [B, T_local, H, dk], this rank's tokens in
            `layout` order (see `context_parallel.layout`); any float dtype.
        v: [B, T_local, H, dv].
        scale: score factor; None means alpha = 1 / (e sqrt(dk (e^2 - 1))).
        cp_group: the context-parallel process group (None or size 1: plain `chunk_regla`).
        layout: "zigzag" (Megatron's, T_local even) or "contiguous".
        backend: `chunk_regla` backend for the local passes.
        initial_state: [B, H, dk, dv] state before the sequence's first token, the same
            on every rank. Its gradient on each rank is that rank's share: the sum over
            the CP group is the one-process gradient (as for CP-replicated parameters,
            whose gradients Megatron sums over the DP x CP group).
        overlap_forward: Triton path, zigzag layout: the forward all-gather per local segment,
            overlapped with the other segment's compute (see `CPSegmentExchange`; slower unless the
            state pass has parallelism to spare). The backward's and the key max's collectives
            overlap compute either way.
        cu_seqlens: packed sequences (B = 1): this rank's LOCAL offsets [N + 1], each
            sequence's local tokens laid out as `thd_cp_indices` says (the global offsets / CP).
            One state and one key max per sequence; initial_state is then [N, H, dk, dv].
    Returns:
        o: [B, T_local, H, dv] in q's dtype, equal to the matching tokens of the
        one-process `chunk_regla` output (up to rounding).
    """
    check_cp_layout(layout)
    if scale is None:
        scale = default_scale(q.shape[-1])
    cp_size = 1 if cp_group is None else dist.get_world_size(cp_group)
    if cp_size == 1:
        return chunk_regla(
            q, k, v, gate_logits, refine_logits, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens, backend=backend
        )[0]
    if cu_seqlens is not None:
        return _packed_context_parallel_regla(
            q, k, v, gate_logits, refine_logits, cu_seqlens, scale, cp_group, layout, backend, initial_state
        )
    if q.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"context_parallel_regla: q and v must be [B, T_local, H, d], got {tuple(q.shape)} and {tuple(v.shape)}"
        )
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    mine = cp_segment_indices(layout, dist.get_rank(cp_group), cp_size)
    local = len(mine)
    if length % local:
        raise ValueError(
            f"context_parallel_regla: the {layout} layout holds {local} segments per rank, so the local "
            f"sequence length must be divisible by {local}; got T_local={length}"
        )
    if initial_state is not None and tuple(initial_state.shape) != (batch, heads, dk, dv):
        raise ValueError(
            f"context_parallel_regla: initial_state must be [{batch}, {heads}, {dk}, {dv}], got {tuple(initial_state.shape)}"
        )

    q_s, k_s, v_s, z_s, u_s = (_to_segments(x, local) for x in (q, k, v, gate_logits, refine_logits))
    if resolve_backend(backend, q, v) == "triton":
        exchange = CPSegmentExchange(cp_group, layout, batch, overlap_forward)
        key_max = cp_key_max_async(k, cp_group, local)  # overlaps the first gates kernel
        out = chunk_regla_segments(q_s, k_s, v_s, z_s, u_s, exchange, key_max=key_max, scale=scale, initial_state=initial_state)
        return _from_segments(out, local)
    key_max = cp_key_max(k, cp_group)
    out, states = chunk_regla(
        q_s, k_s, v_s, z_s, u_s, scale=scale, key_max=key_max.repeat(local, 1), output_final_state=True, backend=backend
    )
    decays = segment_log_decay(z_s, u_s).to(states.dtype)
    summary = torch.cat([states, decays.unsqueeze(-1)], dim=-1).view(local, batch, heads, dk, dv + 1)

    in_order = in_sequence_order(all_gather_cp(summary, cp_group), layout, cp_size)
    incoming = cp_state_scan(in_order[..., :dv], in_order[..., dv], initial_state=initial_state)

    correction = inter_segment_output(q_s, z_s, u_s, incoming[mine].reshape(local * batch, heads, dk, dv), scale)
    return _from_segments((out.to(correction.dtype) + correction).to(q.dtype), local)


def _packed_context_parallel_regla(q, k, v, gate_logits, refine_logits, cu_seqlens, scale, group, layout, backend, initial_state):
    """Packed sequences under CP (B = 1): the rank's segments of every sequence (two for zigzag)
    from a zero state through `chunk_regla` with one cu_seqlens entry per segment, one
    all-gather of their (S_loc, Lambda), a scan per sequence, and the inter-segment correction
    per segment (PyTorch; any backend for the local pass)."""
    cp_size, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = cp_segment_indices(layout, rank, cp_size)
    local = len(mine)
    if q.dim() != 4 or q.shape[0] != 1:
        raise ValueError(f"context_parallel_regla: packed sequences (cu_seqlens) need B = 1, got q of shape {tuple(q.shape)}")
    bounds = [int(b) for b in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != q.shape[1]:
        raise ValueError(f"context_parallel_regla: cu_seqlens must rise from 0 to the local length {q.shape[1]}, got {bounds}")
    for n, length in enumerate(b - a for a, b in zip(bounds[:-1], bounds[1:])):
        if length <= 0 or length % local:
            raise ValueError(
                f"context_parallel_regla: packed sequence {n} has {length} local tokens; {layout} context parallelism "
                f"needs a positive local length divisible by {local} per sequence (global length divisible by "
                f"{cp_num_segments(layout, cp_size)}: pad the sequences)"
            )
    sequences, heads, dk, dv = len(bounds) - 1, q.shape[2], q.shape[3], v.shape[-1]
    spans = [(a + i * (b - a) // local, a + (i + 1) * (b - a) // local) for a, b in zip(bounds[:-1], bounds[1:]) for i in range(local)]
    segment_cu = torch.tensor([0] + [end for _, end in spans], device=q.device, dtype=torch.int32)

    key_max = torch.cat([sequence_key_max(k[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])])  # [N, H], local
    dist.all_reduce(key_max, op=dist.ReduceOp.MAX, group=group)
    out, states = chunk_regla(
        q, k, v, gate_logits, refine_logits, scale=scale, key_max=key_max.repeat_interleave(local, dim=0),
        output_final_state=True, cu_seqlens=segment_cu, backend=backend,
    )
    decays = torch.cat([segment_log_decay(gate_logits[:, a:b], refine_logits[:, a:b]) for a, b in spans]).to(states.dtype)
    summary = torch.cat([states, decays.unsqueeze(-1)], dim=-1).view(sequences, local, heads, dk, dv + 1).transpose(0, 1)
    in_order = in_sequence_order(all_gather_cp(summary.contiguous(), group), layout, cp_size)
    incoming = cp_state_scan(in_order[..., :dv], in_order[..., dv], initial_state=initial_state)[mine]
    incoming = incoming.transpose(0, 1).reshape(sequences * local, heads, dk, dv)  # memory order
    corrections = [
        inter_segment_output(q[:, a:b], gate_logits[:, a:b], refine_logits[:, a:b], incoming[i : i + 1], scale)
        for i, (a, b) in enumerate(spans)
    ]
    correction = torch.cat(corrections, dim=1)
    return (out.to(correction.dtype) + correction).to(q.dtype)


__all__ = ["context_parallel_regla"]
