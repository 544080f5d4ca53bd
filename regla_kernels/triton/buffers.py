"""The buffers of the Triton ReGLA kernels, and the rules that let one buffer hold two things.

The forward's cumulative log gate b and chunk-start states h are kept for the backward, each
in the buffer of the gradients the last backward stage writes over them: b in the gate-logit
gradients' (`gate_arena`), h in dq's and dk's (`GradArena`, where `states_fit_grads`). Neither
then costs memory of its own: 0.54 GB each at the record shape (bf16, 64K tokens, H 16, d 128).
"""

from typing import NamedTuple, Optional, Tuple

import torch

from regla_kernels.triton import settings
from regla_kernels.triton.layout import dims
from regla_kernels.triton.settings import CHUNK_SIZE, LAUNCH, state_dtype
from regla_kernels.triton.stages import GATE_BLOCK


def empty(*shape: int, device, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(*shape), or NaN-filled where `settings.POISON` is set (read at each call)."""
    if settings.POISON:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(*shape, device=device, dtype=dtype)


def gate_arena(tokens: int, heads: int, dk: int, dtype: torch.dtype, device: torch.device):
    """(b, dz, du): b (the cumulative log gate, fp32 [T, H, dk], `launch.gates`) and the gate-logit
    gradients ([T, H, dk] in `dtype`, each with contiguous features). 16-bit: one buffer, a row
    of b being the row of dz then the row of du ([T, H, 2, dk]), which the last kernels that read
    b write over it (`stages.store_gate_grads`; `stages.gate_slots` orders b's row so that each
    dq/dk program overwrites only what it read). fp32: three buffers (b is as large as dz)."""
    if dtype == torch.float32:
        return tuple(empty(tokens, heads, dk, device=device, dtype=dtype) for _ in range(3))
    rows = empty(tokens, heads, 2, dk, device=device, dtype=dtype)
    return rows.view(tokens, heads, 2 * dk).view(torch.float32), rows[:, :, 0], rows[:, :, 1]


class GradArena(NamedTuple):
    """dq and dk of a backward in one buffer (q's dtype) that holds the chunk-start states h until
    the gradient kernels write dq and dk over them (`stages.state_offsets`). buffer: flat, a row
    of 2 dk per token and head (dq's row, then dk's; [T, H, 2, dk]), then the states of each
    sequence's last, shorter chunk from element `spill` on ([N, H, dk, dv], where some sequence
    has one); dq and dk are views of it (`grad_arena_of`). At dv = 2 C the arena is as large as
    the h it holds; at dv = C twice as large, so a forward that keeps it keeps dq and dk's size,
    not h's."""

    buffer: torch.Tensor
    spill: int

    def from_row(self, first_row: int, dk: int) -> "GradArena":
        """The arena as the kernels of a window address it: pointers at row `first_row`."""
        cut = first_row * 2 * dk
        return GradArena(self.buffer[cut:], self.spill - cut)


def states_fit_grads(dk: int, dv: int, dtype: torch.dtype) -> bool:
    """Whether h can live in the dq/dk gradient arena (`GradArena`) for inputs of `dtype`: its
    dtype is the gradients' (bf16, fp32; fp16 keeps fp32 states), a dq/dk key block (GATE_BLOCK
    features) of a chunk has room for that block's h rows in a layout `stages.state_offsets`
    knows (dv = GATE_BLOCK or 2 GATE_BLOCK = 2 C: two or one h rows per token) and the dq/dk
    kernel's key block is GATE_BLOCK."""
    block = GATE_BLOCK.value
    return (
        state_dtype(dtype) == dtype
        and dv in (block, 2 * block)
        and dk % block == 0
        and min(dk, LAUNCH["fast_dqk_block_k"]) == block
        and CHUNK_SIZE == block
    )


def grad_arena(tokens: int, heads: int, dk: int, dv: int, spilled_sequences: int, dtype: torch.dtype, device):
    """(arena, dq, dk): a `GradArena` of `tokens` tokens with room for the states of
    `spilled_sequences` sequences' last, shorter chunks (all sequences where any has one: the
    kernels index the spill by sequence), as `grad_arena_of` gives it."""
    rows = tokens * heads * 2 * dk
    buffer = empty(rows + spilled_sequences * heads * dk * dv, device=device, dtype=dtype)
    return grad_arena_of(buffer, tokens, heads, dk)


def grad_arena_of(buffer: torch.Tensor, tokens: int, heads: int, dk: int):
    """(arena, dq, dk) of a flat buffer `grad_arena` made (also a saved tensor back in the
    backward): the `GradArena` and its dq and dk, [T, H, dk] views."""
    rows = tokens * heads * 2 * dk
    pairs = buffer[:rows].view(tokens, heads, 2, dk)
    return GradArena(buffer, rows), pairs[:, :, 0], pairs[:, :, 1]


def state_args(h) -> Tuple[torch.Tensor, int, bool]:
    """The kernels' (h pointer, spill, IN_GRADS) of chunk-start states h: a tensor [chunks, H,
    dk, dv] of their own, or a `GradArena`."""
    if isinstance(h, GradArena):
        return h.buffer, h.spill, True
    return h, 0, False


def spilled_sequences(cu: torch.Tensor, length: Optional[int]) -> int:
    """Sequences a `GradArena` keeps spill room for: all of them where any has a last, shorter
    chunk. cu: int [N + 1] offsets; `length`: that of B equal sequences, or None for packed ones
    (then read from cu on the host)."""
    if length is not None:
        return 0 if length % CHUNK_SIZE == 0 else cu.numel() - 1
    lengths = cu[1:] - cu[:-1]
    return cu.numel() - 1 if bool((lengths % CHUNK_SIZE != 0).any()) else 0


def arena_spilled(q: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, total: int, length: Optional[int]) -> Optional[int]:
    """The spilled sequences of a `GradArena` for q [..., dk] and v [..., dv] (`spilled_sequences`;
    `total` chunks in all), or None where h does not fit one (`states_fit_grads`) or the spill
    (one state per sequence) would be larger than the h it replaces (one per chunk: packed input
    with many empty sequences)."""
    if not states_fit_grads(q.shape[-1], v.shape[-1], q.dtype):
        return None
    spilled = spilled_sequences(cu, length)
    return None if spilled > total else spilled


def states_arena(q: torch.Tensor, v: torch.Tensor, spilled: Optional[int]):
    """(arena, dq, dk) of `grad_arena` for q's and v's shapes with `spilled` spilled sequences
    (`arena_spilled`), or (None, None, None) where that is None (h does not fit one)."""
    if spilled is None:
        return None, None, None
    tokens, heads, dk = dims(q)
    return grad_arena(tokens, heads, dk, v.shape[-1], spilled, q.dtype, q.device)


def buffer_of(arena: Optional[GradArena]) -> Tuple[Optional[torch.Tensor]]:
    """(the buffer of a `GradArena`, or None), for save_for_backward."""
    return (None if arena is None else arena.buffer,)


def grad_rows(x: torch.Tensor) -> torch.Tensor:
    """A fresh gradient of x [..., H, D] as the kernels write it ([T, H, D] in x's dtype)."""
    return empty(dims(x)[0], x.shape[-2], x.shape[-1], device=x.device, dtype=x.dtype)


def value_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Fresh dq, dk, dv ([T, H, D] each in its input's dtype; the gate gradients live in the
    gate arena)."""
    return tuple(grad_rows(x) for x in (q, k, v))


def output_grad(do: Optional[torch.Tensor], rows: int, like: torch.Tensor) -> torch.Tensor:
    """do as the kernels read it (contiguous rows), or zeros [rows, H, dv] like `like` [..., H, dv]
    when autograd passed None (o unused: the Functions do not materialize the gradients of
    unused outputs, which for an unused final state would be a zero-filled fp32 [N, H, dk, dv]
    buffer)."""
    if do is None:
        return torch.zeros(rows, like.shape[-2], like.shape[-1], device=like.device, dtype=like.dtype)
    return do.contiguous()


def pair_stride(first: torch.Tensor, second: torch.Tensor) -> int:
    """The kernels' GS or QS for a pair of gradient buffers ([rows, dk] views: dz and du, or dq and
    dk): 1 (contiguous rows each) or 2 (one buffer whose rows alternate: a 16-bit `gate_arena`
    over b, a `GradArena`)."""
    dk = first.shape[-1]
    if first.stride(-2) == second.stride(-2) == dk:
        return 1
    if first.stride(-2) == second.stride(-2) == 2 * dk and second.data_ptr() == first.data_ptr() + dk * first.element_size():
        return 2
    raise ValueError(f"Triton ReGLA kernels: gradient rows of strides {first.stride(-2)}, {second.stride(-2)} are not a layout they write")
