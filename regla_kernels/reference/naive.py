"""The readable ReGLA recurrence, token by token: the test oracle (float64-capable)."""

from typing import Optional, Tuple

import torch

from regla_kernels.gating import key_feature_map, query_feature_map, refined_log_gate


def naive_recurrent_regla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_logits: torch.Tensor,
    refine_logits: torch.Tensor,
    scale: float,
    key_max: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """S_t = Diag(F_t) S_{t-1} + phi_k(k_t)^T v_t,  o_t = scale * phi_q(q_t) S_t.

    Args:
        q, k, gate_logits, refine_logits: [B, T, H, dk]; v: [B, T, H, dv].
        scale: the score factor (alpha by default at the API level).
        key_max: [B, H], the key stabilizer M.
        initial_state: [B, H, dk, dv] or None (zeros).
    Returns:
        o [B, T, H, dv] in the compute dtype (float64 for float64 inputs, else float32),
        final state [B, H, dk, dv] in the same dtype.
    """
    phi_q = query_feature_map(q)
    phi_k = key_feature_map(k, key_max)
    dtype = phi_q.dtype
    decay = torch.exp(refined_log_gate(gate_logits, refine_logits))
    values = v.to(dtype)
    batch, length, heads, dk = q.shape
    state = q.new_zeros(batch, heads, dk, v.shape[-1], dtype=dtype)
    if initial_state is not None:
        state = state + initial_state.to(dtype)
    if length == 0:  # an empty o that still depends on every input (gradients of their shapes)
        empty = torch.einsum("bthk,bthk,bthk,bthv->bthv", phi_q, phi_k, decay, values)
        return scale * empty, state
    outputs = []
    for t in range(length):
        state = decay[:, t, :, :, None] * state + phi_k[:, t, :, :, None] * values[:, t, :, None, :]
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", phi_q[:, t], state))
    return torch.stack(outputs, dim=1), state
