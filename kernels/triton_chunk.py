"""Chunked ReGLA in Triton: forward and backward with the feature maps, the key-max
stabilizer, the refined log gate and the scale fused into the kernels.

Stages (kernels in `triton_stages.py` and `triton_fast.py`):
  forward : chunk_gates (parallel over chunks, token by token: cumulative log gate b per
            chunk from the logits, one flag per chunk: whole-chunk products or sub-chunk
            kernels, and the key max)
            chunk_fwd_states (sequential over chunks: state at every chunk start, final state)
            chunk_fwd_output_fast / chunk_fwd_output (parallel over chunks, by flag: the second
            walks a work list of its chunks, `_slow_chunks`; they also keep each token's query
            max for the backward)
  backward: chunk_bwd_dstates (reverse over chunks: state gradients, initial-state gradient)
            chunk_bwd_dv_fast (dv and the score gradient dA) + chunk_bwd_dqk_fast /
            chunk_bwd_main (parallel, by flag; a work list too): dq, dk, dv and both gate-logit
            gradients
No pass runs outside the kernels. The forward's b and h are kept for the backward, each in the
buffer of the gradients the last stage writes over them: b in the gate-logit gradients'
(`_gate_arena`), h in dq's and dk's (`_GradArena`, where it fits; else h is recomputed by
chunk_fwd_states first). With low_memory (`_ChunkReGLATritonWindowed`) the backward runs these
stages per time window, b and h kept from the forward ("backward") or computed again per window
(True).

Layout [B, T, H, D] (or B = 1 with `cu_seqlens`), any strides with contiguous features (read in
place: Megatron's [s, b] activations as [b, s] views need no copy, see `_layout`), any T
(masked, no padding copies), bf16/fp16/fp32 inputs, fp32 state and accumulation, dk and dv
powers of two in [MIN_HEAD_DIM, MAX_HEAD_DIM].
"""

import bisect
import functools
import os
from typing import NamedTuple, Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from .gating import add_gate_bias, refined_log_gate
from .triton_fast import chunk_bwd_dqk_fast_kernel, chunk_bwd_dv_fast_kernel, chunk_fwd_output_fast_kernel
from .triton_stages import (
    GATE_BLOCK,
    chunk_gates_kernel,
    chunk_bwd_dstates_kernel,
    slow_chunks_kernel,
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
    "gates_warps": 1,
    "gates_stages": 2,  # loads in flight in the gates kernel's walk over a chunk's tokens
    "states_warps": 4,
    # Loads in flight in the sequential state passes: 3 took 16K from 5.89-5.91 to 5.80-5.82 ms
    # (H200, bf16, 64K tokens, H 16, d 128; benchmarks/runs/s7_call1, s7_call2), the same elsewhere.
    "states_stages": 3,
    "output_warps": 8,
    "bwd_warps": 8,
    "block_v": 64,  # sub-chunk output kernel
    "states_block_k": 64,  # the sequential state passes (forward and backward)
    "states_block_v": 128,
    # Diagonal sub-chunk blocks: with diag_limit >= 0 they take one masked product wherever
    # every sub-chunk's log decay is >= -diag_limit (factors within e^+-diag_limit), else the
    # elementwise loop. -1 means elementwise always: the setting the H200 check passed with
    # (benchmarks/NOTES_kernels.md); 40 is 1.5x faster but its backward is not yet checked there.
    "diag_limit": -1.0,
    # Chunks whose gate factors all lie in [e^-fast_limit, e^fast_limit] take the whole-chunk
    # product kernels (triton_fast.py); the rest the sub-chunk kernels with fp32 (tf32)
    # products. A negative value sends every chunk to the sub-chunk kernels.
    "fast_limit": 60.0,
    # Programs per multiprocessor of the sub-chunk kernels, which walk the list of chunks that
    # need them (`_slow_chunks`) instead of a grid over every chunk.
    "slow_programs_per_sm": 2,
    "fast_output_warps": 8,
    "fast_output_block_v": 64,
    # With a carried state (segments, context parallelism) the output kernel's extra product needs
    # 178 registers at value block 64 (one program per multiprocessor), 128 at 32 (two): H200,
    # 32K, 7.02 -> 6.87 ms (benchmarks/runs/s6_call1).
    "fast_output_block_v_carried": 32,
    "fast_dv_warps": 8,
    "fast_dv_block_v": 128,
    # 4 warps with 32-wide key blocks hit an illegal memory access in bf16 on the H200 (Triton 3.6:
    # compute-sanitizer shows a shared-memory read past the allocation inside the compiled kernel;
    # benchmarks/NOTES_kernels.md, v8 and v9): check any new dq/dk tile on the GPU.
    "fast_dqk_warps": 4,
    "fast_dqk_block_k": 64,
    "fast_dqk_block_v": 128,
    # Software-pipelining depth of the loops over value blocks (dv, dq/dk).
    "fast_dv_stages": 1,
    "fast_dqk_stages": 1,
    # Long sequences, few of them (B x H small): with a final state not asked for, and state
    # passes of fewer than segment_below_programs programs, cut each sequence into up to 8 equal
    # segments (the context-parallel kernel path, the states carried between them on this
    # device) until they have segment_min_programs. H200, bf16, 64K tokens, H 16, d 128
    # (benchmarks/runs/s4_call1, s4_call2): B = 1 13.39 ms in one pass, 10.10 as 8 segments;
    # B = 2 (64 programs) 10.28 -> 10.18 as 4; B = 4 (128 programs) 9.23 -> 10.09 as 2 (hence
    # the lower bound). Since the backward keeps h (in the gradient arena) instead of recomputing
    # it, B = 2 is faster in one pass: 32K, 6.30 ms as 4 segments, 6.09 in one pass at 2.29 GB
    # instead of 2.87 (benchmarks/runs/s10_call3), hence 64. 0 = off.
    "segment_below_programs": 64,
    # 132: 4 segments at 32K (B = 2), 6.45 -> 6.36 ms against 8 (benchmarks/runs/s7_call3).
    "segment_min_programs": 132,
    # Register caps (ptxas maxnreg) per kernel, 0 = none: a cap trades spills for more programs
    # per multiprocessor.
    "gates_maxnreg": 0,
    "states_maxnreg": 0,
    "fast_output_maxnreg": 0,
    # The dv launch with a carried state (segments) needs 170 registers, one program per
    # multiprocessor; capped at 128 (two): H200, 32K, 6.13 -> 6.07 ms (benchmarks/runs/s6_call3).
    # Without a carried state the kernel needs 128 anyway.
    "fast_dv_maxnreg": 128,
    "fast_dqk_maxnreg": 0,
    # Windows of the low-memory backward (`chunk_regla(..., low_memory=...)`,
    # `_ChunkReGLATritonWindowed`): its peak holds dh and dA of one window (b and h are in the
    # gradients' buffers; h not where it does not fit them, `_states_fit_grads`), and where the
    # windows compute h again the forward keeps each later window's start state. 0 = as few
    # windows as keep those within window_memory_fraction of the backward's outputs (o and the
    # input gradients, which any backward holds): each window costs about 0.07-0.1 ms (H200, 8K,
    # benchmarks/runs/s8_call2, s9_call1). At the record shape (bf16, 64K tokens, H 16, d 128):
    # 2 windows with "backward", 1.95-1.98 GB, and 3 with True, 1.86-1.96 GB (runs/s10_call3).
    "backward_windows": 0,
    "window_memory_fraction": 0.21,
    # chunk_regla(gate_bias=...) added inside the kernels (no biased copy of the logits) rather than
    # before them. Off until the GPU check's bias cases (benchmarks/gpu_check_kernels.py, which
    # turns it on for them) have passed on the GPU: written and checked in the interpreter in
    # session 10, when no device time was left to run them.
    "gate_bias_in_kernels": False,
}
POISON = os.environ.get("REGLA_TRITON_POISON", "0") == "1"


def _register_cap(kernel: str) -> dict:
    """Launch option of LAUNCH[kernel + "_maxnreg"] (none when 0, or in the interpreter)."""
    cap = LAUNCH.get(f"{kernel}_maxnreg", 0)
    return {"maxnreg": int(cap)} if cap and not _interpreting() else {}


