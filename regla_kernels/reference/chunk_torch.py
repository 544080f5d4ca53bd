"""Chunked ReGLA in plain PyTorch: the CPU / fallback path (autograd by torch).

Chunks of C tokens; within a chunk every gate product is taken as exp(b_t - b_s) with
b the in-chunk cumulative log gate and s <= t, so every exponent is <= 0 and nothing
overflows whatever the gate saturation. REGLA_SPEC section 3.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from regla_kernels.gating import key_feature_map, query_feature_map, refined_log_gate

TORCH_CHUNK_SIZE = 32


def _to_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """[B, T, H, D] (T a multiple of chunk) -> [B, H, n, C, D]."""
    batch, length, heads, dim = x.shape
    return x.reshape(batch, length // chunk, chunk, heads, dim).permute(0, 3, 1, 2, 4)


def chunk_regla_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_logits: torch.Tensor,
    refine_logits: torch.Tensor,
    scale: float,
    key_max: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    chunk_size: int = TORCH_CHUNK_SIZE,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `naive_recurrent_regla`, computed chunk by chunk.

    Args:
        q, k, gate_logits, refine_logits: [B, T, H, dk]; v: [B, T, H, dv]; any T.
        scale: score factor. key_max: [B, H]. initial_state: [B, H, dk, dv] or None.
    Returns:
        o [B, T, H, dv] and final state [B, H, dk, dv], float32 (float64 for float64 input).
        Causal also for NaN / Inf inputs: a bad value at token t reaches no output before t.
    """
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    phi_q = query_feature_map(q)
    dtype = phi_q.dtype
    phi_k = key_feature_map(k, key_max)
    log_decay = refined_log_gate(gate_logits, refine_logits)
    values = v.to(dtype)
    pad = (-length) % chunk_size
    if pad:
        # Zero keys/values and zero log decay (F = 1) leave the state untouched.
        phi_q, phi_k, log_decay, values = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (phi_q, phi_k, log_decay, values))
    cq, ck, cv = _to_chunks(phi_q, chunk_size), _to_chunks(phi_k, chunk_size), _to_chunks(values, chunk_size)
    cum = _to_chunks(log_decay, chunk_size).cumsum(dim=3)  # b_t, [B, H, n, C, dk]

    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    pair = cum[..., :, None, :] - cum[..., None, :, :]  # b_t - b_s, [B, H, n, C(t), C(s), dk]
    pair = pair.masked_fill(~causal[:, :, None], float("-inf"))
    # Causal by selection (torch.where), not by products with zeros: a NaN or Inf key or value
    # at token s times a zero factor is NaN, which would reach the rows before s.
    terms = cq[..., :, None, :] * ck[..., None, :, :] * torch.exp(pair)
    scores = torch.where(causal[:, :, None], terms, 0.0).sum(dim=-1)  # [B, H, n, C(t), C(s)]
    out = torch.where(causal[:, :, None], scores[..., None] * cv[..., None, :, :], 0.0).sum(dim=-2)

    chunk_total = cum[..., -1:, :]  # b_C, [B, H, n, 1, dk]
    keys_to_end = ck * torch.exp(chunk_total - cum)  # phi_k(k_s) * exp(b_C - b_s)
    chunk_updates = torch.einsum("bhnsk,bhnsv->bhnkv", keys_to_end, cv)
    queries_from_start = cq * torch.exp(cum)

    state = q.new_zeros(batch, heads, dk, dv, dtype=dtype)
    if initial_state is not None:
        state = state + initial_state.to(dtype)
    inter = []
    for n in range(cq.shape[2]):
        inter.append(torch.einsum("bhtk,bhkv->bhtv", queries_from_start[:, :, n], state))
        state = torch.exp(chunk_total[:, :, n, 0, :, None]) * state + chunk_updates[:, :, n]
    if inter:
        out = out + torch.stack(inter, dim=2)
    out = scale * out  # T = 0: no chunks, an empty out that still depends on every input
    out = out.permute(0, 2, 3, 1, 4).reshape(batch, length + pad, heads, dv)[:, :length]
    return out, state
