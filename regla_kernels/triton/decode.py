"""One-token ReGLA decode step in Triton: the same gate (`refined_log_gate_tl`) and feature
maps as the chunked kernels, the state kept relative to a running key max
(`regla_kernels.decode`)."""

import torch
import triton
import triton.language as tl

from regla_kernels.triton.stages import refined_log_gate_tl


@triton.jit
def regla_step_kernel(
    q_ptr, k_ptr, v_ptr, z_ptr, u_ptr, state_ptr, max_ptr, o_ptr, new_state_ptr, new_max_ptr, scale,
    DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, HAS_STATE: tl.constexpr,
):
    """One (batch, head) and BV value columns: S = Diag(F) S exp(m_old - m_new) + phi_k^T v,
    o = scale phi_q S, with m the running key max."""
    bh = tl.program_id(0).to(tl.int64)
    iv = tl.program_id(1)
    rk = tl.arange(0, DK)
    rv = iv * BV + tl.arange(0, BV)
    q = tl.load(q_ptr + bh * DK + rk).to(tl.float32)
    k = tl.load(k_ptr + bh * DK + rk).to(tl.float32)
    log_f = refined_log_gate_tl(tl.load(z_ptr + bh * DK + rk).to(tl.float32), tl.load(u_ptr + bh * DK + rk).to(tl.float32))
    v = tl.load(v_ptr + bh * DV + rv).to(tl.float32)
    new_max = tl.max(k, axis=0)
    tile = bh * DK * DV + rk[:, None] * DV + rv[None, :]
    phi_k = tl.exp(k - new_max)
    if HAS_STATE:
        old_max = tl.load(max_ptr + bh)
        new_max = tl.maximum(new_max, old_max)
        phi_k = tl.exp(k - new_max)
        carry = tl.exp(log_f + (old_max - new_max))
        state = carry[:, None] * tl.load(state_ptr + tile) + phi_k[:, None] * v[None, :]
    else:
        state = phi_k[:, None] * v[None, :]
    phi_q = tl.exp(q - tl.max(q, axis=0))
    o = scale * tl.sum(phi_q[:, None] * state, axis=0)
    tl.store(o_ptr + bh * DV + rv, o.to(o_ptr.dtype.element_ty))
    tl.store(new_state_ptr + tile, state)
    if iv == 0:
        tl.store(new_max_ptr + bh, new_max)


def regla_step_triton(q, k, v, gate_logits, refine_logits, state, running_key_max, scale):
    """Backend of `regla_step` (`regla_kernels.decode` has the contract): q, k and both logits
    [B, H, dk], v [B, H, dv], state [B, H, dk, dv] and running_key_max [B, H] or both None.
    Returns o [B, H, dv] in q's dtype, the new fp32 state and the new running max (fp32 [B, H])."""
    batch, heads, dk = q.shape
    dv = v.shape[-1]
    o = torch.empty(batch, heads, dv, device=q.device, dtype=q.dtype)
    new_state = torch.empty(batch, heads, dk, dv, device=q.device, dtype=torch.float32)
    new_max = torch.empty(batch, heads, device=q.device, dtype=torch.float32)
    has_state = state is not None
    if has_state:
        state = state.float().contiguous()
        running_key_max = running_key_max.detach().float().contiguous()
    block_v = min(dv, 64)
    tensors = [x.contiguous() for x in (q, k, v, gate_logits, refine_logits)]
    regla_step_kernel[(batch * heads, dv // block_v)](
        *tensors, state if has_state else new_state, running_key_max if has_state else new_max, o, new_state, new_max,
        float(scale), DK=dk, DV=dv, BV=block_v, HAS_STATE=has_state, num_warps=4,
    )
    return o, new_state, new_max
