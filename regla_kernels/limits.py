"""What each backend accepts: the one place for head-dim limits and backend names.

Plain Python (no Triton import), so that configuration checks can use it anywhere.
"""

import torch

#: Backend names `chunk_regla(backend=...)` takes from configuration: "auto" picks Triton for
#: CUDA tensors it supports and the chunked PyTorch path otherwise. ("naive", the
#: token-by-token oracle, is for tests.)
CONFIG_BACKENDS = ("auto", "triton", "torch")

#: The Triton kernels take head dims that are powers of two in this range.
TRITON_MIN_HEAD_DIM = 16
TRITON_MAX_HEAD_DIM = 128
#: Input dtypes of the Triton kernels (float64 runs on the PyTorch path).
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def triton_head_dim_supported(d: int) -> bool:
    """Whether a head dim d (int) is a power of two in [TRITON_MIN_HEAD_DIM, TRITON_MAX_HEAD_DIM]."""
    return TRITON_MIN_HEAD_DIM <= d <= TRITON_MAX_HEAD_DIM and d & (d - 1) == 0
