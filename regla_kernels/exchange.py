"""The communication of ReGLA over segments of longer sequences (REGLA_SPEC section 4).

`chunk_regla_segments` runs the local segments and asks a `SegmentExchange` for the states that
enter them (and, backward, for the state gradients at their ends); `LocalSegmentExchange` is the
exchange of a group of one, and `regla_megatron.context_parallel.regla` has one for a
torch.distributed group. `start_incoming` and `start_outgoing` call an exchange the way the
kernels do, with or without its asynchronous methods. Plain PyTorch: no Triton import.
"""

from typing import Callable, Optional, Protocol, Tuple

import torch

from regla_kernels.state_passing import cp_state_grad_scan, cp_state_scan


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
        """S_in of every local segment (fp32 [S B, H, dk, dv]) by the scan over each sequence's
        segments (`cp_state_scan`); see `SegmentExchange.incoming`."""
        self.log_decays = self._by_segment(log_decays)
        return self._to_local(cp_state_scan(self._by_segment(local_states), self.log_decays, initial_state))

    def start_incoming(self, slot, local_states, log_decays, initial_state):
        """Slot `slot`'s summaries (S_loc [S B / slots, H, dk, dv], Lambda [S B / slots, H, dk]);
        returns the function that gives its segments' S_in once the slots before it have come
        in (fp32 [S B / slots, H, dk, dv]; slots are started in order)."""
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
        """(D(i + 1) fp32 [S B, H, dk, dv], the initial state's gradient or None) from G by the
        reverse scan (`cp_state_grad_scan`); see `SegmentExchange.outgoing`."""
        at_end, initial_grad = cp_state_grad_scan(self._by_segment(incoming_grads), self.log_decays)
        return self._to_local(at_end), initial_grad


def start_incoming(
    exchange: SegmentExchange, slot: int, local_states: torch.Tensor, log_decays: torch.Tensor, initial_state: Optional[torch.Tensor]
) -> Callable[[], torch.Tensor]:
    """Start the exchange's incoming states of one slot; returns the function that waits for them
    (S_in [N / slots, H, dk, dv] fp32). The exchange's `start_incoming` when it has one, else its
    `incoming` run now (one slot only). Arguments as in `SegmentExchange.incoming`."""
    if hasattr(exchange, "start_incoming"):
        return exchange.start_incoming(slot, local_states, log_decays, initial_state)
    result = exchange.incoming(local_states, log_decays, initial_state)
    return lambda: result


def start_outgoing(exchange: SegmentExchange, incoming_grads: torch.Tensor) -> Callable[[], Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Start the exchange's outgoing state gradients from G [N, H, dk, dv] fp32; returns the
    function that waits for what `SegmentExchange.outgoing` returns. The exchange's
    `start_outgoing` when it has one, else its `outgoing` run now."""
    if hasattr(exchange, "start_outgoing"):
        return exchange.start_outgoing(incoming_grads)
    result = exchange.outgoing(incoming_grads)
    return lambda: result
