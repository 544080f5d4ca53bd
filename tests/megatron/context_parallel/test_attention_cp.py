"""`ContextParallelDotProductAttention` on CPU/gloo against one process: alone against full causal
SDPA (both layouts, with a Megatron mask), and as Megatron's SelfAttention core_attention."""

import pytest

from tests.megatron.context_parallel.runs import cp_results, errors_above
from tests.support.distributed import RTOL


@pytest.mark.parametrize("cp_size,check", [(2, "zigzag"), (2, "contiguous"), (2, "zigzag_with_mask"), (4, "zigzag")])
def test_cp_attention_matches_full_causal_sdpa(cp_size, check):
    bad = errors_above(cp_results(cp_size)[f"attention/{check}"])
    assert not bad, f"CP={cp_size} attention {check}: rel errors above {RTOL}: {bad}"


def test_cp_attention_as_megatron_core_attention():
    """SelfAttention(core_attention=ContextParallelDotProductAttention) at CP=2 zigzag equals
    SelfAttention(core_attention=DotProductAttention) on the full sequence."""
    bad = errors_above(cp_results(2)["attention/self_attention"])
    assert not bad, f"SelfAttention under CP: rel errors above {RTOL}: {bad}"
