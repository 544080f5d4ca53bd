"""`ReGLAMixer` under context parallelism on CPU/gloo equals the same weights at CP=1: plain
batches (CP=2, and CP=2 next to TP=2) and Megatron's packed sequences."""

import pytest

from tests.megatron.context_parallel.runs import cp_results, errors_above
from tests.support.distributed import RTOL


@pytest.mark.parametrize("world,check", [(2, "zigzag"), (4, "tp2_cp2_zigzag")])
def test_regla_mixer_under_cp_matches_one_process(world, check):
    """ReGLAMixer (which calls context_parallel_regla when context_parallel_size > 1) at CP=2
    zigzag (alone, and next to TP=2) equals the same weights at CP=1, parameter grads included."""
    bad = errors_above(cp_results(world)[f"mixer/{check}"])
    assert not bad, f"ReGLAMixer under CP: rel errors above {RTOL}: {bad}"


def test_packed_mixer_under_cp_matches_one_process():
    """ReGLAMixer with Megatron's PackedSeqParams at CP=2 (zigzag per sequence) equals CP=1."""
    bad = errors_above(cp_results(2)["mixer/packed_zigzag"])
    assert not bad, f"packed ReGLAMixer under CP: rel errors above {RTOL}: {bad}"
