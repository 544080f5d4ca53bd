"""Chunked ReGLA in Triton: forward and backward with the feature maps, the key-max
stabilizer, the refined log gate and the scale fused into the kernels.

Stages (kernels in `triton_stages.py`):
  forward : chunk_fwd_states (sequential over chunks: state at every chunk start, final state)
            chunk_fwd_output (parallel over chunks: intra-chunk scores + state term)
  backward: chunk_fwd_states again (recompute the chunk-start states, cheaper than storing)
            chunk_bwd_dstates (reverse over chunks: state gradients, initial-state gradient)
            chunk_bwd_main (parallel over chunks: dq, dk, dv and both gate-logit gradients)
The only pass outside the kernels is the key-max reduction (one max per sequence and head).

Layout [B, T, H, D] (or B = 1 with `cu_seqlens`), any T (masked, no padding copies),
bf16/fp16/fp32 inputs, fp32 state and accumulation, dk and dv powers of two in
[MIN_HEAD_DIM, MAX_HEAD_DIM].
"""

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .gating import sequence_key_max
from .triton_stages import (
    chunk_bwd_dstates_kernel,
    chunk_bwd_main_kernel,
    chunk_fwd_output_kernel,
    chunk_fwd_states_kernel,
)

CHUNK_SIZE = 64
SUB_CHUNK_SIZE = 16
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Launch settings (benchmarks may override them); POISON fills every output with NaN
# before the kernels write it, so a check sees any element they miss.
LAUNCH = {
    "sub_chunk": SUB_CHUNK_SIZE,
    "states_warps": 8,
    "output_warps": 8,
    "bwd_warps": 8,
    "block_v": 64,
    "block_k": 64,
    # Diagonal sub-chunk blocks: with diag_limit >= 0 they take one masked product wherever
    # every sub-chunk's log decay is >= -diag_limit (factors within e^+-diag_limit), else the
    # elementwise loop. -1 means elementwise always: the setting the H200 check passed with
    # (benchmarks/NOTES_kernels.md); 40 is 1.5x faster but its backward is not yet checked there.
    "diag_limit": -1.0,
}
POISON = os.environ.get("REGLA_TRITON_POISON", "0") == "1"


def _empty(*shape, device, dtype):
    if POISON:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(*shape, device=device, dtype=dtype)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(q: torch.Tensor, v: torch.Tensor) -> None:
    dk, dv = q.shape[-1], v.shape[-1]
    for name, d in (("dk", dk), ("dv", dv)):
        if d < MIN_HEAD_DIM or d > MAX_HEAD_DIM or d & (d - 1):
            raise ValueError(
                f"chunk_regla(backend='triton'): {name}={d} unsupported; head dims must be powers of two "
                f"in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] (use backend='torch')"
            )
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"chunk_regla(backend='triton'): dtype {q.dtype} unsupported; use one of "
            f"{[str(d) for d in SUPPORTED_DTYPES]} (float64: backend='torch')"
        )
    if not q.is_cuda and not _interpreting():
        raise RuntimeError("chunk_regla(backend='triton'): needs CUDA tensors (or TRITON_INTERPRET=1); use backend='torch' on CPU")