def _empty(*shape, device, dtype):
    if POISON:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(*shape, device=device, dtype=dtype)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _head_dim_supported(d: int) -> bool:
    return MIN_HEAD_DIM <= d <= MAX_HEAD_DIM and d & (d - 1) == 0


def triton_supports(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Triton kernels take these inputs (head dims and dtype; device aside)."""
    return _head_dim_supported(q.shape[-1]) and _head_dim_supported(v.shape[-1]) and q.dtype in SUPPORTED_DTYPES


def _check(q: torch.Tensor, v: torch.Tensor) -> None:
    dk, dv = q.shape[-1], v.shape[-1]
    for name, d in (("dk", dk), ("dv", dv)):
        if not _head_dim_supported(d):
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


def _gate_arena(tokens: int, heads: int, dk: int, dtype: torch.dtype, device: torch.device):
    """(b, dz, du): b (the cumulative log gate, fp32 [T, H, dk], `_gates`) and the gate-logit
    gradients ([T, H, dk] in `dtype`, each with contiguous features). 16-bit: one buffer, a row
    of b being the row of dz then the row of du ([T, H, 2, dk]), which the last kernels that read
    b write over it (`triton_stages.store_gate_grads`; `gate_slots` orders b's row so that each
    dq/dk program overwrites only what it read): b costs no memory of its own, 0.54 GB at the
    record shape (bf16, 64K tokens, H 16, d 128). fp32: three buffers (b is as large as dz)."""
    if dtype == torch.float32:
        return tuple(_empty(tokens, heads, dk, device=device, dtype=dtype) for _ in range(3))
    rows = _empty(tokens, heads, 2, dk, device=device, dtype=dtype)
    return rows.view(tokens, heads, 2 * dk).view(torch.float32), rows[:, :, 0], rows[:, :, 1]


class _GradArena(NamedTuple):
    """dq and dk of a backward in one buffer (q's dtype) that holds the chunk-start states h until
    the gradient kernels write dq and dk over them (`triton_stages.state_offsets`): h then needs
    no memory of its own, 0.54 GB at the record shape (bf16, 64K tokens, H 16, d 128). buffer:
    flat, a row of 2 dk per token and head (dq's row, then dk's; [T, H, 2, dk]), then the states
    of each sequence's last, shorter chunk from element `spill` on ([N, H, dk, dv], where some
    sequence has one); dq and dk are views of it (`_grad_arena_of`). At dv = 2 C the arena is as
    large as the h it holds; at dv = C twice as large, so a forward that keeps it keeps dq and
    dk's size, not h's."""

    buffer: torch.Tensor
    spill: int

    def from_row(self, first_row: int, dk: int) -> "_GradArena":
        """The arena as the kernels of a window address it: pointers at row `first_row`."""
        cut = first_row * 2 * dk
        return _GradArena(self.buffer[cut:], self.spill - cut)


def _states_fit_grads(dk: int, dv: int, dtype: torch.dtype) -> bool:
    """Whether h can live in the dq/dk gradient arena (`_GradArena`): its dtype is the gradients'
    (bf16, fp32; fp16 keeps fp32 states), a dq/dk key block (GATE_BLOCK features) of a chunk has
    room for that block's h rows in a layout `state_offsets` knows (dv = GATE_BLOCK or 2
    GATE_BLOCK = 2 C: two or one h rows per token) and the dq/dk kernel's key block is GATE_BLOCK."""
    block = GATE_BLOCK.value
    return (
        _state_dtype(dtype) == dtype
        and dv in (block, 2 * block)
        and dk % block == 0
        and min(dk, LAUNCH["fast_dqk_block_k"]) == block
        and CHUNK_SIZE == block
    )


def _grad_arena(tokens: int, heads: int, dk: int, dv: int, spilled_sequences: int, dtype, device):
    """(arena, dq, dk): a `_GradArena` of `tokens` tokens with room for the states of
    `spilled_sequences` sequences' last, shorter chunks (all sequences where any has one: the
    kernels index the spill by sequence), as `_grad_arena_of` gives it."""
    rows = tokens * heads * 2 * dk
    buffer = _empty(rows + spilled_sequences * heads * dk * dv, device=device, dtype=dtype)
    return _grad_arena_of(buffer, tokens, heads, dk)


def _grad_arena_of(buffer: torch.Tensor, tokens: int, heads: int, dk: int):
    """(arena, dq, dk) of a buffer `_grad_arena` made (also a saved tensor back in the backward):
    the `_GradArena` and its dq and dk, [T, H, dk] views."""
    rows = tokens * heads * 2 * dk
    pairs = buffer[:rows].view(tokens, heads, 2, dk)
    return _GradArena(buffer, rows), pairs[:, :, 0], pairs[:, :, 1]


def _state_args(h) -> Tuple[torch.Tensor, int, bool]:
    """The kernels' (h pointer, spill, IN_GRADS) of chunk-start states: a tensor [chunks, H, dk, dv]
    of their own, or a `_GradArena`."""
    if isinstance(h, _GradArena):
        return h.buffer, h.spill, True
    return h, 0, False


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


@functools.lru_cache(maxsize=64)
def _regular_tables(batch: int, length: int, device: torch.device):
    """(cu, offsets, table, total) of `_chunk_tables` for B sequences of T tokens, made once per
    (B, T, device): the general tables need the chunk count on the host (a device sync)."""
    cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32)[: batch + 1]
    offsets, table, total = _chunk_tables(cu, CHUNK_SIZE)
    return cu.to(device), offsets.to(device), table.to(device), total


def _block_v(dv: int) -> int:
    return min(dv, LAUNCH["block_v"])


