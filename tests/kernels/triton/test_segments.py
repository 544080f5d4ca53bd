"""The segments path of the Triton kernels (context parallelism's kernel side) in the
interpreter: equal segments, zero-state passes, the states and state gradients carried by an
exchange and added inside the kernels; against the one-pass fp64 recurrence."""

import pytest
import torch

from regla_kernels import LocalSegmentExchange, refined_log_gate, sequence_key_max
from regla_kernels.triton import segments as triton_segments
from regla_kernels.triton.backend import fast_chunk_mask, segments_per_sequence
from regla_kernels.triton.segments import segment_chunk_decays
from regla_kernels.triton.settings import MIN_HEAD_DIM
from tests.kernels.triton.cases import assert_outputs_match, by_segments, compare, make_inputs, run_backend, run_with

pytestmark = pytest.mark.interpreter

D = MIN_HEAD_DIM


class _RecordingExchange(LocalSegmentExchange):
    """LocalSegmentExchange with one slot per segment position, recording in `events` when each
    slot's communication starts and is waited for."""

    def __init__(self, segments, events):
        super().__init__(segments, slots=segments)
        self.events = events

    def start_incoming(self, slot, *args):
        self.events.append(f"start{slot}")
        wait = super().start_incoming(slot, *args)
        return lambda: self.events.append(f"wait{slot}") or wait()

    def start_outgoing(self, incoming_grads):
        self.events.append("start_grads")
        result = self.outgoing(incoming_grads)
        return lambda: self.events.append("wait_grads") or result


def test_segments_overlap_communication_with_compute(launch, monkeypatch):
    """With an exchange that starts its communication asynchronously, each slot's exchange is
    started before the next slot's gates and states and waited for only before its own output,
    the key max is waited for after the first gates kernel, and the backward's exchange runs
    while the states are recomputed; the result still equals the one-pass recurrence."""
    events = []
    stages = (("gates", "gates"), ("fwd_states", "states"), ("fwd_output", "output"), ("bwd_dstates", "dstates"), ("bwd_main", "grads"))
    for name, tag in stages:
        original = getattr(triton_segments, name)
        monkeypatch.setattr(triton_segments, name, lambda *a, _f=original, _t=tag, **kw: events.append(_t) or _f(*a, **kw))
    segments = 2
    inputs = make_inputs(2, 48 * segments, 2, D, D, seed=11)
    run = by_segments(
        segments,
        exchange_of=lambda s: _RecordingExchange(s, events),
        key_max_of=lambda k: lambda: events.append("key_max") or sequence_key_max(k).repeat(segments, 1),
    )
    got = run_with(run, inputs)
    assert events == [
        "gates", "key_max", "states", "start0", "gates", "states", "start1", "wait0", "output", "wait1", "output",
        "dstates", "start_grads", "states", "wait_grads", "grads",
    ], events
    assert_outputs_match(got, inputs)


@pytest.mark.parametrize(
    "segments, slots, fast_limit",
    [
        (2, 1, 60.0),
        pytest.param(4, 2, 60.0, marks=pytest.mark.slow),
        pytest.param(3, 1, -1.0, marks=pytest.mark.slow),
        pytest.param(3, 3, 17.0, marks=pytest.mark.slow),
    ],
)
def test_segments_with_carried_states_match_one_pass(segments, slots, fast_limit, launch):
    """Context parallelism's kernel path: equal segments, zero-state passes, the states and
    state gradients carried by the exchange and added inside the kernels; with slots > 1 the
    forward goes a group of segments at a time (the overlapped exchange's order). The segments
    path gives outputs only (a CP layer emits no final state)."""
    launch.update(fast_limit=fast_limit)
    inputs = make_inputs(2, 48 * segments, 2, 2 * D, D, seed=7 + segments)
    assert_outputs_match(run_with(by_segments(segments, slots), inputs), inputs)