def _dot_dtype(dtype: torch.dtype):
    """Matrix-product operand dtype: bf16 for bf16 inputs, else fp32 (tf32 on the GPU)."""
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float32


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of the per-chunk states: bf16 for bf16 inputs (the product operand anyway), else fp32."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _chunk_tables(cu_seqlens: torch.Tensor, chunk: int):
    """Per sequence: first global chunk; per global chunk: (sequence, chunk in sequence)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    counts = (lengths + chunk - 1) // chunk
    offsets = torch.zeros_like(counts)
    offsets[1:] = torch.cumsum(counts, 0)[:-1]
    total = int(counts.sum().item())
    seq = torch.repeat_interleave(torch.arange(len(counts), device=cu_seqlens.device), counts)
    local = torch.arange(total, device=cu_seqlens.device) - offsets[seq]
    table = torch.stack([seq, local], dim=1).to(torch.int32).contiguous()
    return offsets.to(torch.int32).contiguous(), table, total


def _packed_key_max(k: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """One key max per packed sequence and head: [N, H] (the only separate pass over k)."""
    rows = k[0].detach().float().amax(dim=-1)  # [T, H]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=k.device), lengths)
    out = torch.full((len(lengths), k.shape[2]), float("-inf"), device=k.device, dtype=torch.float32)
    return out.scatter_reduce(0, seq[:, None].expand_as(rows), rows, reduce="amax", include_self=True)


def _block_v(dv: int) -> int:
    return min(dv, LAUNCH["block_v"])


def _block_k(dk: int) -> int:
    """Key block of the sequential state stages (more programs in flight at long T)."""
    return min(dk, LAUNCH["block_k"])


def _bwd_block_v(dv: int, dtype: torch.dtype) -> int:
    """Value block of the backward main stage: 32 with fp32 product operands keeps it in shared memory."""
    return min(dv, LAUNCH["block_v"] if dtype == torch.bfloat16 else 32)


def _fwd_states(k, v, z, u, key_max, h0, cu, offsets, total, store_final):
    """States at every chunk start (h), the final state (fp32) and the sub-chunk cumulative gates (bw)."""
    tokens, heads, dk = k.shape
    dv = v.shape[-1]
    n = cu.numel() - 1
    h = _empty(total, heads, dk, dv, device=k.device, dtype=_state_dtype(k.dtype))
    ht = _empty(n, heads, dk, dv, device=k.device, dtype=torch.float32) if store_final else h
    bw = _empty(tokens, heads, dk, device=k.device, dtype=torch.float32)
    bv, bk = _block_v(dv), _block_k(dk)
    chunk_fwd_states_kernel[((dk // bk) * (dv // bv), n * heads)](
        k, v, z, u, key_max, h0 if h0 is not None else h, h, ht, bw, cu, offsets,
        heads, DK=dk, DV=dv, C=CHUNK_SIZE, S=LAUNCH["sub_chunk"], BK=bk, BV=bv, HAS_H0=h0 is not None, STORE_HT=store_final,
        DT=_dot_dtype(k.dtype), num_warps=LAUNCH["states_warps"], num_stages=1,
    )
    return h, (ht if store_final else None), bw


class _ChunkReGLATriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, z, u, scale, key_max, h0, cu, offsets, table, total):
        tokens, heads, dk = q.shape
        dv = v.shape[-1]
        h, ht, bw = _fwd_states(k, v, z, u, key_max, h0, cu, offsets, total, True)
        o = _empty(tokens, heads, dv, device=q.device, dtype=q.dtype)
        bv = _block_v(dv)
        chunk_fwd_output_kernel[(dv // bv, total, heads)](
            q, k, v, bw, key_max, h, o, table, cu, scale,
            heads, DK=dk, DV=dv, C=CHUNK_SIZE, S=LAUNCH["sub_chunk"], BV=bv, DT=_dot_dtype(q.dtype),
            DIAG_LIMIT=LAUNCH["diag_limit"], num_warps=LAUNCH["output_warps"], num_stages=1,
        )
        del h, bw
        ctx.save_for_backward(q, k, v, z, u, key_max, h0, cu, offsets, table)
        ctx.scale, ctx.total = scale, total
        ctx.h0_dtype = None if h0 is None else h0.dtype
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, z, u, key_max, h0, cu, offsets, table = ctx.saved_tensors
        scale, total = ctx.scale, ctx.total
        tokens, heads, dk = q.shape
        dv = v.shape[-1]
        n = cu.numel() - 1
        do = do.contiguous()
        dt = _dot_dtype(q.dtype)
        h, _, bw = _fwd_states(k, v, z, u, key_max, h0, cu, offsets, total, False)
        dh = _empty(*h.shape, device=q.device, dtype=h.dtype)
        dh0 = _empty(n, heads, dk, dv, device=q.device, dtype=torch.float32)
        if dht is not None:
            dht = dht.float().contiguous()
        bv, bk = _block_v(dv), _block_k(dk)
        chunk_bwd_dstates_kernel[((dk // bk) * (dv // bv), n * heads)](
            q, bw, do, dht if dht is not None else dh0, dh, dh0, cu, offsets, scale,
            heads, DK=dk, DV=dv, C=CHUNK_SIZE, S=LAUNCH["sub_chunk"], BK=bk, BV=bv, HAS_DHT=dht is not None, DT=dt,
            num_warps=LAUNCH["states_warps"], num_stages=1,
        )
        bv = _bwd_block_v(dv, q.dtype)
        dq, dk_, dz, du, dv_ = (_empty(*x.shape, device=x.device, dtype=x.dtype) for x in (q, k, z, u, v))
        chunk_bwd_main_kernel[(total, heads)](
            q, k, v, z, u, bw, key_max, h, dh, do, dq, dk_, dv_, dz, du, table, cu, scale,
            heads, DK=dk, DV=dv, C=CHUNK_SIZE, S=LAUNCH["sub_chunk"], BV=bv, DT=dt,
            DIAG_LIMIT=LAUNCH["diag_limit"], num_warps=LAUNCH["bwd_warps"], num_stages=1,
        )
        dinit = None if h0 is None else dh0.to(ctx.h0_dtype)
        return dq, dk_, dv_, dz, du, None, None, dinit, None, None, None, None


def chunk_regla_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_logits: torch.Tensor,
    refine_logits: torch.Tensor,
    scale: float,
    key_max: Optional[torch.Tensor],
    initial_state: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backend function of `chunk_regla` (see chunk.py for the contract).

    Returns o [B, T, H, dv] in q's dtype and the final state [N, H, dk, dv] in fp32.
    """
    _check(q, v)
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    dtype = q.dtype
    k, v, gate_logits, refine_logits = (x.to(dtype) for x in (k, v, gate_logits, refine_logits))
    if cu_seqlens is None:
        cu = torch.arange(0, (batch + 1) * length, length, device=q.device, dtype=torch.int32)[: batch + 1]
        if key_max is None:
            key_max = sequence_key_max(k)
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
        if key_max is None:
            key_max = _packed_key_max(k, cu)
    offsets, table, total = _chunk_tables(cu, CHUNK_SIZE)
    flat = [x.reshape(batch * length, heads, x.shape[-1]).contiguous() for x in (q, k, v, gate_logits, refine_logits)]
    key_max = key_max.detach().float().contiguous()
    h0 = None if initial_state is None else initial_state.contiguous()
    o, state = _ChunkReGLATriton.apply(*flat, float(scale), key_max, h0, cu, offsets, table, total)
    return o.reshape(batch, length, heads, dv), state


chunk_regla_triton.supports_cu_seqlens = True
