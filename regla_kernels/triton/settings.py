"""Launch settings of the Triton ReGLA kernels and what they accept.

`LAUNCH` is a plain dict that benchmarks and tests may change at run time: every launcher reads
it when it launches. `POISON` (env REGLA_TRITON_POISON=1, or set this attribute) fills every
buffer the kernels write with NaN first (`regla_kernels.triton.buffers.empty`), so a check sees
any element they miss. Design notes and the measurements behind the values: docs/kernels.md.
"""

import functools
import os

import torch
import triton.language as tl

from regla_kernels.limits import TRITON_DTYPES, TRITON_MAX_HEAD_DIM, TRITON_MIN_HEAD_DIM, triton_head_dim_supported

CHUNK_SIZE = 64
SUB_CHUNK_SIZE = 16
MIN_HEAD_DIM, MAX_HEAD_DIM, SUPPORTED_DTYPES = TRITON_MIN_HEAD_DIM, TRITON_MAX_HEAD_DIM, TRITON_DTYPES

LAUNCH = {
    "sub_chunk": SUB_CHUNK_SIZE,
    "gates_warps": 1,
    "gates_stages": 2,  # loads in flight in the gates kernel's walk over a chunk's tokens
    "states_warps": 4,
    # Loads in flight in the sequential state passes: 3 took 16K from 5.89-5.91 to 5.80-5.82 ms
    # (H200, bf16, 64K tokens, H 16, d 128), the same elsewhere.
    "states_stages": 3,
    "output_warps": 8,
    "bwd_warps": 8,
    "block_v": 64,  # sub-chunk output kernel
    "states_block_k": 64,  # the sequential state passes (forward and backward)
    "states_block_v": 128,
    # Chunks whose gate factors all lie in [e^-fast_limit, e^fast_limit] take the whole-chunk
    # product kernels (fast.py); the rest the sub-chunk kernels with fp32 (tf32) products. A
    # negative value sends every chunk to the sub-chunk kernels.
    "fast_limit": 60.0,
    # Programs per multiprocessor of the sub-chunk kernels, which walk the list of chunks that
    # need them (`launch.slow_chunks`) instead of a grid over every chunk.
    "slow_programs_per_sm": 2,
    "fast_output_warps": 8,
    "fast_output_block_v": 64,
    # With a carried state (segments, context parallelism) the output kernel's extra product needs
    # 178 registers at value block 64 (one program per multiprocessor), 128 at 32 (two): H200,
    # 32K, 7.02 -> 6.87 ms.
    "fast_output_block_v_carried": 32,
    "fast_dv_warps": 8,
    "fast_dv_block_v": 128,
    # 4 warps with 32-wide key blocks hit an illegal memory access in bf16 on the H200 (Triton 3.6:
    # compute-sanitizer shows a shared-memory read past the allocation inside the compiled kernel;
    # docs/kernels.md): check any new dq/dk tile on the GPU.
    "fast_dqk_warps": 4,
    "fast_dqk_block_k": 64,
    "fast_dqk_block_v": 128,
    # Software-pipelining depth of the loops over value blocks (dv, dq/dk).
    "fast_dv_stages": 1,
    "fast_dqk_stages": 1,
    # Long sequences, few of them (B x H small): with a final state not asked for, and state
    # passes of fewer than segment_below_programs programs, cut each sequence into up to 8 equal
    # segments (the context-parallel kernel path, the states carried between them on this
    # device) until they have segment_min_programs: a state pass of few programs leaves most
    # multiprocessors idle. At 64 programs (B = 2, H 16, d 128) one pass is the faster (H200,
    # bf16, 32K: 6.09 ms at 2.29 GB against 6.30 ms at 2.87 GB as 4 segments), hence 64. 0 = off.
    "segment_below_programs": 64,
    # The H200's multiprocessor count: 4 segments at 32K (B = 2) were faster than 8.
    "segment_min_programs": 132,
    # Register caps (ptxas maxnreg) per kernel, 0 = none: a cap trades spills for more programs
    # per multiprocessor.
    "gates_maxnreg": 0,
    "states_maxnreg": 0,
    "fast_output_maxnreg": 0,
    # The dv launch with a carried state (segments) needs 170 registers, one program per
    # multiprocessor; capped at 128 (two): H200, 32K, 6.13 -> 6.07 ms. Without a carried state
    # the kernel needs 128 anyway.
    "fast_dv_maxnreg": 128,
    "fast_dqk_maxnreg": 0,
    # Windows of the low-memory backward (`chunk_regla(..., low_memory=...)`, `windows.py`): its
    # peak holds dh and dA of one window (b and h are in the gradients' buffers; h not where it
    # does not fit them, `buffers.states_fit_grads`), and where the windows compute h again the
    # forward keeps each later window's start state. 0 = as few windows as keep those within
    # window_memory_fraction of the backward's outputs (o and the input gradients, which any
    # backward holds): each window costs about 0.07-0.1 ms (H200, 8K). At the record shape
    # (bf16, 64K tokens, H 16, d 128): 2 windows with "backward", 1.95-1.98 GB, and 3 with
    # True, 1.86-1.96 GB.
    "backward_windows": 0,
    "window_memory_fraction": 0.21,
}
POISON = os.environ.get("REGLA_TRITON_POISON", "0") == "1"


