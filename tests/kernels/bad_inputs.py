"""Shared checks of the bad-input tests: one NaN or Inf placed in one input at one token, every
backend against its own clean run and the fp64 naive recurrence. Not a test module."""

import torch

from regla_kernels import chunk_regla

#: The inputs a bad value is placed in, as `chunk_regla` takes them (index in q, k, v, z, u).
FIELDS = {"q": 0, "k": 1, "v": 2, "gate_logits": 3, "refine_logits": 4}
#: T = 150 crosses the chunk boundaries of both chunked paths (32 and 64 tokens).
LENGTH = 150
#: Dense: batch row 0 gets the bad value at token 80 (inside a 64-token chunk, before its middle
#: row, and inside a 32-token chunk); packed: sequences of 70 and 80 tokens, the bad value at
#: global token 90 (token 20 of the second sequence).
DENSE_AT, PACKED_LENGTHS, PACKED_AT = 80, (70, 80), 90


def clean_inputs(batch: int, heads: int = 2, dk: int = 16, dv: int = 16, seed: int = 0):
    """[q, k, v, z, u] fp32 ([batch, LENGTH, heads, dk], v [..., dv]) and an fp32 initial state
    [batch, heads, dk, dv]; q, k, v ~ N(0, 1), z ~ N(1, 4), u ~ N(0, 4)."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda d, s=1.0: s * torch.randn(batch, LENGTH, heads, d, generator=gen)
    inputs = [draw(dk), draw(dk), draw(dv), draw(dk, 2.0) + 1.0, draw(dk, 2.0)]
    return inputs, torch.randn(batch, heads, dk, dv, generator=gen)


def run(backend: str, inputs, initial_state, cu_seqlens=None):
    """(o, final state) of `chunk_regla(backend=backend)` with the final state asked for."""
    return chunk_regla(*inputs, initial_state=initial_state, cu_seqlens=cu_seqlens, output_final_state=True, backend=backend)


def check_bad_value(backend: str, field: str, value: float, packed: bool) -> None:
    """One `value` (NaN or +-Inf) in input `field` at one token (one head, one feature): the
    backend's outputs before that token equal its clean run's (to fp32 rounding), its outputs at and
    after it are non-finite wherever the fp64 naive recurrence's are, and the other sequence
    (output and final state) is the clean run's."""
    batch = 1 if packed else 2
    inputs, state0 = clean_inputs(batch)
    cu = None
    at, row = DENSE_AT, 0
    if packed:
        cu = torch.tensor([0, PACKED_LENGTHS[0], sum(PACKED_LENGTHS)], dtype=torch.int32)
        at = PACKED_AT
        state0 = torch.cat([state0, state0 + 1.0])
    index = (row, at, 1, 3)
    # the clean run has 0 there: not the key max, so both runs share the key stabilizer
    inputs[FIELDS[field]][index] = 0.0
    bad = [x.clone() for x in inputs]
    bad[FIELDS[field]][index] = value
    want_o, want_state = run(backend, inputs, state0, cu)
    got_o, got_state = run(backend, bad, state0, cu)
    oracle_o, _ = run("naive", [x.double() for x in bad], state0.double(), cu)
    start = PACKED_LENGTHS[0] if packed else 0
    before, after = slice(start, at), slice(at, None)
    torch.testing.assert_close(got_o[row, before], want_o[row, before], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(oracle_o[row, :at]).all()
    oracle_bad = ~torch.isfinite(oracle_o[row, after])
    if value != value or field in ("q", "k", "v"):
        assert oracle_bad.any(), "the bad value reaches no output of the fp64 recurrence"
    assert (~torch.isfinite(got_o[row, after]))[oracle_bad].all(), "a non-finite output of the fp64 recurrence is finite here"
    if packed:
        torch.testing.assert_close(got_o[0, : PACKED_LENGTHS[0]], want_o[0, : PACKED_LENGTHS[0]], rtol=0, atol=0)
        torch.testing.assert_close(got_state[0], want_state[0], rtol=0, atol=0)
    else:
        torch.testing.assert_close(got_o[1], want_o[1], rtol=0, atol=0)
        torch.testing.assert_close(got_state[1], want_state[1], rtol=0, atol=0)
