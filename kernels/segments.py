"""The public entry point of ReGLA over segments of longer sequences: the kernel side of
context parallelism by state passing (REGLA_SPEC section 4). The communication is the
caller's, through a `SegmentExchange`; `regla_megatron.context_parallel` provides one for a
torch.distributed group."""

from typing import Callable, Optional, Protocol, Tuple, Union

import torch

from .chunk import _check_inputs
from .gating import default_scale
from .state_passing import cp_state_grad_scan, cp_state_scan


class SegmentExchange(Protocol):
    """The communication of `chunk_regla_segments` (one object per call).

    Optional, for overlapping the communication with compute: `slots` (int) and
    `start_incoming(slot, local_states, log_decays, initial_state)`, returning a function that
    gives S_in of that slot's segments ([N / slots, H, dk, dv] fp32); slot s holds local
    segments [s N / slots, (s + 1) N / slots), and is started before slot s + 1 is computed,
    and waited for before slot s's output. Likewise `start_outgoing(incoming_grads)`, returning
    a function that gives what `outgoing` returns. Without them, `incoming` and `outgoing`
    run synchronously."""

    def incoming(self, local_states: torch.Tensor, log_decays: torch.Tensor, initial_state: Optional[torch.Tensor]) -> torch.Tensor:
        """S_in of every local segment [N, H, dk, dv] fp32, from every segment's S_loc [N, H, dk, dv]
        and Lambda [N, H, dk] (fp32, this process's N local segments)."""

    def outgoing(self, incoming_grads: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(D(i + 1) [N, H, dk, dv] fp32 for every local segment, this process's share of the
        initial state's gradient or None), from G [N, H, dk, dv] fp32."""


class LocalSegmentExchange:
    """The exchange of a group of one: every segment of the sequences is in this process.

    Local tensors [S B, ...] for S segments per sequence and B sequences: segment-major
    (default; segment j of every sequence, then segment j + 1) or, with sequence_major, each
    sequence's S segments in a row (a plain reshape of [B, T] into [B S, T / S]). With
    `slots` > 1 (dividing S; segment-major only) it starts each slot's scan as soon as the
    slot's summaries exist, as a distributed exchange would start its communication.
    Use it to cut long sequences into segments on one device, or to test an exchange."""

    def __init__(self, segments: int, slots: int = 1, sequence_major: bool = False):
        if segments % slots:
            raise ValueError(f"LocalSegmentExchange: {segments} segments do not split into {slots} slots")
        if sequence_major and slots > 1:
            raise ValueError("LocalSegmentExchange: slots need the segment-major order")
        self.segments, self.slots, self.sequence_major = segments, slots, sequence_major
        self._summaries = []

    def _by_segment(self, x: torch.Tensor) -> torch.Tensor:
        """[S B, ...] in local order -> [S, B, ...]."""
        if self.sequence_major:
            return x.view(-1, self.segments, *x.shape[1:]).transpose(0, 1)
        return x.view(self.segments, -1, *x.shape[1:])

    def _to_local(self, x: torch.Tensor) -> torch.Tensor:
        """[S, B, ...] -> [S B, ...] in local order."""
        return (x.transpose(0, 1) if self.sequence_major else x).flatten(0, 1)

    def incoming(self, local_states, log_decays, initial_state):
        self.log_decays = self._by_segment(log_decays)
        return self._to_local(cp_state_scan(self._by_segment(local_states), self.log_decays, initial_state))

    def start_incoming(self, slot, local_states, log_decays, initial_state):
        if self.slots == 1:
            result = self.incoming(local_states, log_decays, initial_state)
            return lambda: result
        per = self.segments // self.slots
        self._summaries.append((local_states.reshape(per, -1, *local_states.shape[1:]), log_decays.reshape(per, -1, *log_decays.shape[1:])))

        def wait():
            states, decays = (torch.cat(parts) for parts in zip(*self._summaries[: slot + 1]))
            if len(self._summaries) == self.slots:
                self.log_decays = torch.cat([d for _, d in self._summaries])
            return cp_state_scan(states, decays, initial_state)[slot * per :].flatten(0, 1)

        return wait

    def outgoing(self, incoming_grads):
        at_end, initial_grad = cp_state_grad_scan(self._by_segment(incoming_grads), self.log_decays)
        return self._to_local(at_end), initial_grad


def chunk_regla_segments(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_logits: torch.Tensor,
    refine_logits: torch.Tensor,
    exchange: SegmentExchange,
    *,
    key_max: Union[torch.Tensor, Callable[[], torch.Tensor]],
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """ReGLA on N equal-length local segments, each continuing the state `exchange` hands it;
    exactly the one-pass result on the whole sequences. Triton kernels only (CUDA tensors,
    or any under TRITON_INTERPRET=1); `regla_kernels.triton_segments` has the algorithm.

    Args:
        q, k, gate_logits, refine_logits: [N, L, H, dk]; v: [N, L, H, dv] (the local segments,
            any batch folded into N segment-major).
        exchange: see `SegmentExchange`.
        key_max: [N, H], each segment's whole-sequence key max (all-reduced over the CP group),
            or a function returning it, called once the first gates kernel is launched (the
            all-reduce can run meanwhile).
        scale: score factor; None means alpha = 1 / (e sqrt(dk (e^2 - 1))).
        initial_state: state before each sequence's first token, handed to `exchange.incoming`.
    Returns:
        o [N, L, H, dv] in q's dtype.
    """
    _check_inputs(q, k, v, gate_logits, refine_logits, key_max if torch.is_tensor(key_max) else None, None, None)
    try:
        from .triton_segments import chunk_regla_segments_triton
    except ImportError as error:  # pragma: no cover - installs without triton
        raise NotImplementedError("chunk_regla_segments needs the Triton kernels, which do not import here") from error
    if scale is None:
        scale = default_scale(q.shape[-1])
    return chunk_regla_segments_triton(q, k, v, gate_logits, refine_logits, scale, key_max, exchange, initial_state)
