"""Split a fused projection along its features, with a backward that writes the pieces' gradients
into one buffer by row copies.

torch.split's backward concatenates the pieces' gradients (torch.cat). The Triton kernels
return some gradients as strided views (dq and dk share one buffer, dz and du another: rows of 2
d apart), and cat takes its generic element-by-element path for those: 2.52 ms for the five
gradients of one ReGLA layer at 64K tokens, H 16, d 128 (H200), where their bytes take about
0.8 ms to move. `split_features` copies each gradient's rows with 16-byte loads and stores
instead (a Triton kernel on CUDA, `regla_kernels.triton.rows`; `Tensor.copy_` elsewhere).
"""

from typing import List, Sequence

import torch


def _row_view(x: torch.Tensor):
    """x [..., D] as rows [R, D] with one row stride (a view), or None where its strides allow none."""
    if x.stride(-1) != 1:
        return None
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return None


def copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) for [..., D] tensors of one shape whose features are contiguous, each with
    any row strides: on CUDA one Triton launch (D a power of two), else Tensor.copy_."""
    dst_rows, src_rows = _row_view(dst), _row_view(src)
    d = dst.shape[-1]
    kernel = _row_kernel() if dst.is_cuda else None
    if kernel is None or dst_rows is None or src_rows is None or d & (d - 1) or src.dtype != dst.dtype:
        dst.copy_(src)
        return
    rows = dst_rows.shape[0]
    block_rows = max(1, 4096 // d)
    kernel[(-(-rows // block_rows),)](
        src_rows, dst_rows, rows, src_rows.stride(0), dst_rows.stride(0), D=d, BLOCK_ROWS=block_rows, num_warps=4,
    )


def _row_kernel():
    """`regla_kernels.triton.rows.copy_rows_kernel`, or None where Triton does not import."""
    try:
        from regla_kernels.triton.rows import copy_rows_kernel
    except ImportError:  # pragma: no cover - CPU-only installs without triton
        return None
    return copy_rows_kernel


class _SplitFeatures(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes):
        ctx.sizes = sizes
        ctx.set_materialize_grads(False)  # a piece without a gradient gets zeros here, not a zero tensor first
        return tuple(x.split(sizes, dim=-1))

    @staticmethod
    def backward(ctx, *grads):
        given = [g for g in grads if g is not None]
        if not given:
            return None, None
        whole = torch.empty(*given[0].shape[:-1], sum(ctx.sizes), device=given[0].device, dtype=given[0].dtype)
        start = 0
        for size, grad in zip(ctx.sizes, grads):
            piece = whole[..., start : start + size]
            if grad is None:
                piece.zero_()
            else:
                copy_rows(piece, grad)
            start += size
        return whole, None


def split_features(x: torch.Tensor, sizes: Sequence[int]) -> List[torch.Tensor]:
    """x.split(sizes, dim=-1) (views [..., size] each) whose backward assembles x's gradient
    ([..., sum(sizes)], contiguous, the pieces' dtype) by row copies (`copy_rows`), whatever the
    pieces' gradients' row strides; a piece without a gradient gets zeros."""
    if sum(sizes) != x.shape[-1]:
        raise ValueError(f"split_features: sizes {list(sizes)} sum to {sum(sizes)}, not x's {x.shape[-1]} features")
    return list(_SplitFeatures.apply(x, tuple(sizes)))