def interpreting() -> bool:
    """Whether Triton runs the kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def register_cap(kernel: str) -> dict:
    """The launch option of LAUNCH[kernel + "_maxnreg"]: {"maxnreg": cap}, or {} when the cap is
    0 or the kernels run in the interpreter."""
    cap = LAUNCH.get(f"{kernel}_maxnreg", 0)
    return {"maxnreg": int(cap)} if cap and not interpreting() else {}


def fast_limit() -> float:
    """LAUNCH["fast_limit"] as a float (negative: no chunk takes the whole-chunk kernels)."""
    return float(LAUNCH["fast_limit"])


@functools.lru_cache(maxsize=None)
def multiprocessors() -> int:
    """Multiprocessors of the current CUDA device (1 without one)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return 1


def dot_dtype(dtype: torch.dtype):
    """Matrix-product operand dtype (a Triton dtype) for inputs of torch `dtype`: bf16 for bf16
    inputs, else fp32 (tf32 on the GPU)."""
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float32


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of the per-chunk states for inputs of `dtype`: bf16 for bf16 inputs (the
    product operand anyway), else fp32."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def triton_supports(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Triton kernels take q [..., dk] and v [..., dv] (head dims and q's dtype;
    the device aside)."""
    return triton_head_dim_supported(q.shape[-1]) and triton_head_dim_supported(v.shape[-1]) and q.dtype in SUPPORTED_DTYPES


def check_supported(q: torch.Tensor, v: torch.Tensor) -> None:
    """Raise a clear error unless the Triton kernels take q [..., dk] and v [..., dv]: ValueError
    for a head dim, TypeError for the dtype, RuntimeError for non-CUDA tensors outside the
    interpreter."""
    dk, dv = q.shape[-1], v.shape[-1]
    for name, d in (("dk", dk), ("dv", dv)):
        if not triton_head_dim_supported(d):
            raise ValueError(
                f"chunk_regla(backend='triton'): {name}={d} unsupported; head dims must be powers of two "
                f"in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] (use backend='torch')"
            )
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"chunk_regla(backend='triton'): dtype {q.dtype} unsupported; use one of "
            f"{[str(d) for d in SUPPORTED_DTYPES]} (float64: backend='torch')"
        )
    if not q.is_cuda and not interpreting():
        raise RuntimeError("chunk_regla(backend='triton'): needs CUDA tensors (or TRITON_INTERPRET=1); use backend='torch' on CPU")
