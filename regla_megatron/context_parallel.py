"""ReGLA under context parallelism: state passing over the CP group (REGLA_SPEC section 4).

Each CP rank holds some segments of every sequence (Megatron's layouts, below). The
layer output is exactly the one-process output, computed as:

Two implementations of the same math. Triton (CUDA tensors, `backend` "auto" or "triton"):
`regla_kernels.chunk_regla_segments` with `_CPExchange` below: the incoming states and the
state gradients are added inside the kernels (no correction pass); the all-gathers carry
(S_loc, Lambda) forward and the state gradients backward. Torch (CPU, any backend):

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

Layouts (the order of a rank's local tokens, `[B, T_local, H, d]`):
- "zigzag": Megatron's `get_batch_on_this_cp_rank`: the sequence is cut in 2 CP equal
  chunks and rank r holds chunk r then chunk 2 CP - 1 - r (two halves of T_local that
  are NOT adjacent in the sequence).
- "contiguous": rank r holds chunk r of CP equal chunks.
"""

import inspect
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from regla_kernels import (
    chunk_regla,
    chunk_regla_segments,
    cp_state_grad_scan,
    cp_state_scan,
    default_scale,
    inter_segment_output,
    resolve_backend,
    segment_log_decay,
    sequence_key_max,
)

CP_LAYOUTS = ("zigzag", "contiguous")


# --------------------------------------------------------------------------- layouts


def check_cp_layout(layout: str) -> None:
    """Raise ValueError unless `layout` is one of `CP_LAYOUTS`."""
    if layout not in CP_LAYOUTS:
        raise ValueError(f"unknown context-parallel layout {layout!r}; choose one of {CP_LAYOUTS}")


def cp_num_segments(layout: str, cp_size: int) -> int:
    """How many equal segments the full sequence is cut into: 2 CP (zigzag) or CP (contiguous)."""
    check_cp_layout(layout)
    return 2 * cp_size if layout == "zigzag" else cp_size


def cp_segment_indices(layout: str, cp_rank: int, cp_size: int) -> List[int]:
    """Sequence positions (segment indices) of the segments `cp_rank` holds, in local order."""
    check_cp_layout(layout)
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside [0, {cp_size})")
    return [cp_rank, 2 * cp_size - 1 - cp_rank] if layout == "zigzag" else [cp_rank]


def cp_token_positions(layout: str, cp_rank: int, cp_size: int, local_length: int, device=None) -> torch.Tensor:
    """Global sequence position of each local token: int64 `[local_length]`."""
    segments = cp_segment_indices(layout, cp_rank, cp_size)
    if local_length % len(segments):
        raise ValueError(
            f"{layout} context parallelism needs a local sequence length divisible by {len(segments)} "
            f"(the rank's {len(segments)} segments), got {local_length}"
        )
    length = local_length // len(segments)
    return torch.cat([torch.arange(j * length, (j + 1) * length, device=device) for j in segments])


def get_batch_cp_slice(
    tensor: torch.Tensor, cp_rank: int, cp_size: int, layout: str = "zigzag", seq_dim: int = 1
) -> torch.Tensor:
    """This rank's tokens of a full-sequence tensor, cut as Megatron's `get_batch_on_this_cp_rank`
    does for "zigzag" (and in CP plain chunks for "contiguous").

    Args:
        tensor: any shape, the full sequence along `seq_dim` (length divisible by the
            number of segments).
    Returns:
        The local tensor, sequence length / CP along `seq_dim` (a new tensor).
    """
    segments = cp_num_segments(layout, cp_size)
    length = tensor.shape[seq_dim]
    if length % segments:
        raise ValueError(
            f"{layout} context parallelism over {cp_size} ranks needs a sequence length divisible by {segments}, got {length}"
        )
    part = length // segments
    pieces = [tensor.narrow(seq_dim, j * part, part) for j in cp_segment_indices(layout, cp_rank, cp_size)]
    return torch.cat(pieces, dim=seq_dim)


def thd_cp_indices(cu_seqlens: torch.Tensor, cp_rank: int, cp_size: int, layout: str = "zigzag") -> torch.Tensor:
    """Positions of this rank's tokens in a packed (THD) batch: every sequence cut in 2 CP
    ("zigzag", the layout of TransformerEngine's `thd_get_partitioned_indices`, which Megatron's
    `get_thd_batch_on_this_cp_rank` uses) or CP ("contiguous") equal chunks, this rank's chunks
    of each sequence in sequence order.

    Args:
        cu_seqlens: [N + 1] int offsets of the packed sequences (padded: every length divisible
            by the number of chunks).
    Returns:
        int64 [T / CP] (on cu_seqlens' device).
    """
    segments = cp_num_segments(layout, cp_size)
    bounds = [int(b) for b in cu_seqlens.tolist()]
    pieces = []
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if (end - start) % segments:
            raise ValueError(
                f"packed sequence {n} has {end - start} tokens; {layout} context parallelism over {cp_size} ranks "
                f"needs every packed sequence length divisible by {segments} (pad them: cu_seqlens_q_padded)"
            )
        part = (end - start) // segments
        pieces += [torch.arange(start + j * part, start + (j + 1) * part) for j in cp_segment_indices(layout, cp_rank, cp_size)]
    return torch.cat(pieces).to(cu_seqlens.device)


