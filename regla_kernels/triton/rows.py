"""The row-copy kernel of `regla_kernels.rows.copy_rows`: rows of one strided tensor into another."""

import triton
import triton.language as tl


@triton.jit
def copy_rows_kernel(src_ptr, dst_ptr, rows, SRC_STRIDE, DST_STRIDE, D: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """dst[r, :D] = src[r, :D] for BLOCK_ROWS rows per program (row strides in elements; any
    dtype, the same for both; launch cdiv(rows, BLOCK_ROWS) programs)."""
    r = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    c = tl.arange(0, D)
    inside = (r < rows)[:, None]
    x = tl.load(src_ptr + r[:, None] * SRC_STRIDE + c[None, :], mask=inside)
    tl.store(dst_ptr + r[:, None] * DST_STRIDE + c[None, :], x, mask=inside)