def test_segment_chunk_decays_against_fp64_sums():
    """The one-launch segment decays: per chunk the exclusive sum before it and after it inside
    its segment, per segment the total (5 segments of 3 chunks, H * dk = 300 columns: a partial
    column block)."""
    decay = -torch.rand(15, 3, 100, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 7
    before, after, total, _ = segment_chunk_decays(decay.float(), 5)
    per = decay.view(5, 3, 3, 100)
    inclusive = per.cumsum(1)
    expected = [(inclusive - per).reshape(15, 3, 100), (per.sum(1, keepdim=True) - inclusive).reshape(15, 3, 100), per.sum(1)]
    for name, got, want in zip(("before", "after", "total"), (before, after, total), expected):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("fast_limit", [60.0, -1.0])
def test_carried_states_reach_later_chunks(fast_limit, launch):
    """Slow gates (log F about -0.003 per token) and segments of three chunks: the state
    carried into a segment still weighs in its last chunk, so the decay from the segment's
    start (forward) and to its end (backward) that the kernels apply to it is checked (with
    fast gates it is e^-30 there and any decay would pass)."""
    launch.update(fast_limit=fast_limit)
    inputs = make_inputs(2, 2 * 192, 2, 2 * D, D, seed=11, logit_scale=0.5)
    inputs[3] = inputs[3] + 5.0
    assert_outputs_match(run_with(by_segments(2), inputs), inputs)


def test_segment_reach_flags_against_fp64_sums():
    """The reach flags of `segment_chunk_decays`: bit 1 where some feature's decay from the
    segment start to the chunk is >= -105, bit 2 likewise to the segment end (chunk decays of
    -50 to -80: reached in a segment's first two chunks from its start, its last two from its
    end, and a mix between); features 100 (a padded block)."""
    decay = -(50.0 + 30.0 * torch.rand(20, 3, 100, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    _, _, _, reach = segment_chunk_decays(decay.float(), 5)
    per = decay.view(5, 4, 3, 100)
    inclusive = per.cumsum(1)
    for bit, to_chunk in ((1, inclusive - per), (2, per.sum(1, keepdim=True) - inclusive)):
        best = to_chunk.amax(-1).reshape(20, 3)
        clear = (best + 105.0).abs() > 1e-3  # fp32 sums may round across the edge
        got = (reach.long() & bit) != 0
        assert torch.equal(got[clear], (best >= -105.0)[clear]), bit
        assert got.any() and not got.all(), bit


@pytest.mark.slow
@pytest.mark.parametrize("slots", [1, 2])
def test_carried_states_in_reached_chunks_only(slots, launch):
    """Fast-decaying gates (log F about -1.5 per token, every chunk still on the whole-chunk
    kernels): a carried state reaches only the first chunks of a segment and a carried gradient
    only the last ones, so the fast output and dv kernels split their chunks over the launch
    with the carried product and the one without; together they equal the one-pass recurrence."""
    inputs = make_inputs(2, 4 * 256, 2, D, D, seed=13, logit_scale=0.3)
    inputs[3] = inputs[3] - 2.2
    assert fast_chunk_mask(inputs[3], inputs[4]).all()
    chunk_decay = refined_log_gate(inputs[3].double(), inputs[4].double()).reshape(2, 4, 4, 64, 2, D).sum(3)
    reached = (chunk_decay.cumsum(2) - chunk_decay).amax(-1) >= -105.0  # [batch, segment, chunk, head]
    assert reached.any() and not reached.all()
    assert_outputs_match(run_with(by_segments(4, slots), inputs), inputs)


@pytest.mark.slow
@pytest.mark.parametrize("length, segments", [(256, 4), (384, 2)])
def test_long_sequences_as_segments_on_one_device(length, segments, launch):
    """LAUNCH["segment_min_programs"]: without a final state asked for, every sequence is cut
    into equal segments (sequence-major, no copies) carried on this device: output and every
    gradient, the initial state's included, equal the one-pass recurrence; with the final
    state asked for, the one-pass kernels run."""
    launch.update(segment_min_programs=10**6)
    inputs = make_inputs(2, length, 2, D, D, seed=length)
    assert segments_per_sequence(2, 2, D, D, length) == segments
    assert_outputs_match(run_backend("triton", inputs, with_state=False), inputs)
    compare(inputs, bound=2e-5)  # with the final state: the one-pass path
