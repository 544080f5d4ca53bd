"""Which tokens each context-parallel rank holds, and slicing a full batch to them.

Layouts (the order of a rank's local tokens, `[B, T_local, H, d]`):
- "zigzag": Megatron's `get_batch_on_this_cp_rank`: the sequence is cut in 2 CP equal
  chunks and rank r holds chunk r then chunk 2 CP - 1 - r (two halves of T_local that
  are NOT adjacent in the sequence).
- "contiguous": rank r holds chunk r of CP equal chunks.

Packed (THD) batches are cut per sequence the same way (`thd_cp_indices`). Plain torch: no
collective and no kernel here, so configuration code may import it.
"""

import inspect
from typing import Dict, List

import torch

CP_LAYOUTS = ("zigzag", "contiguous")


def check_cp_layout(layout: str) -> None:
    """Raise ValueError unless `layout` (str) is one of `CP_LAYOUTS`."""
    if layout not in CP_LAYOUTS:
        raise ValueError(f"unknown context-parallel layout {layout!r}; choose one of {CP_LAYOUTS}")


def cp_num_segments(layout: str, cp_size: int) -> int:
    """How many equal segments the full sequence is cut into: 2 CP (zigzag) or CP (contiguous)."""
    check_cp_layout(layout)
    return 2 * cp_size if layout == "zigzag" else cp_size


def cp_segment_indices(layout: str, cp_rank: int, cp_size: int) -> List[int]:
    """Sequence positions (segment indices, ints) of the segments `cp_rank` holds, in local order."""
    check_cp_layout(layout)
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside [0, {cp_size})")
    return [cp_rank, 2 * cp_size - 1 - cp_rank] if layout == "zigzag" else [cp_rank]


def cp_token_positions(layout: str, cp_rank: int, cp_size: int, local_length: int, device=None) -> torch.Tensor:
    """Global sequence position of each local token: int64 `[local_length]` on `device`."""
    segments = cp_segment_indices(layout, cp_rank, cp_size)
    if local_length % len(segments):
        raise ValueError(
            f"{layout} context parallelism needs a local sequence length divisible by {len(segments)} "
            f"(the rank's {len(segments)} segments), got {local_length}"
        )
    length = local_length // len(segments)
    return torch.cat([torch.arange(j * length, (j + 1) * length, device=device) for j in segments])


def get_batch_cp_slice(
    tensor: torch.Tensor, cp_rank: int, cp_size: int, layout: str = "zigzag", seq_dim: int = 1
) -> torch.Tensor:
    """This rank's tokens of a full-sequence tensor, cut as Megatron's `get_batch_on_this_cp_rank`
    does for "zigzag" (and in CP plain chunks for "contiguous").

    Args:
        tensor: any shape and dtype, the full sequence along `seq_dim` (length divisible by
            the number of segments).
    Returns:
        The local tensor, sequence length / CP along `seq_dim`, same dtype (a new tensor).
    """
    segments = cp_num_segments(layout, cp_size)
    length = tensor.shape[seq_dim]
    if length % segments:
        raise ValueError(
            f"{layout} context parallelism over {cp_size} ranks needs a sequence length divisible by {segments}, got {length}"
        )
    part = length // segments
    pieces = [tensor.narrow(seq_dim, j * part, part) for j in cp_segment_indices(layout, cp_rank, cp_size)]
    return torch.cat(pieces, dim=seq_dim)


def thd_cp_indices(cu_seqlens: torch.Tensor, cp_rank: int, cp_size: int, layout: str = "zigzag") -> torch.Tensor:
    """Positions of this rank's tokens in a packed (THD) batch: every sequence cut in 2 CP
    ("zigzag", the layout of TransformerEngine's `thd_get_partitioned_indices`, which Megatron's
    `get_thd_batch_on_this_cp_rank` uses) or CP ("contiguous") equal chunks, this rank's chunks
    of each sequence in sequence order.

    Args:
        cu_seqlens: [N + 1] int offsets of the packed sequences (padded: every length divisible
            by the number of chunks).
    Returns:
        int64 [T / CP] (on cu_seqlens' device).
    """
    segments = cp_num_segments(layout, cp_size)
    bounds = [int(b) for b in cu_seqlens.tolist()]
    pieces = []
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if (end - start) % segments:
            raise ValueError(
                f"packed sequence {n} has {end - start} tokens; {layout} context parallelism over {cp_size} ranks "
                f"needs every packed sequence length divisible by {segments} (pad them: cu_seqlens_q_padded)"
            )
        part = (end - start) // segments
        pieces += [torch.arange(start + j * part, start + (j + 1) * part) for j in cp_segment_indices(layout, cp_rank, cp_size)]
    return torch.cat(pieces).to(cu_seqlens.device)


def get_thd_cp_slice(
    tensor: torch.Tensor, cu_seqlens: torch.Tensor, cp_rank: int, cp_size: int, layout: str = "zigzag", seq_dim: int = 1
) -> torch.Tensor:
    """This rank's tokens of a packed (THD) tensor, per sequence as `thd_cp_indices` says.

    Args:
        tensor: any shape and dtype, the T packed tokens along `seq_dim`.
        cu_seqlens: [N + 1] int offsets of the packed sequences.
    Returns:
        The local tensor (a new tensor, same dtype), T / CP along `seq_dim`; its local offsets
        are cu_seqlens / CP.
    """
    return tensor.index_select(seq_dim, thd_cp_indices(cu_seqlens, cp_rank, cp_size, layout).to(tensor.device))


def megatron_cp_batch(batch: Dict[str, torch.Tensor], cp_group) -> Dict[str, torch.Tensor]:
    """This CP rank's part of a batch dict, cut by Megatron's own `get_batch_on_this_cp_rank`.

    Bridges its signatures: 0.16 takes `(batch, cp_group=)`; 0.19 adds a required
    `is_hybrid_cp` and reads `batch["cu_seqlens"]` (None: plain zigzag over the sequence).
    Tensors are `[micro_batch, seq, ...]`, any dtype; returns `[micro_batch, seq / CP, ...]`.
    """
    from megatron.core.utils import get_batch_on_this_cp_rank

    if "is_hybrid_cp" not in inspect.signature(get_batch_on_this_cp_rank).parameters:
        return get_batch_on_this_cp_rank(dict(batch), cp_group=cp_group)
    local = get_batch_on_this_cp_rank({"cu_seqlens": None, **batch}, is_hybrid_cp=False, cp_group=cp_group)
    return {key: local[key] for key in batch}


def in_sequence_order(gathered: torch.Tensor, layout: str, cp_size: int) -> torch.Tensor:
    """Per-rank segments all-gathered in rank order, `[CP * n, ...]`, reordered to sequence
    order (segment 0 first); same shape and dtype."""
    local = gathered.shape[0] // cp_size
    where = {j: r * local + slot for r in range(cp_size) for slot, j in enumerate(cp_segment_indices(layout, r, cp_size))}
    return gathered[[where[j] for j in range(cp_size * local)]]


__all__ = [
    "CP_LAYOUTS",
    "check_cp_layout",
    "cp_num_segments",
    "cp_segment_indices",
    "cp_token_positions",
    "get_batch_cp_slice",
    "get_thd_cp_slice",
    "in_sequence_order",
    "megatron_cp_batch",
    "thd_cp_indices",
]
