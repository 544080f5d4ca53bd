"""Where the Triton ReGLA kernels find their tokens: input strides, the row order of the
tensors they allocate, and the chunk tables of the sequences.

Inputs are read in place with any strides whose features are contiguous (`input_strides`:
Megatron's [s, b] activations seen as [b, s] need no copy); the per-token tensors the kernels
allocate (b, o, the query max, the gradients) are [B * T, H, D] in `row_order`, which for
batch-minor inputs is the same [s, b] order, so o and the gradients go back without a copy.
"""

import functools
from typing import List, Tuple

import torch

from regla_kernels.triton.settings import CHUNK_SIZE


def dims(x: torch.Tensor) -> Tuple[int, int, int]:
    """(tokens, heads, features) of x [T, H, D] or [B, T, H, D] (tokens = B * T)."""
    return x.shape[:-2].numel(), x.shape[-2], x.shape[-1]


def input_strides(x: torch.Tensor) -> Tuple[int, int, int]:
    """(S_T, S_N, S_H): token `tok` (batch rows one after another) of sequence n, head h of x
    [T, H, D] or [B, T, H, D] starts tok * S_T + n * S_N + h * S_H elements after x's first
    (`stages.input_rows`). With B > 1 the sequences are the batch rows, so a strided view, e.g.
    Megatron's [s, b] activations seen as [b, s], needs no copy. Raises ValueError unless the
    features are contiguous."""
    if x.stride(-1) != 1:
        raise ValueError(f"Triton ReGLA kernels: features must be contiguous (stride 1), got strides {x.stride()}")
    if x.dim() == 3:
        return x.stride(0), 0, x.stride(1)
    batch, length = x.shape[:2]
    return x.stride(1), (x.stride(0) - length * x.stride(1)) if batch > 1 else 0, x.stride(2)


def one_layout(*xs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """xs as they are when they share one `input_strides` (one set of stride arguments in the
    kernels) with contiguous features, else contiguous copies."""
    if all(x.stride(-1) == 1 for x in xs) and len({input_strides(x) for x in xs}) == 1:
        return xs
    return tuple(x.contiguous() for x in xs)


def batch_minor(x: torch.Tensor) -> bool:
    """Whether x [B, T, H, D] (B > 1) lies in memory as [T, B, ...]: Megatron's [s, b]
    activations seen as [b, s]."""
    return x.dim() == 4 and x.shape[0] > 1 and x.stride(0) < x.stride(1)


def row_order(batch: int, length: int, heads: int, minor: bool) -> Tuple[int, int]:
    """(R_T, R_N) of `stages.token_rows`: the order of the per-token tensors the kernels allocate
    (b, the query max, o, the gradients) and of do, for B sequences of T tokens and H heads.
    Batch-minor inputs (`minor`, `batch_minor`) get them in the same [s, b] order."""
    return (batch * heads, heads - length * batch * heads) if minor else (heads, 0)


def from_rows(flat: torch.Tensor, batch: int, length: int, minor: bool) -> torch.Tensor:
    """[B * T, H, D] in `row_order` -> [B, T, H, D] (a view)."""
    if minor:
        return flat.view(length, batch, *flat.shape[1:]).transpose(0, 1)
    return flat.view(batch, length, *flat.shape[1:])


def window_order(batch: int, length: int, window: int, heads: int, minor: bool) -> Tuple[int, int]:
    """(R_T, R_N) that address the whole per-token tensors (do, the query max, b, the gradients;
    pointers at the window's first token) with the tables of a window of `window` tokens of
    every sequence: token t of sequence n is then n * window + t (`stages.token_rows`)."""
    row_t, row_n = row_order(batch, length, heads, minor)
    return row_t, row_n + (length - window) * row_t


def window_rows(tensors, first_row: int) -> List[torch.Tensor]:
    """Flat [rows, D] views of [T, H, D] tensors (contiguous rows, or a 16-bit gate arena's dz
    and du) from row `first_row` on."""
    return [x.flatten(0, -2)[first_row:] for x in tensors]


def chunk_tables(cu_seqlens: torch.Tensor, chunk: int):
    """(offsets, table, total) of sequences with int offsets cu_seqlens [N + 1] cut into chunks
    of `chunk` tokens: the first global chunk per sequence (int32 [N]), per global chunk its
    (sequence, chunk in sequence) (int32 [total, 2]), and the chunk count (int; a host sync)."""
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
def regular_tables(batch: int, length: int, device: torch.device):
    """(cu, offsets, table, total) of `chunk_tables` (CHUNK_SIZE chunks) for B sequences of T
    tokens, cu int32 [B + 1], made once per (B, T, device): the general tables need the chunk
    count on the host (a device sync)."""
    cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32)[: batch + 1]
    offsets, table, total = chunk_tables(cu, CHUNK_SIZE)
    return cu.to(device), offsets.to(device), table.to(device), total
