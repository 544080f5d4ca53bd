"""The public entry point of ReGLA over segments of longer sequences: the kernel side of
context parallelism by state passing (REGLA_SPEC section 4). The communication is the
caller's, through a `SegmentExchange` (`regla_kernels.exchange`, re-exported here);
`regla_megatron.context_parallel.regla` provides one for a torch.distributed group."""

from typing import Callable, Optional, Union

import torch

from regla_kernels.api import check_inputs
from regla_kernels.exchange import LocalSegmentExchange, SegmentExchange
from regla_kernels.gating import default_scale

__all__ = ["LocalSegmentExchange", "SegmentExchange", "chunk_regla_segments"]


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
    or any under TRITON_INTERPRET=1); `regla_kernels.triton.segments` has the algorithm.

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
    check_inputs(q, k, v, gate_logits, refine_logits, key_max if torch.is_tensor(key_max) else None, None, None)
    try:
        from regla_kernels.triton.segments import chunk_regla_segments_triton
    except ImportError as error:  # pragma: no cover - installs without triton
        raise NotImplementedError("chunk_regla_segments needs the Triton kernels, which do not import here") from error
    if scale is None:
        scale = default_scale(q.shape[-1])
    return chunk_regla_segments_triton(q, k, v, gate_logits, refine_logits, scale, key_max, exchange, initial_state)
