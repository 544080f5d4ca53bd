"""Bad input to the Triton kernels (interpreter): NaN and Inf behave like the causal fp64
recurrence where the kernels already keep them causal, empty and mixed-dtype inputs work as on
the PyTorch path, and malformed decode states raise a clear ValueError before any kernel runs.

Not yet causal on this path (README, Limitations): a NaN or Inf value, an Inf key and a NaN
logit reach outputs before their token within a chunk (0 x NaN in the masked intra-chunk
products, the key max, the capped log gate); the in-kernel guards for them wait for a GPU check.
"""

import math

import pytest
import torch

from regla_kernels import chunk_regla
from tests.kernels.bad_inputs import FIELDS, check_bad_value
from tests.kernels.test_bad_input import check_empty, check_step_validation, empty_case_inputs

pytestmark = pytest.mark.interpreter


CAUSAL_ON_TRITON = [("q", math.nan), ("q", math.inf), ("k", math.nan), ("gate_logits", math.inf), ("refine_logits", math.inf)]


@pytest.mark.parametrize("field, value", CAUSAL_ON_TRITON)
@pytest.mark.parametrize("packed", [False, True])
def test_nan_and_inf_stay_causal(field, value, packed):
    assert field in FIELDS
    check_bad_value("triton", field, value, packed)


@pytest.mark.parametrize("batch, length", [(2, 0), (0, 40), (0, 0)])
def test_empty_batch_or_sequence(batch, length):
    state, state0 = check_empty("triton", batch, length)
    if length == 0:
        torch.testing.assert_close(state, state0.detach(), rtol=0, atol=0)


def test_empty_packed_sequences_keep_the_initial_state():
    cu = torch.tensor([0, 0, 30, 30, 70, 70], dtype=torch.int32)
    state, state0 = check_empty("triton", 1, 70, cu_seqlens=cu, sequences=5)
    for n in (0, 2, 4):
        torch.testing.assert_close(state[n], state0[n].detach(), rtol=0, atol=0)


@pytest.mark.parametrize("other", [torch.float64, torch.float16])
def test_mixed_dtypes_work(other):
    q, k, v, z, u, _ = empty_case_inputs(1, 40, dtype=torch.float64)
    mixed = [q.detach().float()] + [x.detach().to(other) for x in (k, v, z, u)]
    o, state = chunk_regla(*mixed, output_final_state=True, backend="triton")
    assert o.dtype == torch.float32 and torch.isfinite(o).all() and torch.isfinite(state).all()
    want, _ = chunk_regla(*mixed, output_final_state=True, backend="torch")
    torch.testing.assert_close(o, want, rtol=2e-3, atol=2e-4)


def test_step_validates_state_and_running_max():
    check_step_validation("triton")
