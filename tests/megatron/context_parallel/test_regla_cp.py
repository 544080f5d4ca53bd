"""`context_parallel_regla` on CPU/gloo against one process on the full sequence: outputs and
every input gradient (the initial state's included), for both layouts, packed sequences, bf16
strided inputs, negative controls, and the messages of bad input."""

import pytest

from tests.megatron.context_parallel.checks import NAMES
from tests.megatron.context_parallel.runs import cp_results, errors_above
from tests.support.distributed import RTOL


@pytest.mark.parametrize("cp_size", [2, 4])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_regla_cp_matches_one_process(cp_size, layout):
    bad = errors_above(cp_results(cp_size)[f"regla/{layout}"])
    assert not bad, f"CP={cp_size} {layout}: rel errors above {RTOL}: {bad}"


def test_negative_control_wrong_layout_is_detected():
    """Zigzag-sliced tokens run as 'contiguous' must NOT match: the comparison has teeth."""
    errors = cp_results(2)["regla/negative_control"]
    assert errors["output"] > 1e-2, errors
    assert max(errors[name] for name in NAMES) > 1e-2, errors


def test_clear_errors():
    messages = cp_results(2)["errors"]
    assert "divisible by 2" in messages["odd_zigzag"] and "T_local=5" in messages["odd_zigzag"], messages
    assert "unknown context-parallel layout 'ring'" in messages["layout"], messages


@pytest.mark.parametrize("cp_size,layout", [(2, "zigzag"), (4, "zigzag"), (2, "contiguous")])
def test_packed_sequences_under_cp_match_one_process(cp_size, layout):
    """Packed sequences (THD, B = 1) cut per sequence as TransformerEngine's partitioning does:
    output and every gradient, each sequence's initial state included, equal one process."""
    bad = errors_above(cp_results(cp_size)[f"packed/{layout}"])
    assert not bad, f"CP={cp_size} packed {layout}: rel errors above {RTOL}: {bad}"


def test_packed_negative_control_wrong_layout_is_detected():
    errors = cp_results(2)["packed/negative_control"]
    assert errors["output"] > 1e-2, errors


def test_packed_errors_under_cp():
    messages = cp_results(2)["errors"]
    assert "packed sequence 0 has 3 local tokens" in messages["packed_layer"], messages
    assert "divisible by 4" in messages["packed_mixer"] and "cu_seqlens_q_padded" in messages["packed_mixer"], messages


def test_bf16_strided_inputs():
    result = cp_results(2)["bf16"]
    assert result["dtype_ok"] and result["error"] < 1e-2, result  # bf16 output rounding
