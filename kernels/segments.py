"""The public entry point of ReGLA over segments of longer sequences: the kernel side of
context parallelism by state passing (REGLA_SPEC section 4). The communication is the
caller's, through a `SegmentExchange`; `regla_megatron.context_parallel` provides one for a
torch.distributed group."""

from typing import Optional, Protocol, Tuple

import torch

from .chunk import _check_inputs
from .gating import default_scale


class SegmentExchange(Protocol):
    """The communication of `chunk_regla_segments` (one object per call)."""

    def incoming(self, local_states: torch.Tensor, log_decays: torch.Tensor, initial_state: Optional[torch.Tensor]) -> torch.Tensor:
        """S_in of every local segment [N, H, dk, dv] fp32, from every segment's S_loc [N, H, dk, dv]
        and Lambda [N, H, dk] (fp32, this process's N local segments)."""

    def outgoing(self, incoming_grads: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(D(i + 1) [N, H, dk, dv] fp32 for every local segment, this process's share of the
        initial state's gradient or None), from G [N, H, dk, dv] fp32."""


def chunk_regla_segments(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_logits: torch.Tensor,
    refine_logits: torch.Tensor,
    exchange: SegmentExchange,
    *,
    key_max: torch.Tensor,
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
        key_max: [N, H], each segment's whole-sequence key max (all-reduced over the CP group).
        scale: score factor; None means alpha = 1 / (e sqrt(dk (e^2 - 1))).
        initial_state: state before each sequence's first token, handed to `exchange.incoming`.
    Returns:
        o [N, L, H, dv] in q's dtype.
    """
    _check_inputs(q, k, v, gate_logits, refine_logits, key_max, None, None)
    try:
        from .triton_segments import chunk_regla_segments_triton
    except ImportError as error:  # pragma: no cover - installs without triton
        raise NotImplementedError("chunk_regla_segments needs the Triton kernels, which do not import here") from error
    if scale is None:
        scale = default_scale(q.shape[-1])
    return chunk_regla_segments_triton(q, k, v, gate_logits, refine_logits, scale, key_max, exchange, initial_state)