def _state_programs(dk: int, dv: int, sequences_heads: int) -> int:
    """Programs of a state pass with the LAUNCH key and value blocks."""
    return sequences_heads * (dk // min(dk, LAUNCH["states_block_k"])) * (dv // min(dv, LAUNCH["states_block_v"]))


def _state_blocks(dk: int, dv: int, sequences_heads: int) -> Tuple[int, int]:
    """(key block, value block) of the sequential state passes: key block 32 where the usual
    one would leave some of the GPU's multiprocessors idle (few long sequences)."""
    bk, bv = min(dk, LAUNCH["states_block_k"]), min(dv, LAUNCH["states_block_v"])
    if bk > 32 and _state_programs(dk, dv, sequences_heads) < _multiprocessors():
        bk = 32
    _check_key_block(bk, dk, "states_block_k")
    return bk, bv


def _check_key_block(block: int, dk: int, setting: str, over_b: bool = False) -> None:
    """A key block of b's readers must cover whole runs of `gate_slots` (GATE_BLOCK / 2 features
    from multiples of it) where b's rows are permuted (dk > GATE_BLOCK): the kernels tell Triton
    so for vector loads. The dq/dk kernel writing the gate gradients over b (over_b) must take
    exactly the key blocks b's rows are laid out for."""
    if over_b and block != min(dk, GATE_BLOCK.value):
        raise ValueError(
            f"LAUNCH['{setting}'] = {block}: with the gate gradients over b (16-bit inputs) the dq/dk "
            f"kernel's key block must be {GATE_BLOCK.value} (triton_stages.GATE_BLOCK, b's row layout)"
        )
    if dk > GATE_BLOCK.value and block < GATE_BLOCK.value // 2:
        raise ValueError(f"LAUNCH['{setting}'] = {block}: key blocks must be at least {GATE_BLOCK.value // 2} at dk = {dk}")


@functools.lru_cache(maxsize=None)
def _multiprocessors() -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return 1


def _bwd_block_v(dv: int) -> int:
    """Value block of the sub-chunk backward stage (fp32 product operands): 32 keeps it in shared memory."""
    return min(dv, 32)


def _fast_limit() -> float:
    return float(LAUNCH["fast_limit"])


def _dims(x: torch.Tensor) -> Tuple[int, int, int]:
    """(tokens, heads, features) of x [T, H, D] or [B, T, H, D] (tokens = B * T)."""
    return x.shape[:-2].numel(), x.shape[-2], x.shape[-1]


def _layout(x: torch.Tensor) -> Tuple[int, int, int]:
    """(S_T, S_N, S_H): token `tok` (batch rows one after another) of sequence n, head h of x
    [T, H, D] or [B, T, H, D] starts tok * S_T + n * S_N + h * S_H elements after x's first
    (`triton_stages.input_rows`). With B > 1 the sequences are the batch rows, so a strided
    view, e.g. Megatron's [s, b] activations seen as [b, s], needs no copy."""
    if x.stride(-1) != 1:
        raise ValueError(f"Triton ReGLA kernels: features must be contiguous (stride 1), got strides {x.stride()}")
    if x.dim() == 3:
        return x.stride(0), 0, x.stride(1)
    batch, length = x.shape[:2]
    return x.stride(1), (x.stride(0) - length * x.stride(1)) if batch > 1 else 0, x.stride(2)


def _one_layout(*xs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """xs as they are when they share one `_layout` (one set of stride arguments in the
    kernels) with contiguous features, else contiguous copies."""
    if all(x.stride(-1) == 1 for x in xs) and len({_layout(x) for x in xs}) == 1:
        return xs
    return tuple(x.contiguous() for x in xs)


def _gates(z, u, k, cu, table, total, key_max=None, out=None, need_key_max=True, order=None, work=None, b=None, bias=None):
    """b (cumulative log gate from each chunk start, fp32 [T, H, dk]), each chunk's total log
    decay (fp32 [chunks, H, dk]), the fast-path flags (int8 [chunks, H]) and the key max
    (fp32 [N, H]: `key_max` when given, else computed here from k, unless need_key_max is
    False: then None). `out`: the first three preallocated (contiguous views of larger buffers);
    `b`: only b preallocated (`_gate_arena`).
    `work`: a zeroed `_work_list` the flag-0 chunks are appended to (as `_slow_chunks` makes it).
    z and u share one `_layout`, k has q's. `order` (here and below): the row order of the
    per-token tensors (`_row_order`), sequences one after another by default. `bias` (here and
    below): the logits' bias (fp32 [H, 2 dk], `_kernel_bias`) or None."""
    tokens, heads, dk = _dims(z)
    order = (heads, 0) if order is None else order
    if out is None:
        out = (
            _empty(tokens, heads, dk, device=z.device, dtype=torch.float32) if b is None else b,
            _empty(total, heads, dk, device=z.device, dtype=torch.float32),
            torch.empty(total, heads, device=z.device, dtype=torch.int8),
        )
    b, chunk_decay, flags = out
    compute_max = key_max is None and need_key_max
    if compute_max:
        key_max = torch.full((cu.numel() - 1, heads), float("-inf"), device=z.device, dtype=torch.float32)
    chunk_gates_kernel[(total, heads)](
        z, u, k, b, chunk_decay, flags, key_max if key_max is not None else b, work if work is not None else flags, table, cu,
        b if bias is None else bias,
        heads, *order, *_layout(k), *_layout(z), DK=dk, C=CHUNK_SIZE, LIMIT=_fast_limit(), KEY_MAX=compute_max,
        STAGES=LAUNCH["gates_stages"], WORK=work is not None, HAS_BIAS=bias is not None, num_warps=LAUNCH["gates_warps"],
        **_register_cap("gates"),
    )
    return b, chunk_decay, flags, key_max


def _fwd_states(k, v, b, key_max, h0, cu, offsets, total, store_final, out=None, order=None, starts=None, into=None):
    """States at every chunk start (h); with store_final also the final states (fp32 [N, H, dk, dv]).
    `out`: (h, final states) preallocated. `starts`: (buffer [W - 1, N, H, dk, dv] in h's dtype,
    chunks per window) to receive each later window's start state (equal sequences only).
    `into`: a `_GradArena` to hold h (returned as h) instead of a buffer of its own."""
    tokens, heads, dk = _dims(k)
    order = (heads, 0) if order is None else order
    dv = v.shape[-1]
    n = cu.numel() - 1
    if out is None:
        h = into if into is not None else _empty(total, heads, dk, dv, device=k.device, dtype=_state_dtype(k.dtype))
        ht = _empty(n, heads, dk, dv, device=k.device, dtype=torch.float32) if store_final else None
    else:
        h, ht = out
    h_ptr, spill, in_grads = _state_args(h)
    ht_ptr = ht if ht is not None else h_ptr
    bk, bv = _state_blocks(dk, dv, n * heads)
    chunk_fwd_states_kernel[((dk // bk) * (dv // bv), n * heads)](
        k, v, b, key_max, h0 if h0 is not None else h_ptr, h_ptr, ht_ptr, h_ptr if starts is None else starts[0], cu, offsets,
        0 if starts is None else starts[1], n, spill,
        heads, *order, *_layout(k), *_layout(v), DK=dk, DV=dv, C=CHUNK_SIZE, BK=bk, BV=bv, HAS_H0=h0 is not None,
        STORE_HT=store_final, DT=_dot_dtype(k.dtype), STARTS=starts is not None, IN_GRADS=in_grads,
        num_warps=LAUNCH["states_warps"], num_stages=LAUNCH["states_stages"],
        **_register_cap("states"),
    )
    return h, (ht if store_final else None)


def _work_list(chunks: int, heads: int, device: torch.device) -> torch.Tensor:
    """A zeroed sub-chunk work list (int32 [1 + chunks * heads], the layout of `_slow_chunks`) for
    the gates kernel to fill (`_gates(work=...)`)."""
    return torch.zeros(1 + chunks * heads, device=device, dtype=torch.int32)


def _slow_chunks(flags: torch.Tensor) -> torch.Tensor:
    """Work list (int32 [1 + chunks * H]: the count, then the items ic * H + head) of the chunks
    whose flag is 0, for the sub-chunk kernels: launched over the whole grid they cost about
    0.16 ms at the record shape even where no chunk needs them (H200, s6_call1: programs that
    only read their flag, one per multiprocessor at a time at their register count)."""
    work = torch.empty(1 + flags.numel(), device=flags.device, dtype=torch.int32)
    work[:1].zero_()
    block = 1024
    slow_chunks_kernel[(triton.cdiv(flags.numel(), block),)](flags, work, flags.numel(), BLOCK=block, num_warps=4)
    return work


def _slow_programs(total: int, heads: int) -> int:
    """Programs of a sub-chunk kernel launch: each takes work-list entries in turn."""
    return max(1, min(total * heads, LAUNCH["slow_programs_per_sm"] * _multiprocessors()))


def _carried(carry, like):
    """Kernel arguments (state fp32, decay, reach, flag) of an optional (state [N, H, dk, dv], decay
    [chunks, H, dk] fp32, reach int8 [chunks, H]) triple: a state entering each sequence from
    outside, added to every chunk's state with the decay from the sequence start (or end) to that
    chunk; reach flags which chunks it still reaches (`triton_segments.segment_chunk_decays`)."""
    if carry is None:
        return like, like, like, False  # placeholders the kernels do not read
    state, decay, reach = carry
    return state.float().contiguous(), decay.float().contiguous(), reach.contiguous(), True


def _product_state(state, has_state: bool, dtype: torch.dtype):
    """A carried state (`_carried`) for the fast kernels, which take it as a product operand in the
    product dtype (a placeholder stays as it is)."""
    return state.to(_state_dtype(dtype)) if has_state else state


def _carry_launches(has_carry: bool):
    """The CARRY values of the fast output and dv kernels' launches (`carry_launch_takes`): one
    launch without a carried state; with one, the chunks it no longer reaches in a launch without
    its product and the others in a launch with it (more registers: fewer programs per SM)."""
    return (1, 2) if has_carry else (0,)


def _fwd_output(q, k, v, b, flags, key_max, h, table, cu, scale, total, h_carry=None, out=None, order=None, work=None):
    """o [T, H, dv] in q's dtype from the chunk-start states h (`_state_args`; plus `h_carry`, see `_carried`),
    and each token's query max (fp32 [T, H], for the backward). `out`: both preallocated. `work`:
    the sub-chunk work list of these flags (`_slow_chunks`), made here when not given."""
    tokens, heads, dk = _dims(q)
    order = (heads, 0) if order is None else order
    dv = v.shape[-1]
    if out is None:
        out = (_empty(tokens, heads, dv, device=q.device, dtype=q.dtype), _empty(tokens, heads, device=q.device, dtype=torch.float32))
    o, q_max = out
    h_add, h_decay, reach, has_h_add = _carried(h_carry, b)
    h, spill, in_grads = _state_args(h)
    if _fast_limit() >= 0:
        fast_add = _product_state(h_add, has_h_add, q.dtype)
        for carry in _carry_launches(has_h_add):
            block_v = LAUNCH["fast_output_block_v_carried" if carry == 2 else "fast_output_block_v"]
            chunk_fwd_output_fast_kernel[(total, heads)](
                q, k, v, b, flags, key_max, h, fast_add, h_decay, reach, o, q_max, table, cu, scale, spill,
                heads, *order, *_layout(q), *_layout(v), DK=dk, DV=dv, C=CHUNK_SIZE, BV=min(dv, block_v), DT=_dot_dtype(q.dtype),
                CARRY=carry, IN_GRADS=in_grads, num_warps=LAUNCH["fast_output_warps"], num_stages=1, **_register_cap("fast_output"),
            )
    bv = _block_v(dv)
    work = _slow_chunks(flags) if work is None else work
    chunk_fwd_output_kernel[(dv // bv, _slow_programs(total, heads))](
        q, k, v, b, flags, key_max, h, h_add, h_decay, o, q_max, table, cu, work, scale, spill,
        heads, *order, *_layout(q), *_layout(v), DK=dk, DV=dv, C=CHUNK_SIZE, S=LAUNCH["sub_chunk"], BV=bv, DT=tl.float32,
        DIAG_LIMIT=LAUNCH["diag_limit"], HAS_HADD=has_h_add, IN_GRADS=in_grads, num_warps=LAUNCH["output_warps"], num_stages=1,
    )
    return o, q_max


def _bwd_dstates(q, q_max, b, do, dht, cu, offsets, scale, total, dv, order=None, dh0=None):
    """dh (gradient at every chunk end, h's dtype) and dh0 (at each sequence start, fp32 [N, H, dk, dv];
    `dh0` preallocated, which may be dht itself). do: contiguous [T, H, dv]."""
    tokens, heads, dk = _dims(q)
    order = (heads, 0) if order is None else order
    n = cu.numel() - 1
    dh = _empty(total, heads, dk, dv, device=q.device, dtype=_state_dtype(q.dtype))
    if dh0 is None:
        dh0 = _empty(n, heads, dk, dv, device=q.device, dtype=torch.float32)
    bk, bv = _state_blocks(dk, dv, n * heads)
    chunk_bwd_dstates_kernel[((dk // bk) * (dv // bv), n * heads)](
        q, q_max, b, do, dht if dht is not None else dh0, dh, dh0, cu, offsets, scale,
        heads, *order, *_layout(q), DK=dk, DV=dv, C=CHUNK_SIZE, BK=bk, BV=bv, HAS_DHT=dht is not None, DT=_dot_dtype(q.dtype),
        num_warps=LAUNCH["states_warps"], num_stages=LAUNCH["states_stages"], **_register_cap("states"),
    )
    return dh, dh0


def _bwd_main(
    q, k, v, z, u, b, flags, key_max, q_max, h, dh, do, table, cu, scale, total, h_carry=None, dh_carry=None, order=None, work=None,
    *, out, bias=None,
):
    """dq, dk, dv, dz, du ([T, H, D] each in its input's dtype) from h and dh (plus `h_carry`,
    `dh_carry`, see `_carried`), written into `out` (views the kernels write at `order`'s rows:
    `_value_grads` or a `_GradArena`'s dq and dk, which must then be h's, and the gate arena's dz
    and du, `_gate_arena`). do: contiguous [T, H, dv]. `work`: as in `_fwd_output`."""
    _, heads, dk = _dims(q)
    order = (heads, 0) if order is None else order
    dv = v.shape[-1]
    dt = _dot_dtype(q.dtype)
    h_add, h_decay, _, has_h_add = _carried(h_carry, b)
    dh_add, dh_decay, dh_reach, has_dh_add = _carried(dh_carry, b)
    dq, dk_, dv_, dz, du = out
    bk = min(dk, LAUNCH["fast_dqk_block_k"])
    gate_stride = _pair_stride(dz, du)
    grad_stride = _pair_stride(dq, dk_)
    _check_key_block(bk, dk, "fast_dqk_block_k", over_b=gate_stride == 2)
    h, spill, in_grads = _state_args(h)
    if in_grads and (dq.data_ptr() != h.data_ptr() or grad_stride != 2 or bk != GATE_BLOCK.value):
        raise ValueError("Triton ReGLA kernels: states in a gradient arena need that arena's dq and dk, and dq/dk key blocks of GATE_BLOCK")
    if not flags.is_contiguous():  # the kernels index it as [chunks, H] rows
        raise ValueError("Triton ReGLA kernels: the chunk flags must be contiguous")
    if _fast_limit() >= 0:
        score_grad = torch.empty(total, heads, CHUNK_SIZE, CHUNK_SIZE, device=q.device, dtype=_state_dtype(q.dtype))
        fast_dh_add = _product_state(dh_add, has_dh_add, q.dtype)
        for carry in _carry_launches(has_dh_add):
            chunk_bwd_dv_fast_kernel[(total, heads)](
                q, k, v, b, flags, key_max, dh, fast_dh_add, dh_decay, dh_reach, do, dv_, score_grad, table, cu, scale,
                heads, *order, *_layout(q), *_layout(v), DK=dk, DV=dv, C=CHUNK_SIZE, BV=min(dv, LAUNCH["fast_dv_block_v"]), DT=dt,
                CARRY=carry, num_warps=LAUNCH["fast_dv_warps"], num_stages=LAUNCH["fast_dv_stages"], **_register_cap("fast_dv"),
            )
        chunk_bwd_dqk_fast_kernel[(dk // bk, total, heads)](
            q, k, v, z, u, b, flags, key_max, q_max, score_grad, h, h_add, h_decay, dh, dh_add, dh_decay, do,
            dq, dk_, dz, du, table, cu, scale, spill, b if bias is None else bias,
            heads, *order, *_layout(q), *_layout(v), *_layout(z), DK=dk, DV=dv, C=CHUNK_SIZE, BK=bk, BV=min(dv, LAUNCH["fast_dqk_block_v"]), DT=dt,
            HAS_HADD=has_h_add, HAS_DHADD=has_dh_add, GS=gate_stride, QS=grad_stride, IN_GRADS=in_grads, HAS_BIAS=bias is not None,
            num_warps=LAUNCH["fast_dqk_warps"], num_stages=LAUNCH["fast_dqk_stages"],
            **_register_cap("fast_dqk"),
        )
        del score_grad
    chunk_bwd_main_kernel[(_slow_programs(total, heads),)](
        q, k, v, z, u, b, flags, key_max, h, h_add, h_decay, dh, dh_add, dh_decay, do, dq, dk_, dv_, dz, du, table, cu,
        _slow_chunks(flags) if work is None else work, scale, spill, b if bias is None else bias,
        heads, *order, *_layout(q), *_layout(v), *_layout(z), DK=dk, DV=dv, C=CHUNK_SIZE, S=LAUNCH["sub_chunk"], BV=_bwd_block_v(dv), DT=tl.float32,
        DIAG_LIMIT=LAUNCH["diag_limit"], HAS_HADD=has_h_add, HAS_DHADD=has_dh_add, GS=gate_stride, QS=grad_stride, IN_GRADS=in_grads,
        HAS_BIAS=bias is not None,
        num_warps=LAUNCH["bwd_warps"],
        num_stages=1,
    )
    return dq, dk_, dv_, dz, du


def _pair_stride(first: torch.Tensor, second: torch.Tensor) -> int:
    """The kernels' GS or QS for a pair of gradient buffers ([rows, dk] views: dz and du, or dq and
    dk): 1 (contiguous rows each) or 2 (one buffer whose rows alternate: a 16-bit `_gate_arena`
    over b, a `_GradArena`)."""
    dk = first.shape[-1]
    if first.stride(-2) == second.stride(-2) == dk:
        return 1
    if first.stride(-2) == second.stride(-2) == 2 * dk and second.data_ptr() == first.data_ptr() + dk * first.element_size():
        return 2
    raise ValueError(f"Triton ReGLA kernels: gradient rows of strides {first.stride(-2)}, {second.stride(-2)} are not a layout they write")


def _batch_minor(x: torch.Tensor) -> bool:
    """Whether x [B, T, H, D] (B > 1) lies in memory as [T, B, ...]: Megatron's [s, b] activations
    seen as [b, s]."""
    return x.dim() == 4 and x.shape[0] > 1 and x.stride(0) < x.stride(1)


def _row_order(batch: int, length: int, heads: int, minor: bool) -> Tuple[int, int]:
    """(R_T, R_N) of `triton_stages.token_rows`: the order of the per-token tensors the kernels
    allocate (b, the query max, o, the gradients) and of do. Batch-minor inputs get them in the
    same [s, b] order, so o and the gradients go back to Megatron without a transposing copy."""
    return (batch * heads, heads - length * batch * heads) if minor else (heads, 0)


def _from_rows(flat: torch.Tensor, batch: int, length: int, minor: bool) -> torch.Tensor:
    """[B * T, H, D] in `_row_order` -> [B, T, H, D] (a view)."""
    if minor:
        return flat.view(length, batch, *flat.shape[1:]).transpose(0, 1)
    return flat.view(batch, length, *flat.shape[1:])


def _output_grad(do, like_rows: int, like: torch.Tensor) -> torch.Tensor:
    """do as the kernels read it (contiguous rows), zeros when autograd passed None (o unused:
    the Functions do not materialize the gradients of unused outputs, which for an unused final
    state would be a zero-filled fp32 [N, H, dk, dv] buffer)."""
    if do is None:
        return torch.zeros(like_rows, like.shape[-2], like.shape[-1], device=like.device, dtype=like.dtype)
    return do.contiguous()


def _forward(q, k, v, z, u, scale, key_max, h0, cu, offsets, table, total, minor, starts=None, into=None, bias=None):
    """The forward stages of both Functions: o (rows in `_row_order`), the final states, and what
    a backward may keep or derive from: the gate arena (b, dz, du: `_gate_arena`), flags, key max,
    h, query max and the sub-chunk work list. `starts`, `into`: as in `_fwd_states`."""
    order = _row_order(q.shape[0], q.shape[1], q.shape[2], minor)
    work = _work_list(chunks=total, heads=q.shape[2], device=q.device)
    arena = _gate_arena(*_dims(z), z.dtype, z.device)
    b, _, flags, key_max = _gates(z, u, k, cu, table, total, key_max, order=order, work=work, b=arena[0], bias=bias)
    h, ht = _fwd_states(k, v, b, key_max, h0, cu, offsets, total, True, order=order, starts=starts, into=into)
    o, q_max = _fwd_output(q, k, v, b, flags, key_max, h, table, cu, scale, total, order=order, work=work)
    return o, ht, arena, flags, key_max, h, q_max, work


def _kept_arena(ctx, arena, z, u, k, key_max, cu, table, total, order=None, bias=None):
    """The gate arena (`_gate_arena`) a backward writes its gate gradients into: the one the forward
    kept, whose b the first backward overwrites; a second backward through the same graph
    (retain_graph) gets a new one with b computed again."""
    if not getattr(ctx, "arena_spent", False):
        ctx.arena_spent = True
        return arena
    fresh = _gate_arena(*_dims(z), z.dtype, z.device)
    _gates(z, u, k, cu, table, total, key_max, order=order, b=fresh[0], bias=bias)
    return fresh


def _grad_rows(x: torch.Tensor) -> torch.Tensor:
    """A fresh gradient of x as the kernels write it ([T, H, D] in x's dtype)."""
    return _empty(_dims(x)[0], x.shape[-2], x.shape[-1], device=x.device, dtype=x.dtype)


def _value_grads(q, k, v):
    """Fresh dq, dk, dv ([T, H, D] each in its input's dtype; the gate gradients live in the arena)."""
    return tuple(_grad_rows(x) for x in (q, k, v))


def _spilled_sequences(cu: torch.Tensor, length: Optional[int]) -> int:
    """Sequences a `_GradArena` keeps spill room for: all of them where any has a last, shorter
    chunk (`length`: that of B equal sequences, None for packed ones, read from cu on the host)."""
    if length is not None:
        return 0 if length % CHUNK_SIZE == 0 else cu.numel() - 1
    lengths = cu[1:] - cu[:-1]
    return cu.numel() - 1 if bool((lengths % CHUNK_SIZE != 0).any()) else 0


def _arena_spilled(q, v, cu, total: int, length: Optional[int]) -> Optional[int]:
    """The spilled sequences of a `_GradArena` for these inputs (`_spilled_sequences`), or None
    where h does not fit one (`_states_fit_grads`) or the spill (one state per sequence) would
    be larger than the h it replaces (one per chunk: packed input with many empty sequences)."""
    if not _states_fit_grads(q.shape[-1], v.shape[-1], q.dtype):
        return None
    spilled = _spilled_sequences(cu, length)
    return None if spilled > total else spilled


def _states_arena(q, v, spilled: Optional[int]):
    """(arena, dq, dk) of `_grad_arena` for q's and v's shapes with `spilled` spilled sequences
    (`_arena_spilled`), or (None, None, None) where that is None (h does not fit one)."""
    if spilled is None:
        return None, None, None
    tokens, heads, dk = _dims(q)
    return _grad_arena(tokens, heads, dk, v.shape[-1], spilled, q.dtype, q.device)


def _kept_states(ctx, buffer, q, k, v, b, key_max, h0, cu, offsets, total, order):
    """(h, dq, dk) of a backward: h in the `_GradArena` the forward kept (`buffer`), whose h the
    first backward overwrites; a second backward through the same graph (retain_graph) gets a new
    arena with h computed again. Without a kept arena: h in a buffer of its own, computed here,
    and fresh dq, dk."""
    tokens, heads, dk = _dims(q)
    if buffer is not None and not getattr(ctx, "states_spent", False):
        ctx.states_spent = True
        return _grad_arena_of(buffer, tokens, heads, dk)
    if buffer is None:
        h, _ = _fwd_states(k, v, b, key_max, h0, cu, offsets, total, False, order=order)
        return h, _grad_rows(q), _grad_rows(k)
    into, dq, dk_ = _grad_arena_of(_empty(buffer.numel(), device=buffer.device, dtype=buffer.dtype), tokens, heads, dk)
    _fwd_states(k, v, b, key_max, h0, cu, offsets, total, False, order=order, into=into)
    return into, dq, dk_


class _ChunkReGLATriton(torch.autograd.Function):
    """q, k, v, z, u [B, T, H, D]; o as [B * T, H, dv] in `_row_order` (Megatron's [s, b] order
    when `minor`), the input gradients as [B, T, H, D] views of that order. The forward keeps b
    (`_gate_arena`) and, where it fits one, h (`_GradArena`; `spilled`: `_arena_spilled`) for the
    backward, which then needs no state pass but the state gradients' (else it computes h again
    first)."""

    @staticmethod
    def forward(ctx, q, k, v, z, u, scale, key_max, h0, cu, offsets, table, total, minor, spilled, gate_bias):
        into, _, _ = _states_arena(q, v, spilled)
        bias = _kernel_bias(gate_bias)
        o, ht, arena, flags, key_max, h, q_max, work = _forward(
            q, k, v, z, u, scale, key_max, h0, cu, offsets, table, total, minor, into=into, bias=bias,
        )
        del h  # kept in the gradient arena (`into`), else recomputed in the backward
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(
            q, k, v, z, u, *arena, flags, key_max, q_max, h0, cu, offsets, table, work, *_buffer_of(into), bias, gate_bias,
        )
        ctx.scale, ctx.total, ctx.minor = scale, total, minor
        ctx.h0_dtype = None if h0 is None else h0.dtype
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, z, u, b, dz, du, flags, key_max, q_max, h0, cu, offsets, table, work, states, bias, gate_bias = ctx.saved_tensors
        scale, total = ctx.scale, ctx.total
        order = _row_order(q.shape[0], q.shape[1], q.shape[2], ctx.minor)
        b, dz, du = _kept_arena(ctx, (b, dz, du), z, u, k, key_max, cu, table, total, order, bias)
        do = _output_grad(do, q.shape[0] * q.shape[1], v)
        dht = None if dht is None else dht.float().contiguous()
        h, dq, dk = _kept_states(ctx, states, q, k, v, b, key_max, h0, cu, offsets, total, order)
        dh, dh0 = _bwd_dstates(q, q_max, b, do, dht, cu, offsets, scale, total, v.shape[-1], order=order)
        grads = _bwd_main(
            q, k, v, z, u, b, flags, key_max, q_max, h, dh, do, table, cu, scale, total, order=order, work=work,
            out=(dq, dk, _grad_rows(v), dz, du), bias=bias,
        )
        dbias = _bias_grad(grads[3], grads[4], gate_bias)
        grads = [_from_rows(g, q.shape[0], q.shape[1], ctx.minor) for g in grads]
        dinit = None if h0 is None else dh0.to(ctx.h0_dtype)
        return (*grads, None, None, dinit, None, None, None, None, None, None, dbias)


def _buffer_of(arena: Optional[_GradArena]) -> Tuple[Optional[torch.Tensor]]:
    """(the buffer of a `_GradArena`, or None) for save_for_backward."""
    return (None if arena is None else arena.buffer,)


def _kernel_bias(gate_bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The logits' bias as the kernels read it (fp32 [H, 2 dk], contiguous), or None."""
    return None if gate_bias is None else gate_bias.detach().float().contiguous()


def _bias_grad(dz: torch.Tensor, du: torch.Tensor, gate_bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The gradient of the logits' bias [H, 2 dk] (in its dtype): dz and du ([T, H, dk], any row
    order) summed over the tokens in fp32; None without a bias."""
    if gate_bias is None:
        return None
    return torch.cat([dz.sum(0, dtype=torch.float32), du.sum(0, dtype=torch.float32)], dim=-1).to(gate_bias.dtype)


def _window_bytes(
    windows: int, batch: int, chunks: int, heads: int, dk: int, dv: int, dtype: torch.dtype, in_grads: bool = False, starts: bool = True,
) -> int:
    """What the low-memory backward holds beyond its outputs with `windows` windows: dh, the score
    gradients and (unless `in_grads`: in the gradient arena, `_GradArena`) h of one window, and
    with `starts` the start states of the later windows (b lives in the gate gradients' buffer,
    `_gate_arena`, which the outputs count, as they count the gradient arena)."""
    state = torch.empty((), dtype=_state_dtype(dtype)).element_size()
    per_chunk = CHUNK_SIZE * CHUNK_SIZE * state + (1 if in_grads else 2) * dk * dv * state
    return batch * heads * (-(-chunks // windows) * per_chunk + starts * (windows - 1) * dk * dv * state)


def _window_chunks(
    batch: int, chunks: int, heads: int, dk: int, dv: int, dtype: torch.dtype, tokens: int, in_grads: bool = False, starts: bool = True,
) -> int:
    """Chunks per window of the low-memory backward: LAUNCH["backward_windows"] windows (at most
    one per chunk), or with 0 the fewest (up to 16) whose `_window_bytes` are within
    LAUNCH["window_memory_fraction"] of the outputs (o and the five input gradients of `tokens`
    tokens in all), else the count with the fewest bytes."""
    if LAUNCH["backward_windows"] > 0:
        return -(-chunks // min(LAUNCH["backward_windows"], chunks))
    element = torch.empty((), dtype=dtype).element_size()
    outputs = tokens * heads * (4 * dk + 2 * dv) * element
    counts = range(1, min(16, chunks) + 1)
    cost = {w: _window_bytes(w, batch, chunks, heads, dk, dv, dtype, in_grads, starts) for w in counts}
    within = [w for w in counts if cost[w] <= LAUNCH["window_memory_fraction"] * outputs]
    windows = within[0] if within else min(counts, key=cost.get)
    return -(-chunks // windows)


def _window_order(batch: int, length: int, window: int, heads: int, minor: bool) -> Tuple[int, int]:
    """(R_T, R_N) that address the whole per-token tensors (do, the query max, b, the gradients;
    pointers at the window's first token) with the tables of a window of `window` tokens of
    every sequence: token t of sequence n is then n * window + t (`triton_stages.token_rows`)."""
    row_t, row_n = _row_order(batch, length, heads, minor)
    return row_t, row_n + (length - window) * row_t


def _keep_for_windows(ctx, q, k, v, z, u, arena, flags, key_max, q_max, h0, starts, keep_gates, states, biases):
    """What both windowed Functions save for their backward (h in the gradient arena `states`
    where the forward kept it, else the window start states; with keep_gates the gate arena and
    flags, else neither; `biases`: the logits' bias as the kernels read it and as given), and the
    initial state's dtype for its gradient."""
    ctx.set_materialize_grads(False)
    kept = (*arena, flags) if keep_gates else (None,) * 4
    ctx.save_for_backward(q, k, v, z, u, *kept, key_max, q_max, h0, starts, *_buffer_of(states), *biases)
    ctx.h0_dtype = None if h0 is None else h0.dtype


def _window_arena(ctx, arena, z, u, k, key_max, cu, table, total, order=None, bias=None):
    """The gate arena of a windowed backward: the forward's (`_kept_arena`), or, where the forward
    kept none (arena of Nones), a new one whose b each window fills for itself (`_window_backward`)."""
    if arena[0] is None:
        return _gate_arena(*_dims(z), z.dtype, z.device)
    return _kept_arena(ctx, arena, z, u, k, key_max, cu, table, total, order, bias)


def _window_rows(tensors, first_row: int):
    """Flat [rows, D] views of [T, H, D] tensors (contiguous rows, or `_gate_arena`'s dz and du)
    from row `first_row` on."""
    return [x.flatten(0, -2)[first_row:] for x in tensors]


class _ChunkReGLATritonWindowed(torch.autograd.Function):
    """`_ChunkReGLATriton` with a backward over time windows (the same window of every sequence,
    last to first), for memory: the state gradients dh and the score gradients (and h where it
    has no room in the gradient arena, `_GradArena`) exist for one window at a time. With
    keep_gates the forward keeps b in the gate gradients' buffer (`_gate_arena`) and h in the
    gradient arena where it fits (as the one-pass Function does); without, b and h are computed
    again per window, into that window's rows of those buffers, from each window's start state
    that the forward keeps, and the forward keeps no gate or state tensor. Each window's
    state-gradient pass starts from the gradient the later window handed back; the state passes
    keep all sequences and heads in parallel, so the cost is more launches (and the gates and
    states again)."""

    @staticmethod
    def forward(ctx, q, k, v, z, u, scale, key_max, h0, cu, offsets, table, total, minor, window_chunks, keep_gates, spilled, gate_bias):
        batch, heads, dk, dv = q.shape[0], q.shape[2], q.shape[3], v.shape[-1]
        windows = -(-(total // batch) // window_chunks)
        ctx.spilled = spilled
        kept = _states_arena(q, v, spilled)[0] if keep_gates else None
        starts = None
        if kept is None:
            starts = _empty(windows - 1, batch, heads, dk, dv, device=q.device, dtype=_state_dtype(q.dtype))
        bias = _kernel_bias(gate_bias)
        o, ht, arena, flags, key_max, h, q_max, _ = _forward(
            q, k, v, z, u, scale, key_max, h0, cu, offsets, table, total, minor,
            starts=None if starts is None else (starts, window_chunks), into=kept, bias=bias,
        )
        del h
        _keep_for_windows(ctx, q, k, v, z, u, arena, flags, key_max, q_max, h0, starts, keep_gates, kept, (bias, gate_bias))
        ctx.scale, ctx.minor, ctx.window = scale, minor, window_chunks * CHUNK_SIZE
        ctx.tables = (cu, offsets, table, total)
        ctx.windows = windows
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, z, u, b, dz, du, flags, key_max, q_max, h0, starts, states, bias, gate_bias = ctx.saved_tensors
        batch, length, heads, dk = q.shape
        cu, offsets, table, total = ctx.tables
        order = _row_order(batch, length, heads, ctx.minor)
        row_t = order[0]
        arena = _window_arena(ctx, (b, dz, du), z, u, k, key_max, cu, table, total, order, bias)
        do = _output_grad(do, batch * length, v)
        states_kept = states is not None
        if states_kept:  # the forward's h (or, in a second backward, h computed again whole)
            grad_arena, dq, dk_ = _kept_states(ctx, states, q, k, v, arena[0], key_max, h0, cu, offsets, total, order)
        elif ctx.spilled is not None:  # each window computes its h into its rows of a new arena
            grad_arena, dq, dk_ = _states_arena(q, v, ctx.spilled)
        else:
            grad_arena, dq, dk_ = None, _grad_rows(q), _grad_rows(k)
        grads = [dq, dk_, _grad_rows(v), *arena[1:]]
        dstate = None if dht is None else dht.float().contiguous()
        windows, window_chunks = ctx.windows, ctx.window // CHUNK_SIZE
        for index in reversed(range(windows)):
            first, window = index * ctx.window, min(ctx.window, length - index * ctx.window)
            last = first + window == length  # its dht is autograd's (or None), the others' our own buffer
            chunks = slice(index * window_chunks, index * window_chunks + -(-window // CHUNK_SIZE))
            window_flags = None if flags is None else flags.view(batch, -1, heads)[:, chunks].reshape(-1, heads).contiguous()
            dstate = _window_backward(
                [x[:, first : first + window] for x in (q, k, v, z, u)],
                _window_rows((do, q_max.unsqueeze(-1), arena[0], *grads), first * row_t),
                key_max, h0 if index == 0 or states_kept else starts[index - 1], dstate, ctx.scale,
                _regular_tables(batch, window, q.device), _window_order(batch, length, window, heads, ctx.minor), window_flags,
                dh_start=dstate if not last and dstate is not None else None,
                states=None if grad_arena is None else grad_arena.from_row(first * row_t, dk), states_kept=states_kept, bias=bias,
            )
        grads = [_from_rows(g, batch, length, ctx.minor) for g in grads]
        dinit = None if h0 is None else dstate.to(ctx.h0_dtype)
        dbias = _bias_grad(grads[3], grads[4], gate_bias)
        return (*grads, None, None, dinit, None, None, None, None, None, None, None, None, dbias)


class _PackedWindow:
    """One window of the packed low-memory backward: global chunks [first_chunk, end_chunk), tokens
    [start, end), and the pieces of sequences in it (`sequences`, int64 on the device) with their
    tables relative to `start` (`_chunk_tables`). `continued`: the first piece starts inside its
    sequence (its state comes from the forward's saved start, its state gradient goes to the
    window before); `continues`: the last piece ends inside its sequence (its end gradient comes
    from the window after)."""

    def __init__(self, bounds, chunk_offsets, chunk_counts, first_chunk, end_chunk, device):
        pieces, sequence = [], bisect.bisect_right(chunk_offsets, first_chunk) - 1
        while sequence < len(chunk_counts) and chunk_offsets[sequence] < end_chunk:
            if chunk_counts[sequence]:
                lo = max(first_chunk, chunk_offsets[sequence]) - chunk_offsets[sequence]
                hi = min(end_chunk, chunk_offsets[sequence] + chunk_counts[sequence]) - chunk_offsets[sequence]
                begin = bounds[sequence] + lo * CHUNK_SIZE
                pieces.append((sequence, begin, min(bounds[sequence + 1], bounds[sequence] + hi * CHUNK_SIZE), lo, hi))
            sequence += 1
        self.first_chunk, self.start, self.end = first_chunk, pieces[0][1], pieces[-1][2]
        self.continued = pieces[0][3] > 0
        self.continues = pieces[-1][4] < chunk_counts[pieces[-1][0]]
        self.sequences = torch.tensor([piece[0] for piece in pieces], dtype=torch.int64, device=device)
        cu = torch.tensor([piece[1] - self.start for piece in pieces] + [self.end - self.start], dtype=torch.int32)
        offsets, table, total = _chunk_tables(cu, CHUNK_SIZE)
        self.tables = (cu.to(device), offsets.to(device), table.to(device), total)


def _packed_windows(cu: torch.Tensor, chunk_offsets: torch.Tensor, total: int, window_chunks: int) -> list:
    """The `_PackedWindow`s of packed sequences (cu_seqlens `cu`, first chunk per sequence
    `chunk_offsets`) cut into windows of `window_chunks` global chunks."""
    bounds, offsets = cu.tolist(), chunk_offsets.tolist()
    counts = [(b - a + CHUNK_SIZE - 1) // CHUNK_SIZE for a, b in zip(bounds[:-1], bounds[1:])]
    return [
        _PackedWindow(bounds, offsets, counts, first, min(total, first + window_chunks), cu.device)
        for first in range(0, total, window_chunks)
    ]


class _ChunkReGLATritonPackedWindowed(torch.autograd.Function):
    """`_ChunkReGLATritonWindowed` for packed sequences (B = 1, cu_seqlens): windows of equal
    numbers of global chunks, each holding pieces of one or more sequences (`_PackedWindow`). A
    piece that starts inside its sequence starts from the state the forward kept at that chunk; a
    piece that ends inside its sequence takes the state gradient the later window handed back;
    the others take the sequence's initial state and final-state gradient, and give its
    initial-state gradient."""

    @staticmethod
    def forward(ctx, q, k, v, z, u, scale, key_max, h0, cu, offsets, table, total, minor, windows, keep_gates, gate_bias):
        bias = _kernel_bias(gate_bias)
        o, ht, arena, flags, key_max, h, q_max, _ = _forward(
            q, k, v, z, u, scale, key_max, h0, cu, offsets, table, total, minor, bias=bias,
        )
        firsts = torch.tensor([w.first_chunk for w in windows[1:]], dtype=torch.int64, device=h.device)
        starts = h.index_select(0, firsts)  # [W - 1, H, dk, dv]: h at each later window's first chunk
        del h
        _keep_for_windows(ctx, q, k, v, z, u, arena, flags, key_max, q_max, h0, starts, keep_gates, None, (bias, gate_bias))
        ctx.scale, ctx.windows, ctx.tables = scale, windows, (cu, table, total)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, z, u, b, dz, du, flags, key_max, q_max, h0, starts, _, bias, gate_bias = ctx.saved_tensors
        _, length, heads, dk = q.shape
        dv, sequences = v.shape[-1], key_max.shape[0]
        arena = _window_arena(ctx, (b, dz, du), z, u, k, key_max, *ctx.tables, None, bias)
        do = _output_grad(do, length, v)
        grads = [*_value_grads(q, k, v), *arena[1:]]
        zeros = lambda pieces: torch.zeros(pieces, heads, dk, dv, device=q.device, dtype=torch.float32)
        dinit = None
        if h0 is not None:  # an empty sequence passes its final-state gradient to its initial state unchanged
            dinit = dht.float().clone() if dht is not None else zeros(sequences)
        handed = None  # the state gradient at the later window's first chunk
        for index in reversed(range(len(ctx.windows))):
            w = ctx.windows[index]
            pieces = w.sequences.numel()
            init = h0[w.sequences].float() if h0 is not None else (zeros(pieces) if w.continued else None)
            if w.continued:
                init[0] = starts[index - 1]
            end_grad = dht[w.sequences].float() if dht is not None else (zeros(pieces) if w.continues else None)
            if w.continues:
                end_grad[-1] = handed
            dh_start = _window_backward(
                [x[:, w.start : w.end] for x in (q, k, v, z, u)],
                _window_rows((do, q_max.unsqueeze(-1), arena[0], *grads), w.start * heads),
                key_max[w.sequences], init, end_grad, ctx.scale, w.tables, (heads, 0),
                None if flags is None else flags[w.first_chunk : w.first_chunk + w.tables[3]], bias=bias,
            )
            if w.continued:
                handed, dh_start = dh_start[0], dh_start[1:]
            if dinit is not None:
                dinit[w.sequences[1:] if w.continued else w.sequences] = dh_start
        dbias = _bias_grad(grads[3], grads[4], gate_bias)
        grads = [g.view(1, length, *g.shape[1:]) for g in grads]
        dinit = None if dinit is None else dinit.to(ctx.h0_dtype)
        return (*grads, None, None, dinit, None, None, None, None, None, None, None, dbias)


def _window_backward(
    inputs, rows, key_max, start_state, dht, scale, tables, order, flags, dh_start=None, states=None, states_kept=False, bias=None,
):
    """One window of a low-memory backward: the gradients of its tokens written into the whole
    gradient tensors. inputs: q, k, v, z, u of the window ([B, W, H, D] views); rows: do, the query
    max, b and the five gradients as flat views from the window's first row (`_window_rows`);
    key_max, start_state and dht of the window's sequences (or sequence pieces); tables:
    `_regular_tables` or `_chunk_tables` of the window; order: the rows of the per-token tensors;
    flags: the window's chunk flags (int8 [chunks, H], the forward's), or None: then b is computed
    here, into the window's rows of b (the gate arena), and the flags with it. Returns the state gradient
    at each sequence's start in the window (fp32 [N, H, dk, dv]), written into `dh_start` when
    given (which may be dht itself: each state-pass program reads its block of dht before it
    writes that block). `bias`: as in `_gates`. `states`: the gradient arena (`_GradArena`,
    pointers at the window's first row) whose dq and dk are the rows' and that holds the window's
    h (`states_kept`) or receives it here; None: h in a buffer of its own, computed here."""
    q, k, v, z, u = inputs
    do, q_max, b, *grads = rows
    cu, offsets, table, total = tables
    if flags is None:
        work = _work_list(chunks=total, heads=q.shape[2], device=q.device)
        _, _, flags, _ = _gates(z, u, k, cu, table, total, key_max, order=order, work=work, b=b, bias=bias)
    else:
        work = _slow_chunks(flags)
    h = states
    if not states_kept:
        h, _ = _fwd_states(k, v, b, key_max, start_state, cu, offsets, total, False, order=order, into=states)
    dh, dh_start = _bwd_dstates(q, q_max, b, do, dht, cu, offsets, scale, total, v.shape[-1], order=order, dh0=dh_start)
    _bwd_main(
        q, k, v, z, u, b, flags, key_max, q_max, h, dh, do, table, cu, scale, total, order=order, out=tuple(grads), work=work,
        bias=bias,
    )
    return dh_start


def fast_chunk_mask(gate_logits: torch.Tensor, refine_logits: torch.Tensor, limit: Optional[float] = None) -> torch.Tensor:
    """Which chunks take the whole-chunk product kernels: the torch twin of `chunk_fast_flag`.

    Args:
        gate_logits, refine_logits: [B, T, H, dk] (one sequence per batch row).
        limit: the fast-path limit (default LAUNCH["fast_limit"]).
    Returns:
        bool [B, ceil(T / CHUNK_SIZE), H].
    """
    limit = _fast_limit() if limit is None else float(limit)
    batch, length, heads, dk = gate_logits.shape
    log_f = refined_log_gate(gate_logits, refine_logits)
    pad = (-length) % CHUNK_SIZE
    log_f = torch.nn.functional.pad(log_f, (0, 0, 0, 0, 0, pad))
    b = log_f.reshape(batch, -1, CHUNK_SIZE, heads, dk).cumsum(dim=2)
    b_ref, b_end = b[:, :, CHUNK_SIZE // 2 - 1], b[:, :, -1]
    fast = (b_ref.amin(-1) >= -limit) & ((b_end - b_ref).amin(-1) >= -limit)
    return fast & (limit >= 0)


def _segments_per_sequence(batch: int, heads: int, dk: int, dv: int, length: int) -> int:
    """How many equal segments to cut each sequence into (LAUNCH["segment_below_programs"],
    LAUNCH["segment_min_programs"])."""
    target = LAUNCH["segment_min_programs"]
    programs = _state_programs(dk, dv, batch * heads)
    segments = 1
    if programs >= LAUNCH["segment_below_programs"]:
        return segments
    while target > 0 and segments < 8 and programs * segments < target and length % (2 * segments * CHUNK_SIZE) == 0:
        segments *= 2
    return segments


def _by_segments(q, k, v, gate_logits, refine_logits, scale, key_max, initial_state, segments):
    """o [B, T, H, dv] with every sequence cut into `segments` segments (sequence-major: a view)."""
    from .segments import LocalSegmentExchange
    from .triton_segments import KeyMaxOfSequences, chunk_regla_segments_triton

    batch, length = q.shape[:2]
    cut = lambda x: x.reshape(batch * segments, length // segments, *x.shape[2:])
    key_max = KeyMaxOfSequences(segments) if key_max is None else key_max.repeat_interleave(segments, dim=0)
    exchange = LocalSegmentExchange(segments, sequence_major=True)
    o = chunk_regla_segments_triton(
        *(cut(x) for x in (q, k, v, gate_logits, refine_logits)), scale, key_max, exchange, initial_state,
    )
    return o.reshape(batch, length, *o.shape[2:])


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
    output_final_state: bool = True,
    low_memory: Union[bool, str] = False,
    gate_bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Backend function of `chunk_regla` (see chunk.py for the contract).

    gate_bias: added to the logits inside the kernels with LAUNCH["gate_bias_in_kernels"] (the
    segments route, and the default until that setting is GPU-checked, add it first).

    low_memory: True or "backward": the backward over time windows (`_ChunkReGLATritonWindowed`,
    with cu_seqlens `_ChunkReGLATritonPackedWindowed`, which keeps h per window in a buffer of
    its own), never as segments; "backward" keeps b from the forward, and h where it fits the
    gradient arena (without cu_seqlens; else the window start states), True computes both again.

    Returns o [B, T, H, dv] in q's dtype and the final state [N, H, dk, dv] in fp32 (None
    when output_final_state is False and the sequences went as segments, see
    LAUNCH["segment_min_programs"]).
    """
    _check(q, v)
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    dtype = q.dtype
    k, v, gate_logits, refine_logits = (x.to(dtype) for x in (k, v, gate_logits, refine_logits))
    segments = 1 if cu_seqlens is not None or output_final_state or low_memory else _segments_per_sequence(batch, heads, dk, dv, length)
    if gate_bias is not None and (segments > 1 or not LAUNCH["gate_bias_in_kernels"]):
        # added first: the segments path takes no bias of its own (and see LAUNCH)
        gate_logits, refine_logits = add_gate_bias(gate_logits, refine_logits, gate_bias)
        gate_bias = None
    if segments > 1:
        return _by_segments(q, k, v, gate_logits, refine_logits, scale, key_max, initial_state, segments), None
    if cu_seqlens is None:
        cu, offsets, table, total = _regular_tables(batch, length, q.device)
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
        offsets, table, total = _chunk_tables(cu, CHUNK_SIZE)
    # Strided views go in as they are (no copies): q and k with one layout, z and u with another.
    q, k = _one_layout(q, k)
    (v,) = _one_layout(v)
    gate_logits, refine_logits = _one_layout(gate_logits, refine_logits)
    if key_max is not None:  # else the gates kernel computes it
        key_max = key_max.detach().float().contiguous()
    h0 = None if initial_state is None else initial_state.contiguous()
    minor = cu_seqlens is None and _batch_minor(q)
    args = (q, k, v, gate_logits, refine_logits, float(scale), key_max, h0, cu, offsets, table, total, minor)
    keep_gates = low_memory == "backward"
    if low_memory and cu_seqlens is not None and total > 0:
        windows = _packed_windows(cu, offsets, total, _window_chunks(1, total, heads, dk, dv, dtype, length))
        o, state = _ChunkReGLATritonPackedWindowed.apply(*args, windows, keep_gates, gate_bias)
    elif low_memory and total > 0:
        spilled = _arena_spilled(q, v, cu, total, length)
        in_grads = spilled is not None
        window_chunks = _window_chunks(
            batch, total // batch, heads, dk, dv, dtype, batch * length, in_grads, starts=not (in_grads and keep_gates),
        )
        o, state = _ChunkReGLATritonWindowed.apply(*args, window_chunks, keep_gates, spilled, gate_bias)
    else:
        spilled = _arena_spilled(q, v, cu, total, None if cu_seqlens is not None else length)
        o, state = _ChunkReGLATriton.apply(*args, spilled, gate_bias)
    return _from_rows(o, batch, length, minor), state


chunk_regla_triton.supports_cu_seqlens = True
chunk_regla_triton.computes_key_max = True
chunk_regla_triton.optional_final_state = True
chunk_regla_triton.supports_low_memory = True
chunk_regla_triton.supports_gate_bias = True
