"""One-token ReGLA step for decoding (REGLA_SPEC section 5): PyTorch, or the Triton kernel of
`regla_kernels.triton.decode`.

The sequence key max M is unknown while decoding, so the state is kept relative to a
running max m: when a new key raises it, the state is rescaled by exp(m_old - m_new).
The output then differs from the chunked forward's by the positive factor
exp(M - m_t) per (token, head), which the per-head output norm removes.
"""

from typing import Optional, Tuple

import torch

from regla_kernels.gating import default_scale, key_feature_map, query_feature_map, refined_log_gate

STEP_BACKENDS = ("auto", "triton", "torch")


def _use_triton(backend: str, q: torch.Tensor, v: torch.Tensor) -> bool:
    if backend not in STEP_BACKENDS:
        raise ValueError(f"regla_step: unknown backend {backend!r}; choose one of {STEP_BACKENDS}")
    if backend == "torch":
        return False
    from regla_kernels.api import resolve_backend

    if backend == "auto":
        return resolve_backend("auto", q, v) == "triton"
    from regla_kernels.triton.settings import check_supported

    check_supported(q, v)  # clear errors for what the kernel cannot take
    return True


def check_step_state(q: torch.Tensor, v: torch.Tensor, state: torch.Tensor, running_key_max: torch.Tensor) -> None:
    """Raise ValueError (naming the argument, the expected and the given shape or dtype) unless
    state is a floating [B, H, dk, dv] and running_key_max a floating [B, H] for q [B, H, dk] and
    v [B, H, dv]: the Triton kernel reads them at those shapes."""
    batch, heads, dk = q.shape
    expected = {"state": (batch, heads, dk, v.shape[-1]), "running_key_max": (batch, heads)}
    for name, x in (("state", state), ("running_key_max", running_key_max)):
        if tuple(x.shape) != expected[name]:
            raise ValueError(f"regla_step: {name} must have shape {expected[name]} (from q and v), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"regla_step: {name} must be a floating tensor (float32 expected), got {x.dtype}")


def regla_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_logits: torch.Tensor,
    refine_logits: torch.Tensor,
    state: Optional[torch.Tensor],
    running_key_max: Optional[torch.Tensor],
    scale: Optional[float] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S = Diag(F) S + phi_k(k)^T v, o = scale * phi_q(q) S for one token.

    Args:
        q, k, gate_logits, refine_logits: [B, H, dk]; v: [B, H, dv].
        state: [B, H, dk, dv] float32 (relative to running_key_max) or None for an empty state.
        running_key_max: [B, H] float32, the max of every key seen so far, or None at the start.
            A state or running_key_max of another shape, or not floating, raises ValueError.
        scale: score factor; None means alpha of REGLA_SPEC section 1.
        backend: "auto" (the Triton step kernel for CUDA inputs it supports, else torch),
            "triton" or "torch".
    Returns:
        o [B, H, dv] in q's dtype, the new state (float32, float64 for float64 input),
        the new running key max [B, H] (float32, float64 for float64 input).
    """
    if q.dim() != 3 or k.shape != q.shape or gate_logits.shape != q.shape or refine_logits.shape != q.shape:
        raise ValueError(f"regla_step: q, k and both logits must be [B, H, dk], got {tuple(q.shape)}, {tuple(k.shape)}")
    if v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"regla_step: v must be [B, H, dv] with q's B, H, got {tuple(v.shape)}")
    if (state is None) != (running_key_max is None):
        raise ValueError("regla_step: give both state and running_key_max (a running decode) or neither (the first token)")
    if state is not None:
        check_step_state(q, v, state, running_key_max)
    if scale is None:
        scale = default_scale(q.shape[-1])
    if _use_triton(backend, q, v):
        from regla_kernels.triton.decode import regla_step_triton

        return regla_step_triton(q, k, v, gate_logits, refine_logits, state, running_key_max, scale)
    phi_q = query_feature_map(q)
    dtype = phi_q.dtype
    step_max = k.detach().to(dtype).amax(dim=-1)
    if running_key_max is None:
        new_max = step_max
    else:
        new_max = torch.maximum(running_key_max.detach().to(dtype), step_max)
    if state is None:
        state = q.new_zeros(*q.shape, v.shape[-1], dtype=dtype)
    else:
        state = state.to(dtype)
        if running_key_max is not None:
            state = state * torch.exp(running_key_max.to(dtype) - new_max)[..., None, None]
    phi_k = key_feature_map(k[:, None], new_max)[:, 0]
    decay = torch.exp(refined_log_gate(gate_logits, refine_logits)).to(dtype)
    state = decay[..., None] * state + phi_k[..., None] * v.to(dtype)[..., None, :]
    o = scale * torch.einsum("bhk,bhkv->bhv", phi_q, state)
    return o.to(q.dtype), state, new_max