def get_thd_cp_slice(
    tensor: torch.Tensor, cu_seqlens: torch.Tensor, cp_rank: int, cp_size: int, layout: str = "zigzag", seq_dim: int = 1
) -> torch.Tensor:
    """This rank's tokens of a packed (THD) tensor, per sequence as `thd_cp_indices` says.

    Returns:
        The local tensor (a new tensor), T / CP along `seq_dim`; its local offsets are
        cu_seqlens / CP.
    """
    return tensor.index_select(seq_dim, thd_cp_indices(cu_seqlens, cp_rank, cp_size, layout).to(tensor.device))


# --------------------------------------------------------------------------- collectives


def megatron_cp_batch(batch: Dict[str, torch.Tensor], cp_group) -> Dict[str, torch.Tensor]:
    """This CP rank's part of a batch dict, cut by Megatron's own `get_batch_on_this_cp_rank`.

    Bridges its signatures: 0.16 takes `(batch, cp_group=)`; 0.19 adds a required
    `is_hybrid_cp` and reads `batch["cu_seqlens"]` (None: plain zigzag over the sequence).
    Tensors are `[micro_batch, seq, ...]`; returns `[micro_batch, seq / CP, ...]`.
    """
    from megatron.core.utils import get_batch_on_this_cp_rank

    if "is_hybrid_cp" not in inspect.signature(get_batch_on_this_cp_rank).parameters:
        return get_batch_on_this_cp_rank(dict(batch), cp_group=cp_group)
    local = get_batch_on_this_cp_rank({"cu_seqlens": None, **batch}, is_hybrid_cp=False, cp_group=cp_group)
    return {key: local[key] for key in batch}


class _AllGatherFirstDim(torch.autograd.Function):
    """Forward: all-gather along dim 0 in rank order. Backward: reduce-scatter (the sum of
    the gradients over the group, this rank's slice). Both exist for gloo since torch 2.3
    (its reduce-scatter is an all-reduce + slice inside gloo)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = x.new_empty((dist.get_world_size(group) * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group),) + tuple(grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, group=ctx.group)
        return out, None


def all_gather_cp(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-gather over `group` along dim 0: `[n, ...]` -> `[world * n, ...]`."""
    return _AllGatherFirstDim.apply(x, group)


def cp_key_max(k: torch.Tensor, group) -> torch.Tensor:
    """The sequence key max M over the whole CP-sharded sequence: `[B, H]` fp32 (fp64 for fp64), detached."""
    return _cp_key_max_async(k, group)()


class _CPExchange:
    """The communication of the Triton segments path (`regla_kernels.chunk_regla_segments`) over a
    CP group: forward an all-gather of (S_loc, Lambda) and the scan; backward one all-gather
    of the state gradients G and the reverse scan. Local tensors are segment-major [n B, ...].

    Overlap: the collectives are asynchronous. Backward, the all-gather of G runs while the
    chunk-start states are recomputed. Forward, with `overlap_forward` (zigzag layout), one
    all-gather per local segment ("slot"): slot 0 gathers segments 0..CP-1 (each rank's early
    one) and slot 1 segments CP..2CP-1, so slot 0's incoming state needs only the first
    all-gather, which runs while slot 1's gates and states compute; the second runs while slot
    0's output computes. Off by default: on one H200 at B=1 the slot-by-slot forward is 11%
    slower than the one-pass forward (half the state pass's parallelism, benchmarks/runs/
    s3_2335/bench_segments.log), far more than an all-gather of a few MB costs."""

    def __init__(self, group, layout: str, batch: int, overlap_forward: bool = False):
        self.group = group
        self.layout = layout
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.mine = cp_segment_indices(layout, self.rank, self.size)
        self.slots = len(self.mine) if overlap_forward else 1
        self.batch = batch
        self._pending = []  # (slot, work, gathered summaries [CP, segments in the slot, B, H, dk, dv + 1])
        self._known = {}  # segment position -> its summary [B, H, dk, dv + 1]

    def _slot_positions(self, slot: int) -> List[int]:
        per = len(self.mine) // self.slots
        return self.mine[slot * per : (slot + 1) * per]

    def incoming(self, local_states, log_decays, initial_state):
        return self.start_incoming(0, local_states, log_decays, initial_state)()

    def start_incoming(self, slot, local_states, log_decays, initial_state):
        summary = torch.cat([local_states, log_decays.unsqueeze(-1)], dim=-1).contiguous()
        gathered = summary.new_empty((self.size * summary.shape[0],) + tuple(summary.shape[1:]))
        work = dist.all_gather_into_tensor(gathered, summary, group=self.group, async_op=True)
        self._pending.append((slot, work, gathered.view(self.size, -1, self.batch, *summary.shape[1:])))
        return lambda: self._incoming_of(slot, initial_state)

    def _incoming_of(self, slot, initial_state):
        while self._pending and self._pending[0][0] <= slot:
            done, work, gathered = self._pending.pop(0)
            work.wait()
            for rank in range(self.size):
                per = gathered.shape[1]
                positions = cp_segment_indices(self.layout, rank, self.size)[done * per : (done + 1) * per]
                self._known.update({j: gathered[rank, i] for i, j in enumerate(positions)})
        wanted = self._slot_positions(slot)
        summary = torch.stack([self._known[j] for j in range(max(wanted) + 1)])  # every segment up to ours
        dv = summary.shape[-1] - 1
        if len(self._known) == self.size * len(self.mine):
            self.log_decays = torch.stack([self._known[j][..., dv] for j in range(len(self._known))])
        return cp_state_scan(summary[..., :dv], summary[..., dv], initial_state=initial_state)[wanted].flatten(0, 1)

    def outgoing(self, incoming_grads):
        return self.start_outgoing(incoming_grads)()

    def start_outgoing(self, incoming_grads):
        local = incoming_grads.contiguous().view(len(self.mine), self.batch, *incoming_grads.shape[1:])
        gathered = local.new_empty((self.size * local.shape[0],) + tuple(local.shape[1:]))
        work = dist.all_gather_into_tensor(gathered, local, group=self.group, async_op=True)

        def finish():
            work.wait()
            at_end, initial_grad = cp_state_grad_scan(_in_sequence_order(gathered, self.layout, self.size), self.log_decays)
            # every rank computes the whole initial-state gradient: rank 0 holds it as its share
            initial_share = initial_grad if self.rank == 0 else torch.zeros_like(initial_grad)
            return at_end[self.mine].flatten(0, 1), initial_share

        return finish


