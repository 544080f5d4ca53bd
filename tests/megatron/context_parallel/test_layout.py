"""`regla_megatron.context_parallel.layout`: the slices partition the sequence, agree with the
token positions and with Megatron's own `get_batch_on_this_cp_rank`, and bad sizes are clear errors."""

import pytest
import torch

from regla_megatron.context_parallel.layout import (
    cp_segment_indices,
    cp_token_positions,
    get_batch_cp_slice,
    in_sequence_order,
    thd_cp_indices,
)
from tests.megatron.context_parallel.runs import cp_results


@pytest.mark.parametrize("cp_size", [2, 4])
def test_zigzag_slice_matches_megatron(cp_size):
    assert cp_results(cp_size)["megatron_slice"]


def test_thd_slices_partition_each_sequence():
    cu = torch.tensor([0, 8, 24, 32])
    for layout, size in (("zigzag", 2), ("zigzag", 4), ("contiguous", 4)):
        parts = [thd_cp_indices(cu, rank, size, layout) for rank in range(size)]
        assert sorted(torch.cat(parts).tolist()) == list(range(32))
    # zigzag CP=2, rank 0: chunks 0 and 3 of every sequence
    assert thd_cp_indices(cu, 0, 2).tolist() == [0, 1, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23, 24, 25, 30, 31]
    with pytest.raises(ValueError, match="packed sequence 0 has 8 tokens.*divisible by 32"):
        thd_cp_indices(cu, 0, 16)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("cp_size", [1, 2, 3, 4])
def test_token_positions_match_slices(layout, cp_size):
    length = 24
    cuts = [get_batch_cp_slice(torch.arange(length), r, cp_size, layout, seq_dim=0) for r in range(cp_size)]
    assert sorted(torch.cat(cuts).tolist()) == list(range(length))  # a partition of the sequence
    for rank, cut in enumerate(cuts):
        assert torch.equal(cut, cp_token_positions(layout, rank, cp_size, length // cp_size))


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_in_sequence_order_undoes_the_rank_order(layout):
    cp_size = 3
    gathered = torch.tensor([j for r in range(cp_size) for j in cp_segment_indices(layout, r, cp_size)])
    assert in_sequence_order(gathered, layout, cp_size).tolist() == list(range(len(gathered)))


def test_layout_errors():
    with pytest.raises(ValueError, match="divisible by 8"):
        get_batch_cp_slice(torch.zeros(2, 12), 0, 4, "zigzag")
    with pytest.raises(ValueError, match="divisible by 2"):
        cp_token_positions("zigzag", 0, 2, 7)
    with pytest.raises(ValueError, match="unknown context-parallel layout"):
        get_batch_cp_slice(torch.zeros(2, 12), 0, 2, "ring")
    with pytest.raises(ValueError, match="outside"):
        cp_token_positions("contiguous", 2, 2, 8)
