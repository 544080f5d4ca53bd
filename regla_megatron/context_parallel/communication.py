"""The collectives of ReGLA under context parallelism (REGLA_SPEC section 4).

- `all_gather_cp`: a differentiable all-gather over the CP group (backward: reduce-scatter);
- `cp_key_max` / `cp_key_max_async`: the all-reduce(MAX) of the per-(batch, head) key maxima;
- `CPSegmentExchange`: the asynchronous exchange of the Triton segments path, a
  `regla_kernels.SegmentExchange` over a torch.distributed group.
"""

from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from regla_kernels import cp_state_grad_scan, cp_state_scan, sequence_key_max
from regla_megatron.context_parallel.layout import cp_segment_indices, in_sequence_order


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
    """Differentiable all-gather over `group` along dim 0: `[n, ...]` -> `[world * n, ...]`,
    rank order, x's dtype. Its backward sums the gradients over the group (reduce-scatter)."""
    return _AllGatherFirstDim.apply(x, group)


def cp_key_max_async(k: torch.Tensor, group, repeat: int = 1) -> Callable[[], torch.Tensor]:
    """Start the all-reduce(MAX) of the local key maxima of k `[B, T_local, H, dk]`.

    Returns a function that waits for it and gives the key max over the whole CP-sharded
    sequence, repeated for `repeat` local segments: `[repeat B, H]`, fp32 (fp64 for fp64 k),
    detached.
    """
    key_max = sequence_key_max(k).contiguous()
    work = dist.all_reduce(key_max, op=dist.ReduceOp.MAX, group=group, async_op=True)

    def finish():
        work.wait()
        return key_max if repeat == 1 else key_max.repeat(repeat, 1)

    return finish


def cp_key_max(k: torch.Tensor, group) -> torch.Tensor:
    """The sequence key max M over the whole CP-sharded sequence, from k `[B, T_local, H, dk]`:
    `[B, H]` fp32 (fp64 for fp64 k), detached."""
    return cp_key_max_async(k, group)()


class CPSegmentExchange:
    """The communication of the Triton segments path (`regla_kernels.chunk_regla_segments`) over a
    CP group: forward an all-gather of (S_loc, Lambda) and the scan; backward one all-gather
    of the state gradients G and the reverse scan. Local tensors are segment-major [n B, ...]
    (n local segments, B sequences), fp32.

    Overlap: the collectives are asynchronous. Backward, the all-gather of G runs while the
    chunk-start states are recomputed. Forward, with `overlap_forward` (zigzag layout), one
    all-gather per local segment ("slot"): slot 0 gathers segments 0..CP-1 (each rank's early
    one) and slot 1 segments CP..2CP-1, so slot 0's incoming state needs only the first
    all-gather, which runs while slot 1's gates and states compute; the second runs while slot
    0's output computes. Off by default: on one H200 at B=1 the slot-by-slot forward measured
    11% slower than the one-pass forward (half the state pass's parallelism per launch), far
    more than an all-gather of a few MB costs.

    Args:
        group: the CP process group.
        layout: one of `CP_LAYOUTS`, the order of this rank's local segments.
        batch: B, the sequences per segment.
        overlap_forward: one forward all-gather per slot (see above).
    """

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

    def incoming(
        self, local_states: torch.Tensor, log_decays: torch.Tensor, initial_state: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """S_in of every local segment [n B, H, dk, dv] from S_loc [n B, H, dk, dv] and
        Lambda [n B, H, dk] (blocking)."""
        return self.start_incoming(0, local_states, log_decays, initial_state)()

    def start_incoming(self, slot: int, local_states, log_decays, initial_state) -> Callable[[], torch.Tensor]:
        """Start the all-gather of `slot`'s summaries (S_loc and Lambda as in `incoming`, that
        slot's segments); returns a function giving S_in of the slot's segments."""
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

    def outgoing(self, incoming_grads: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(D [n B, H, dk, dv] for every local segment, this rank's share of the initial state's
        gradient [B, H, dk, dv]) from G [n B, H, dk, dv] (blocking)."""
        return self.start_outgoing(incoming_grads)()

    def start_outgoing(self, incoming_grads: torch.Tensor) -> Callable[[], Tuple[torch.Tensor, torch.Tensor]]:
        """Start the all-gather of G; returns a function giving what `outgoing` returns."""
        local = incoming_grads.contiguous().view(len(self.mine), self.batch, *incoming_grads.shape[1:])
        gathered = local.new_empty((self.size * local.shape[0],) + tuple(local.shape[1:]))
        work = dist.all_gather_into_tensor(gathered, local, group=self.group, async_op=True)

        def finish():
            work.wait()
            at_end, initial_grad = cp_state_grad_scan(in_sequence_order(gathered, self.layout, self.size), self.log_decays)
            # every rank computes the whole initial-state gradient: rank 0 holds it as its share
            initial_share = initial_grad if self.rank == 0 else torch.zeros_like(initial_grad)
            return at_end[self.mine].flatten(0, 1), initial_share

        return finish


__all__ = ["CPSegmentExchange", "all_gather_cp", "cp_key_max", "cp_key_max_async"]