def _cp_key_max_async(k: torch.Tensor, group, repeat: int = 1):
    """Start the all-reduce(MAX) of the local key maxima; returns a function that waits for it
    and gives the key max, repeated for `repeat` local segments ([repeat B, H], fp32 or fp64)."""
    key_max = sequence_key_max(k).contiguous()
    work = dist.all_reduce(key_max, op=dist.ReduceOp.MAX, group=group, async_op=True)

    def finish():
        work.wait()
        return key_max if repeat == 1 else key_max.repeat(repeat, 1)

    return finish


# --------------------------------------------------------------------------- the layer function


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
            `layout` order (see the module docstring); any float dtype.
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
            overlapped with the other segment's compute (see `_CPExchange`; slower unless the
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
        exchange = _CPExchange(cp_group, layout, batch, overlap_forward)
        key_max = _cp_key_max_async(k, cp_group, local)  # overlaps the first gates kernel
        out = chunk_regla_segments(q_s, k_s, v_s, z_s, u_s, exchange, key_max=key_max, scale=scale, initial_state=initial_state)
        return _from_segments(out, local)
    key_max = cp_key_max(k, cp_group)
    out, states = chunk_regla(
        q_s, k_s, v_s, z_s, u_s, scale=scale, key_max=key_max.repeat(local, 1), output_final_state=True, backend=backend
    )
    decays = segment_log_decay(z_s, u_s).to(states.dtype)
    summary = torch.cat([states, decays.unsqueeze(-1)], dim=-1).view(local, batch, heads, dk, dv + 1)

    in_order = _in_sequence_order(all_gather_cp(summary, cp_group), layout, cp_size)
    incoming = cp_state_scan(in_order[..., :dv], in_order[..., dv], initial_state=initial_state)

    correction = inter_segment_output(q_s, z_s, u_s, incoming[mine].reshape(local * batch, heads, dk, dv), scale)
    return _from_segments((out.to(correction.dtype) + correction).to(q.dtype), local)


def _in_sequence_order(gathered: torch.Tensor, layout: str, cp_size: int) -> torch.Tensor:
    """All-gathered per-rank segments [CP * n, ...] (rank order) -> sequence order."""
    local = gathered.shape[0] // cp_size
    where = {j: r * local + slot for r in range(cp_size) for slot, j in enumerate(cp_segment_indices(layout, r, cp_size))}
    return gathered[[where[j] for j in range(cp_size * local)]]


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
    in_order = _in_sequence_order(all_gather_cp(summary.contiguous(), group), layout, cp_size)
    incoming = cp_state_scan(in_order[..., :dv], in_order[..., dv], initial_state=initial_state)[mine]
    incoming = incoming.transpose(0, 1).reshape(sequences * local, heads, dk, dv)  # memory order
    corrections = [
        inter_segment_output(q[:, a:b], gate_logits[:, a:b], refine_logits[:, a:b], incoming[i : i + 1], scale)
        for i, (a, b) in enumerate(spans)
    ]
    correction = torch.cat(corrections, dim=1)
    return (out.to(correction.dtype) + correction).to(q.dtype)


__all__ = [
    "CP_LAYOUTS",
    "all_gather_cp",
    "check_cp_layout",
    "context_parallel_regla",
    "cp_key_max",
    "cp_num_segments",
    "cp_segment_indices",
    "cp_token_positions",
    "get_batch_cp_slice",
    "get_thd_cp_slice",
    "thd_cp_indices",
]
