"""Cases for the Triton kernels under TRITON_INTERPRET=1, against the fp64 naive recurrence.

Not collected by itself (the name does not start with test_): tests/test_triton_interpret.py
runs this module in a child pytest process with TRITON_INTERPRET=1, since Triton reads the
variable when the kernels are defined. Tiny shapes: head dims MIN_HEAD_DIM and
2 * MIN_HEAD_DIM, T not a multiple of the chunk. bf16 is checked on the GPU only
(benchmarks/gpu_check_kernels.py): the interpreter's bf16 emulation does not reproduce the
GPU's bf16 products.
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run through tests/test_triton_interpret.py (needs TRITON_INTERPRET=1 before triton loads)")

import triton  # noqa: E402  (after the TRITON_INTERPRET check: Triton reads it on import)
import triton.language as tl  # noqa: E402

from regla_kernels.triton_stages import GATE_BLOCK, gate_slots, refined_log_gate_grad_tl, state_offsets  # noqa: E402

NAMES = ["o", "final_state", "dq", "dk", "dv", "dgate", "drefine", "dinitial"]


def _inputs(batch, length, heads, dk, dv, sequences=None, dtype=torch.float32, logit_scale=2.0, seed=0, saturated=False):
    gen = torch.Generator().manual_seed(seed)
    draw = lambda d, s=1.0: s * torch.randn(batch, length, heads, d, generator=gen, dtype=torch.float64)
    q, k, v = draw(dk), draw(dk), draw(dv)
    if saturated:  # logits at +-30: every gate rounds to 0 or 1
        z, u = 30.0 * torch.sign(draw(dk)), 30.0 * torch.sign(draw(dk))
    else:
        z, u = draw(dk, logit_scale) + 1.0, draw(dk, logit_scale)
    state = torch.randn(sequences or batch, heads, dk, dv, generator=gen, dtype=torch.float64)
    return [x.to(dtype) for x in (q, k, v, z, u)] + [state.float()]


def _run(backend, inputs, cu_seqlens=None, with_state=True):
    from regla_kernels import chunk_regla

    def function(*args, **kwargs):
        return chunk_regla(*args, **kwargs, output_final_state=with_state, backend=backend)

    return _run_with(function, inputs, cu_seqlens)


def _run_with(function, inputs, cu_seqlens=None):
    """Outputs, final state (None if the function gives none) and every input gradient of a
    fixed random projection of both."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    o, state = function(*leaves[:5], initial_state=leaves[5], cu_seqlens=cu_seqlens)
    gen = torch.Generator().manual_seed(99)
    loss = (o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
    if state is not None:
        loss = loss + (state.double() * torch.randn(state.shape, generator=gen, dtype=torch.float64)).sum()
    loss.backward()
    return [o.detach(), None if state is None else state.detach()] + [x.grad for x in leaves]


def _compare(inputs, bound, cu_seqlens=None, gate_bound=None):
    got = _run("triton", inputs, cu_seqlens)
    ref = _run("naive", [x.double() for x in inputs], cu_seqlens)
    for name, a, b in zip(NAMES, got, ref):
        assert torch.isfinite(a).all(), name
        error = ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()
        if name in ("dgate", "drefine") and gate_bound is not None:
            # saturated gates: the true gate gradients are ~1e-13 (F is 0 or 1 to fp64); the
            # reverse-cumsum identity gives them to an absolute error of fp32 rounding of the
            # q.dq and k.dk terms, so bound the error against the key gradient's size.
            error = ((a.double() - b).norm() / ref[3].norm()).item()
            assert error < gate_bound, (name, error)
        else:
            assert error < bound, (name, error)


@pytest.fixture
def launch():
    from regla_kernels import triton_chunk

    saved = dict(triton_chunk.LAUNCH)
    yield triton_chunk
    triton_chunk.LAUNCH.clear()
    triton_chunk.LAUNCH.update(saved)


@pytest.mark.parametrize("shape", [(2, 37, 2, 1, 1), (1, 150, 2, 2, 1)])
def test_forward_gradients_and_states_fp32(shape, launch):
    batch, length, heads, dk_mult, dv_mult = shape
    d = launch.MIN_HEAD_DIM
    _compare(_inputs(batch, length, heads, d * dk_mult, d * dv_mult), bound=2e-5)


@pytest.mark.parametrize("logit_scale", [0.5, 3.0])
def test_product_and_mixed_diagonal_blocks(logit_scale, launch):
    """diag_limit=40: logit scale 0.5 takes the masked product in every chunk (of these
    inputs), 3.0 mixes it with the elementwise fallback chunk by chunk."""
    d = launch.MIN_HEAD_DIM
    launch.LAUNCH.update(diag_limit=40.0)
    _compare(_inputs(2, 150, 2, 2 * d, d, logit_scale=logit_scale, seed=5), bound=2e-5)


@pytest.mark.parametrize("fast_limit", [-1.0, 17.0, 60.0])
def test_whole_chunk_products_and_sub_chunk_kernels(fast_limit, launch):
    """fast_limit -1: every chunk in the sub-chunk kernels; 17: a mix, chunk by chunk;
    60: every chunk of these inputs in the whole-chunk product kernels."""
    d = launch.MIN_HEAD_DIM
    launch.LAUNCH.update(fast_limit=fast_limit)
    inputs = _inputs(2, 150, 2, 2 * d, d, logit_scale=1.0, seed=6)
    fast = launch.fast_chunk_mask(inputs[3], inputs[4])
    expected = {-1.0: "none", 17.0: "some", 60.0: "all"}[fast_limit]
    observed = "all" if fast.all() else ("none" if not fast.any() else "some")
    assert observed == expected, fast
    _compare(inputs, bound=2e-5)


def _by_segments(segments, slots=1):
    """chunk_regla's signature, computed as `segments` equal segments with the state carried by the exchange."""
    from regla_kernels import LocalSegmentExchange, chunk_regla_segments, sequence_key_max

    def run(q, k, v, z, u, initial_state=None, cu_seqlens=None):
        batch, length = q.shape[:2]
        cut = lambda x: x.reshape(batch, segments, length // segments, *x.shape[2:]).transpose(0, 1).flatten(0, 1)
        key_max = sequence_key_max(k).repeat(segments, 1)
        exchange = LocalSegmentExchange(segments, slots)
        o = chunk_regla_segments(*(cut(x) for x in (q, k, v, z, u)), exchange, key_max=key_max, initial_state=initial_state)
        return o.reshape(segments, batch, length // segments, *o.shape[2:]).transpose(0, 1).reshape(batch, length, *o.shape[2:]), None

    return run


def _recording_exchange(segments, events):
    """LocalSegmentExchange with one slot per segment position, recording when each slot's
    communication starts and is waited for."""
    from regla_kernels import LocalSegmentExchange

    class Recording(LocalSegmentExchange):
        def start_incoming(self, slot, *args):
            events.append(f"start{slot}")
            wait = super().start_incoming(slot, *args)
            return lambda: events.append(f"wait{slot}") or wait()

        def start_outgoing(self, incoming_grads):
            events.append("start_grads")
            result = self.outgoing(incoming_grads)
            return lambda: events.append("wait_grads") or result

    return Recording(segments, slots=segments)


def test_segments_overlap_communication_with_compute(launch, monkeypatch):
    """With an exchange that starts its communication asynchronously, each slot's exchange is
    started before the next slot's gates and states and waited for only before its own output,
    the key max is waited for after the first gates kernel, and the backward's exchange runs
    while the states are recomputed; the result still equals the one-pass recurrence."""
    from regla_kernels import chunk_regla_segments, sequence_key_max, triton_segments

    events = []
    for name, tag in (("_gates", "gates"), ("_fwd_states", "states"), ("_fwd_output", "output"),
                      ("_bwd_dstates", "dstates"), ("_bwd_main", "grads")):
        original = getattr(triton_segments, name)
        monkeypatch.setattr(triton_segments, name, lambda *a, _f=original, _t=tag, **kw: events.append(_t) or _f(*a, **kw))
    segments, d = 2, launch.MIN_HEAD_DIM
    inputs = _inputs(2, 48 * segments, 2, d, d, seed=11)

    def run(q, k, v, z, u, initial_state=None, cu_seqlens=None):
        batch, length = q.shape[:2]
        cut = lambda x: x.reshape(batch, segments, length // segments, *x.shape[2:]).transpose(0, 1).flatten(0, 1)
        key_max = lambda: events.append("key_max") or sequence_key_max(k).repeat(segments, 1)
        exchange = _recording_exchange(segments, events)
        o = chunk_regla_segments(*(cut(x) for x in (q, k, v, z, u)), exchange, key_max=key_max, initial_state=initial_state)
        return o.reshape(segments, batch, length // segments, *o.shape[2:]).transpose(0, 1).reshape(batch, length, *o.shape[2:]), None

    got = _run_with(run, inputs)
    assert events == [
        "gates", "key_max", "states", "start0", "gates", "states", "start1", "wait0", "output", "wait1", "output",
        "dstates", "start_grads", "states", "wait_grads", "grads",
    ], events
    ref = _run("naive", [x.double() for x in inputs], with_state=False)
    for name, a, b in zip(NAMES, got, ref):
        if name != "final_state":
            assert ((a.double() - b).norm() / b.norm()).item() < 2e-5, name


@pytest.mark.parametrize("segments, slots, fast_limit", [(2, 1, 60.0), (4, 2, 60.0), (3, 1, -1.0), (3, 3, 17.0)])
def test_segments_with_carried_states_match_one_pass(segments, slots, fast_limit, launch):
    """Context parallelism's kernel path: equal segments, zero-state passes, the states and
    state gradients carried by the exchange and added inside the kernels; with slots > 1 the
    forward goes a group of segments at a time (the overlapped exchange's order)."""
    d = launch.MIN_HEAD_DIM
    launch.LAUNCH.update(fast_limit=fast_limit)
    inputs = _inputs(2, 48 * segments, 2, 2 * d, d, seed=7 + segments)
    got = _run_with(_by_segments(segments, slots), inputs)
    ref = _run("naive", [x.double() for x in inputs], with_state=False)
    for name, a, b in zip(NAMES, got, ref):
        if name == "final_state":
            continue  # the segments path gives outputs only (a CP layer emits no final state)
        assert torch.isfinite(a).all(), name
        error = ((a.double() - b).norm() / b.norm()).item()
        assert error < 2e-5, (name, error)


def test_segment_chunk_decays_against_fp64_sums():
    """The one-launch segment decays: per chunk the exclusive sum before it and after it inside
    its segment, per segment the total (5 segments of 3 chunks, H * dk = 300 columns: a partial
    column block)."""
    from regla_kernels.triton_segments import segment_chunk_decays

    decay = -torch.rand(15, 3, 100, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 7
    before, after, total, _ = segment_chunk_decays(decay.float(), 5)
    per = decay.view(5, 3, 3, 100)
    inclusive = per.cumsum(1)
    expected = [(inclusive - per).reshape(15, 3, 100), (per.sum(1, keepdim=True) - inclusive).reshape(15, 3, 100), per.sum(1)]
    for name, got, want in zip(("before", "after", "total"), (before, after, total), expected):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5, msg=name)


@pytest.mark.parametrize("fast_limit", [60.0, -1.0])
def test_carried_states_reach_later_chunks(fast_limit, launch):
    """Slow gates (log F about -0.003 per token) and segments of three chunks: the state
    carried into a segment still weighs in its last chunk, so the decay from the segment's
    start (forward) and to its end (backward) that the kernels apply to it is checked (with
    fast gates it is e^-30 there and any decay would pass)."""
    d = launch.MIN_HEAD_DIM
    launch.LAUNCH.update(fast_limit=fast_limit)
    inputs = _inputs(2, 2 * 192, 2, 2 * d, d, seed=11, logit_scale=0.5)
    inputs[3] = inputs[3] + 5.0
    got = _run_with(_by_segments(2), inputs)
    ref = _run("naive", [x.double() for x in inputs], with_state=False)
    for name, a, b in zip(NAMES, got, ref):
        if name != "final_state":
            assert ((a.double() - b).norm() / b.norm()).item() < 2e-5, name


def test_segment_reach_flags_against_fp64_sums():
    """The reach flags of `segment_chunk_decays`: bit 1 where some feature's decay from the
    segment start to the chunk is >= -105, bit 2 likewise to the segment end (chunk decays of
    -50 to -80: reached in a segment's first two chunks from its start, its last two from its
    end, and a mix between); features 100 (a padded block)."""
    from regla_kernels.triton_segments import segment_chunk_decays

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


@pytest.mark.parametrize("slots", [1, 2])
def test_carried_states_in_reached_chunks_only(slots, launch):
    """Fast-decaying gates (log F about -1.5 per token, every chunk still on the whole-chunk
    kernels): a carried state reaches only the first chunks of a segment and a carried gradient
    only the last ones, so the fast output and dv kernels split their chunks over the launch
    with the carried product and the one without; together they equal the one-pass recurrence."""
    from regla_kernels import refined_log_gate

    d = launch.MIN_HEAD_DIM
    inputs = _inputs(2, 4 * 256, 2, d, d, seed=13, logit_scale=0.3)
    inputs[3] = inputs[3] - 2.2
    assert launch.fast_chunk_mask(inputs[3], inputs[4]).all()
    chunk_decay = refined_log_gate(inputs[3].double(), inputs[4].double()).reshape(2, 4, 4, 64, 2, d).sum(3)
    reached = (chunk_decay.cumsum(2) - chunk_decay).amax(-1) >= -105.0  # [batch, segment, chunk, head]
    assert reached.any() and not reached.all()
    got = _run_with(_by_segments(4, slots), inputs)
    ref = _run("naive", [x.double() for x in inputs], with_state=False)
    for name, a, b in zip(NAMES, got, ref):
        if name != "final_state":
            assert ((a.double() - b).norm() / b.norm()).item() < 2e-5, name


@pytest.mark.parametrize("length, segments", [(256, 4), (384, 2)])
def test_long_sequences_as_segments_on_one_device(length, segments, launch):
    """LAUNCH["segment_min_programs"]: without a final state asked for, every sequence is cut
    into equal segments (sequence-major, no copies) carried on this device: output and every
    gradient, the initial state's included, equal the one-pass recurrence; with the final
    state asked for, the one-pass kernels run."""
    from regla_kernels import triton_chunk

    launch.LAUNCH.update(segment_min_programs=10**6)
    inputs = _inputs(2, length, 2, launch.MIN_HEAD_DIM, launch.MIN_HEAD_DIM, seed=length)
    assert triton_chunk._segments_per_sequence(2, 2, launch.MIN_HEAD_DIM, launch.MIN_HEAD_DIM, length) == segments
    got = _run("triton", inputs, with_state=False)
    ref = _run("naive", [x.double() for x in inputs], with_state=False)
    for name, a, b in zip(NAMES, got, ref):
        if name != "final_state":
            assert ((a.double() - b).norm() / b.norm()).item() < 2e-5, name
    _compare(inputs, bound=2e-5)  # with the final state: the one-pass path


def test_split_key_and_value_blocks(launch):
    """Sequential state stages split over key and value blocks; the rest over value blocks
    (and the fast dq/dk stage over key blocks)."""
    d = launch.MIN_HEAD_DIM
    launch.LAUNCH.update(
        states_block_k=d, states_block_v=d, block_v=d, fast_output_block_v=d, fast_dv_block_v=d, fast_dqk_block_k=d, fast_dqk_block_v=d
    )
    _compare(_inputs(2, 150, 2, 2 * d, 2 * d, seed=1), bound=2e-5)


@triton.jit
def _gate_derivatives_kernel(z_ptr, u_ptr, dz_ptr, du_ptr, BLOCK: tl.constexpr):
    """refined_log_gate_grad_tl over BLOCK logits per program (fp32)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    dz, du = refined_log_gate_grad_tl(tl.load(z_ptr + cols), tl.load(u_ptr + cols))
    tl.store(dz_ptr + cols, dz)
    tl.store(du_ptr + cols, du)


def _exact_gate_derivatives(z: float, u: float):
    """(d log F / dz, d log F / du) at 50 digits (mpmath): fp64 autograd of the log-space gate
    loses up to 1e-3 relative where 1 - g is about 1e-13 (saturated logits)."""
    import mpmath

    with mpmath.workdps(50):
        g, r = 1 / (1 + mpmath.exp(-z)), 1 / (1 + mpmath.exp(-u))
        w = g + 2 * r * (1 - g)
        return float((1 - g) + g * (1 - g) * (1 - 2 * r) / w), float(2 * r * (1 - r) * (1 - g) / w)


def test_gate_logit_derivatives_against_exact_values():
    """refined_log_gate_grad_tl (the backward's chain rule, 7 special-function calls) against
    50-digit values: logits of std 6 and the saturated corners, each derivative within fp32
    rounding of its own size (every term is positive: no cancellation, so even the 1e-26
    derivatives of saturated gates keep their relative accuracy)."""
    gen = torch.Generator().manual_seed(31)
    corners = torch.tensor([[-30.0, -30.0], [-30.0, 30.0], [30.0, -30.0], [30.0, 30.0], [0.0, 0.0], [-70.0, -60.0]])
    z = torch.cat([6 * torch.randn(250, generator=gen), corners[:, 0]])
    u = torch.cat([6 * torch.randn(250, generator=gen), corners[:, 1]])
    dz, du = torch.empty_like(z), torch.empty_like(u)
    _gate_derivatives_kernel[(z.numel() // 128,)](z, u, dz, du, BLOCK=128)
    exact = torch.tensor([_exact_gate_derivatives(a, b) for a, b in zip(z.tolist(), u.tolist())], dtype=torch.float64)
    for name, got, want in (("dz", dz, exact[:, 0]), ("du", du, exact[:, 1])):
        assert torch.isfinite(got).all(), name
        assert ((got.double() - want).abs() / want.abs()).max().item() < 1e-5, name


@pytest.mark.parametrize("warps, stages", [(1, 2), (2, 1)])
def test_gates_kernel(warps, stages, launch):
    """The token-by-token gates kernel gives each chunk's cumulative log gate b, total decay,
    fast-path flag (`fast_chunk_mask`, its torch twin), the sub-chunk work list and each
    sequence's key max as the torch functions do (packed sequences, fast and sub-chunk chunks
    mixed), and the whole forward and backward on top of it match the fp64 recurrence."""
    from regla_kernels import refined_log_gate, sequence_key_max

    d, C = launch.MIN_HEAD_DIM, launch.CHUNK_SIZE
    lengths = [37, 100, 13]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    inputs = _inputs(1, sum(lengths), 2, 2 * d, 2 * d, sequences=len(lengths), logit_scale=1.0, seed=11)
    launch.LAUNCH.update(fast_limit=17.0, gates_warps=warps, gates_stages=stages)
    offsets, table, total = launch._chunk_tables(cu, C)
    z, u, k = (x[0].contiguous() for x in (inputs[3], inputs[4], inputs[1]))
    work = launch._work_list(chunks=total, heads=2, device=z.device)
    b, chunk_decay, flags, key_max = launch._gates(z, u, k, cu, table, total, work=work)
    want_b, want_decay, want_flags, want_max = [], [], [], []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        zs, us = inputs[3][:, start:end].double(), inputs[4][:, start:end].double()
        log_f = refined_log_gate(zs, us)[0]  # [L, H, dk]
        padded = torch.nn.functional.pad(log_f, (0, 0, 0, 0, 0, (-(end - start)) % C))
        cumulative = padded.reshape(-1, C, *log_f.shape[1:]).cumsum(dim=1)
        want_b.append(cumulative.flatten(0, 1)[: end - start])
        want_decay.append(cumulative[:, -1])
        want_flags.append(launch.fast_chunk_mask(zs, us)[0])
        want_max.append(sequence_key_max(inputs[1][:, start:end])[0])
    assert flags.any() and not flags.all(), flags
    assert torch.equal(flags.bool(), torch.cat(want_flags))
    count = work[0].item()
    assert sorted(work[1 : 1 + count].tolist()) == (flags.flatten() == 0).nonzero().flatten().tolist()  # the sub-chunk work list
    assert torch.equal(key_max, torch.stack(want_max).float())
    b = b[..., _feature_slots(b.shape[-1])]  # b's rows are in `gate_slots` order
    torch.testing.assert_close(b.double(), torch.cat(want_b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunk_decay.double(), torch.cat(want_decay), rtol=1e-5, atol=1e-5)
    _compare(inputs, bound=2e-5, cu_seqlens=cu)


@pytest.mark.parametrize("gates_apart, packed", [(False, False), (True, False), (False, True)])
def test_strided_inputs_as_megatron_lays_them_out(gates_apart, packed, launch):
    """q, k, v, z, u as views of one [s, b, H, W] projection seen as [b, s] (Megatron's
    layout; z and u from a tensor of their own with gates_apart, as with a low-rank gate; B = 1
    with packed sequences): the kernels read them in place (no copy), write o and the input
    gradients in the same [s, b] order (nothing to transpose back), and give the outputs,
    final states and projection gradients of contiguous inputs through the fp64 recurrence."""
    from regla_kernels import chunk_regla

    d = launch.MIN_HEAD_DIM
    launch.LAUNCH.update(fast_limit=17.0)  # both kernel paths
    batch, length, heads, dk, dv = (1, 150, 2, 2 * d, d) if packed else (2, 150, 2, 2 * d, d)
    cu = torch.tensor([0, 37, 137, 150], dtype=torch.int32) if packed else None
    q, k, v, z, u, state = _inputs(batch, length, heads, dk, dv, sequences=3 if packed else batch, logit_scale=1.0, seed=21)
    sizes = [dk, dk, dv] if gates_apart else [dk, dk, dv, dk, dk]
    parts = [q, k, v] if gates_apart else [q, k, v, z, u]
    proj = torch.cat(parts, dim=-1).transpose(0, 1).contiguous().requires_grad_(True)  # [s, b, H, W]
    gates = torch.cat([z, u], dim=-1).transpose(0, 1).contiguous().requires_grad_(True)
    state = state.requires_grad_(True)
    gen = torch.Generator().manual_seed(22)
    w_o = torch.randn(batch, length, heads, dv, generator=gen, dtype=torch.float64)
    w_s = torch.randn(state.shape, generator=gen, dtype=torch.float64)

    def run(backend, dtype):
        leaves = [x.detach().to(dtype).requires_grad_(True) for x in (proj, gates, state)]
        pieces = list(leaves[0].transpose(0, 1).split(sizes, dim=-1))
        if gates_apart:
            pieces += list(leaves[1].transpose(0, 1).split([dk, dk], dim=-1))
        if backend == "triton":
            assert all(x.data_ptr() >= leaves[0].data_ptr() for x in pieces[:3])
            assert launch._one_layout(pieces[0], pieces[1]) == (pieces[0], pieces[1])  # read in place
            assert launch._one_layout(pieces[3], pieces[4]) == (pieces[3], pieces[4])
        o, final = chunk_regla(*pieces, initial_state=leaves[2], output_final_state=True, cu_seqlens=cu, backend=backend)
        if backend == "triton" and not packed:  # o comes back in the [s, b] order of its inputs
            assert o.transpose(0, 1).is_contiguous()
            piece_grads = torch.autograd.grad((o.double() * w_o).sum(), pieces, retain_graph=True)
            assert all(g.transpose(0, 1).is_contiguous() for g in piece_grads)  # the gradients too
        loss = (o.double() * w_o).sum() + (final.double() * w_s).sum()
        grads = torch.autograd.grad(loss, leaves if gates_apart else [leaves[0], leaves[2]])
        return [o, final, *grads]

    got, ref = run("triton", torch.float32), run("naive", torch.float64)
    for index, (a, b) in enumerate(zip(got, ref)):
        assert torch.isfinite(a).all(), index
        error = ((a.double() - b).norm() / b.norm()).item()
        assert error < 2e-5, (index, error)


def test_inputs_with_strided_features_are_made_contiguous(launch):
    """Inputs whose features are not contiguous (and so q, k with different layouts) are made
    contiguous first and give exactly the contiguous inputs' results."""
    from regla_kernels import chunk_regla

    d = launch.MIN_HEAD_DIM
    inputs = _inputs(2, 70, 2, d, d, seed=31)
    flipped = [x.transpose(-1, -2).contiguous().transpose(-1, -2) for x in inputs[:5]]  # same values, stride(-1) > 1
    assert all(x.stride(-1) != 1 for x in flipped)
    want = chunk_regla(*inputs[:5], initial_state=inputs[5], output_final_state=True, backend="triton")
    got = chunk_regla(flipped[0], inputs[1], *flipped[2:], initial_state=inputs[5], output_final_state=True, backend="triton")
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _low_memory_equals_one_pass(inputs, cu_seqlens=None, mode=True):
    """The Triton path's outputs and gradients (`_run_with`) with low_memory=mode, asserted bit for
    bit equal to the one-pass backward's."""
    from regla_kernels import chunk_regla

    one_pass = lambda *a, **kw: chunk_regla(*a, **kw, output_final_state=True, backend="triton")
    want = _run_with(one_pass, inputs, cu_seqlens)
    got = _run_with(lambda *a, **kw: one_pass(*a, **kw, low_memory=mode), inputs, cu_seqlens)
    for name, a, b in zip(NAMES, got, want):
        assert torch.equal(a, b), name
    return got


@pytest.mark.parametrize(
    "batch, length, windows, fast_limit, mode",
    [(2, 150, 3, 17.0, True), (1, 300, 8, 60.0, "backward"), (2, 200, 2, -1.0, True), (2, 330, 0, 17.0, "backward")],
)
def test_low_memory_backward_over_windows(batch, length, windows, fast_limit, mode, launch):
    """low_memory=True (b computed again per window) and "backward" (b kept from the forward): the
    backward over time windows (each window's state pass from the start state the forward kept,
    the state gradient handed from window to window) gives in fp32 exactly the one-pass
    backward's numbers, bit for bit (the window start states are the fp32 states the one pass
    has there), and the fp64 recurrence's. Windows of 1, 2 and 2 chunks with a ragged last one,
    and as many as the memory rule picks (0); both kernel paths."""
    d = launch.MIN_HEAD_DIM
    launch.LAUNCH.update(backward_windows=windows, fast_limit=fast_limit)
    inputs = _inputs(batch, length, 2, 2 * d, d, logit_scale=1.0, seed=41)
    _low_memory_equals_one_pass(inputs, mode=mode)
    _compare(inputs, bound=2e-5)


@pytest.mark.parametrize("in_grads, starts", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("batch, length, heads", [(32, 2048, 16), (8, 8192, 16), (2, 32768, 16), (1, 640, 2), (64, 128, 4)])
def test_window_count_keeps_the_memory_rule(batch, length, heads, in_grads, starts, launch):
    """backward_windows = 0: the fewest windows whose buffers (and start states, where the windows
    compute h again) stay within window_memory_fraction of the outputs (one window fewer would
    not), or where none does, the count with the fewest bytes; never more windows than chunks.
    For each accounting the low-memory modes use: h apart (fp16, packed), h in the gradient arena
    computed again per window (True), kept from the forward ("backward")."""
    import math

    d, dtype = 128, torch.bfloat16
    chunks = math.ceil(length / launch.CHUNK_SIZE)
    launch.LAUNCH.update(backward_windows=0)
    windows = math.ceil(chunks / launch._window_chunks(batch, chunks, heads, d, d, dtype, batch * length, in_grads, starts))
    assert 1 <= windows <= min(16, chunks)
    budget = launch.LAUNCH["window_memory_fraction"] * batch * length * heads * 6 * d * 2
    cost = lambda w: launch._window_bytes(w, batch, chunks, heads, d, d, dtype, in_grads, starts)
    if cost(windows) <= budget:
        assert windows == 1 or cost(windows - 1) > budget
    else:
        assert all(cost(w) >= cost(windows) for w in range(1, min(16, chunks) + 1))
    if (batch, length) == (8, 8192):  # the record shape: under 2 GB with o and the gradients
        assert batch * length * heads * 6 * d * 2 + cost(windows) < 1.98e9


def test_low_memory_backward_in_megatron_layout(launch):
    """The windowed backward on [s, b] views (Megatron's layout: b of a window has the whole
    tensors' row order there) against the one-pass backward, bit for bit, and its gradients in
    the same [s, b] order."""
    from regla_kernels import chunk_regla

    d = launch.MIN_HEAD_DIM
    launch.LAUNCH.update(backward_windows=3, fast_limit=17.0)
    inputs = _inputs(3, 150, 2, d, d, logit_scale=1.0, seed=43)
    minor = [x.transpose(0, 1).contiguous().transpose(0, 1) for x in inputs[:5]] + inputs[5:]
    _low_memory_equals_one_pass(minor)
    leaves = [x.detach().requires_grad_(True) for x in minor[:5]]
    o, _ = chunk_regla(*leaves, backend="triton", low_memory=True)
    grads = torch.autograd.grad(o.sum(), leaves)
    assert all(g.transpose(0, 1).is_contiguous() for g in grads)


@pytest.mark.parametrize("low_memory", [False, True])
def test_gradients_through_one_output_alone(low_memory, launch):
    """A loss of the final state alone (o's gradient is None: not materialized as zeros) and of
    o alone (the final state's is None) against the fp64 recurrence."""
    from regla_kernels import chunk_regla

    d = launch.MIN_HEAD_DIM
    launch.LAUNCH.update(backward_windows=2)
    inputs = _inputs(2, 100, 2, d, d, logit_scale=1.0, seed=45)
    for which in (0, 1):
        grads = []
        for backend, cast in (("triton", lambda x: x), ("naive", lambda x: x.double())):
            leaves = [cast(x).detach().requires_grad_(True) for x in inputs]
            outputs = chunk_regla(
                *leaves[:5], initial_state=leaves[5], output_final_state=True, backend=backend,
                **({"low_memory": low_memory} if backend == "triton" else {}),
            )
            found = torch.autograd.grad(outputs[which].double().pow(2).sum(), leaves, allow_unused=True)
            grads.append([torch.zeros_like(x) if g is None else g for g, x in zip(found, leaves)])  # q: no path to the state
        for index, (a, b) in enumerate(zip(*grads)):
            error = ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()
            assert error < 2e-5 or (b.norm() == 0 and a.norm() == 0), (which, index, error)


@pytest.mark.parametrize(
    "windows, lengths, mode", [(3, [37, 100, 0, 1, 13, 190], True), (5, [300], "backward"), (0, [64, 64, 65, 1], "backward")]
)
def test_low_memory_backward_with_packed_sequences(windows, lengths, mode, launch):
    """low_memory (True and "backward") with cu_seqlens: windows of global chunks holding pieces of one or more
    sequences (sequences cut by window edges, whole ones, an empty and a one-token one; one
    sequence over five windows; the window count of the memory rule): in fp32 bit for bit the
    one-pass backward's outputs and gradients (initial states included), and the fp64
    recurrence's where no sequence is empty."""
    d = launch.MIN_HEAD_DIM
    launch.LAUNCH.update(backward_windows=windows, fast_limit=17.0)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    inputs = _inputs(1, sum(lengths), 2, 2 * d, d, sequences=len(lengths), logit_scale=1.0, seed=53)
    got = _low_memory_equals_one_pass(inputs, cu, mode)
    if 0 in lengths:  # the fp64 recurrence takes no empty sequence (its key max)
        return
    ref = _run("naive", [x.double() for x in inputs], cu)
    for name, a, b in zip(NAMES, got, ref):
        assert ((a.double() - b).norm() / b.norm()).item() < 2e-5, name


def test_low_memory_with_no_tokens(launch):
    """Packed sequences that are all empty: the initial states come back as the final states and
    their gradients pass through, as without low_memory."""
    from regla_kernels import chunk_regla

    d = launch.MIN_HEAD_DIM
    x = torch.zeros(1, 0, 2, d)
    h0 = torch.randn(2, 2, d, d, requires_grad=True)
    cu = torch.tensor([0, 0, 0], dtype=torch.int32)
    o, state = chunk_regla(x, x, x, x, x, initial_state=h0, cu_seqlens=cu, output_final_state=True, backend="triton", low_memory=True)
    assert o.shape == (1, 0, 2, d) and torch.equal(state, h0)
    weights = torch.randn(state.shape)
    (grad,) = torch.autograd.grad((state * weights).sum(), h0)
    assert torch.equal(grad, weights)


def test_saturated_gates(launch):
    d = launch.MIN_HEAD_DIM
    _compare(_inputs(1, 150, 2, 2 * d, d, saturated=True, seed=2), bound=2e-5, gate_bound=1e-4)


def test_packed_sequences(launch):
    d = launch.MIN_HEAD_DIM
    lengths = [37, 100, 1, 13]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    _compare(_inputs(1, sum(lengths), 2, d, 2 * d, sequences=len(lengths), seed=3), bound=2e-5, cu_seqlens=cu)


def test_fp16_inputs(launch):
    d = launch.MIN_HEAD_DIM
    _compare(_inputs(1, 70, 2, d, d, dtype=torch.float16, seed=4), bound=3e-3)


def test_gate_arena_rows_are_b_rows(launch):
    """`_gate_arena`, 16-bit: b (fp32) and the gate-logit gradients share one buffer, row (t, h) of b
    being the bytes of row (t, h) of dz and then of du, and no other's; fp32: three buffers."""
    b, dz, du = launch._gate_arena(5, 3, 16, torch.float16, torch.device("cpu"))
    assert b.dtype == torch.float32 and b.shape == dz.shape == du.shape == (5, 3, 16) and b.is_contiguous()
    assert dz.stride(-1) == du.stride(-1) == 1
    before = torch.randn(b.shape)
    b.copy_(before)
    dz[2, 1], du[2, 1] = 1.0, -2.0
    assert (b != before).any(-1).nonzero().tolist() == [[2, 1]] and (b[2, 1] != before[2, 1]).all()
    b, dz, du = launch._gate_arena(5, 3, 16, torch.float32, torch.device("cpu"))
    assert len({x.data_ptr() for x in (b, dz, du)}) == 3


@triton.jit
def _slots_kernel(out_ptr, DK: tl.constexpr):
    cols = tl.arange(0, DK)
    tl.store(out_ptr + cols, gate_slots(cols, DK))


def _feature_slots(dk):
    """`gate_slots` of features 0..dk-1: where a row of b keeps each feature (int64 [dk])."""
    slots = torch.empty(dk, dtype=torch.int64)
    _slots_kernel[(1,)](slots, DK=dk)
    return slots


@pytest.mark.parametrize("dk", [16, 64, 128, 256])
def test_gate_slots_keep_each_key_block_in_its_own_gradient_bytes(dk):
    """`gate_slots`: a permutation of a row of b under which the key features of each dq/dk key block
    (GATE_BLOCK wide) occupy exactly the bytes of that block's dz and du in a 16-bit row (dz's dk
    16-bit values, then du's), so a dq/dk program overwrites only the b it read."""
    slots = _feature_slots(dk)
    assert sorted(slots.tolist()) == list(range(dk))
    block = min(dk, GATE_BLOCK.value)
    for first in range(0, dk, block):
        b_bytes = {4 * s + i for s in slots[first : first + block].tolist() for i in range(4)}
        grad_bytes = {2 * (half * dk + j) + i for half in (0, 1) for j in range(first, first + block) for i in range(2)}
        assert b_bytes == grad_bytes


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 2e-5), (torch.float16, 3e-3)])
@pytest.mark.parametrize("route", ["one pass", "low memory", "packed low memory", "segments", "one pass dk 128"])
def test_gate_gradients_over_b_and_a_second_backward(route, dtype, bound, launch):
    """Every route keeps b in the gate gradients' buffer and writes them over it (`_gate_arena`;
    16-bit: interleaved pairs): its results against the fp64 recurrence, and a second backward
    through the same graph (retain_graph: the first overwrote b) computes b again and gives the
    same gradients bit for bit."""
    from regla_kernels import chunk_regla

    d = launch.MIN_HEAD_DIM
    launch.LAUNCH.update(backward_windows=3, fast_limit=17.0, segment_min_programs=10**6)
    lengths = [37, 100, 1, 60] if route == "packed low memory" else None
    cu = None if lengths is None else torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    batch, length = (1, sum(lengths)) if lengths else (2, 128)
    dk, heads = (2 * d, 2) if route != "one pass dk 128" else (128, 1)  # 128: two key blocks, b's row permuted
    inputs = _inputs(batch, length, heads, dk, d, sequences=len(lengths) if lengths else None, dtype=dtype, logit_scale=1.0, seed=61)
    with_state = route != "segments"  # without a final state asked for, these sequences go as 2 segments
    if route == "segments":
        assert launch._segments_per_sequence(batch, heads, dk, d, length) == 2
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    o, state = chunk_regla(
        *leaves[:5], initial_state=leaves[5], cu_seqlens=cu, output_final_state=with_state, backend="triton",
        low_memory="backward" if route.endswith("low memory") else False,  # the windowed route that keeps b
    )
    gen = torch.Generator().manual_seed(99)
    loss = (o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
    if with_state:
        loss = loss + (state.double() * torch.randn(state.shape, generator=gen, dtype=torch.float64)).sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    ref = _run("naive", [x.double() for x in inputs], cu, with_state=with_state)
    for name, a, again, b in zip(NAMES[2:], first, second, ref[2:]):
        assert torch.equal(a, again), name
        assert ((a.double() - b).norm() / b.norm()).item() < bound, name
    assert ((o.double() - ref[0]).norm() / ref[0].norm()).item() < bound


@triton.jit
def _state_offsets_kernel(out_ptr, start, eos, R_T, spill, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BV: tl.constexpr):
    rk = tl.arange(0, DK)
    zero = tl.program_id(0)  # chunk 0 of sequence 0 (a grid of one program)
    for iv in tl.static_range(DV // BV):
        rv = iv * BV + tl.arange(0, BV)
        offsets = state_offsets(zero, zero, zero + 1, 2, rk, rv, start, eos, R_T, 0, spill, DK, DV, C, BV, True)
        tl.store(out_ptr + rk[:, None] * DV + rv[None, :], offsets)


@pytest.mark.parametrize("dk, dv, block_v", [(64, 64, 64), (128, 64, 32), (64, 128, 128), (128, 128, 64), (128, 128, 32)])
def test_states_in_the_gradient_arena_take_their_key_blocks_bytes(dk, dv, block_v):
    """`state_offsets` with IN_GRADS (h in the dq/dk gradient arena, `_GradArena`): the GATE_BLOCK key
    rows ik of a whole chunk's h (head 1 of 2, tokens 5..68 of a sequence, read in value blocks of
    block_v) take distinct elements among exactly that chunk's dq and dk columns of key block ik,
    so a dq/dk program overwrites only the h it read; a shorter last chunk's h goes to the spill."""
    heads, head, first, chunk = 2, 1, 5, 64
    offsets = torch.empty(dk, dv, dtype=torch.int64)
    _state_offsets_kernel[(1,)](offsets, first, first + chunk, heads, 10**6, DK=dk, DV=dv, C=chunk, BV=block_v)
    assert offsets.unique().numel() == dk * dv
    block = GATE_BLOCK.value
    for ik in range(dk // block):
        owned = {
            ((first + t) * heads + head) * 2 * dk + part * dk + ik * block + j
            for t in range(chunk) for part in (0, 1) for j in range(block)
        }
        assert set(offsets[ik * block : (ik + 1) * block].flatten().tolist()) <= owned
    _state_offsets_kernel[(1,)](offsets, first, first + chunk - 1, heads, 10**6, DK=dk, DV=dv, C=chunk, BV=block_v)
    spill = 10**6 + head * dk * dv
    assert offsets.flatten().tolist() == list(range(spill, spill + dk * dv))


def _states_route(route):
    """(batch, length, heads, dk, dv, cu_seqlens, low_memory) of a `test_states_in_the_gradient_arena` route."""
    packed = torch.tensor([0, 37, 137, 137, 138, 198], dtype=torch.int32)
    return {
        "one pass": (2, 150, 2, 64, 64, None, False),
        "two key blocks": (1, 130, 1, 128, 64, None, False),
        "one h row per token": (2, 128, 1, 64, 128, None, False),
        "packed": (1, 198, 2, 64, 64, packed, False),
        "low memory": (2, 150, 2, 64, 64, None, True),
        "low memory keeping b and h": (2, 150, 2, 64, 64, None, "backward"),
        "megatron order": (2, 150, 2, 64, 128, None, False),
        "megatron order, low memory": (2, 150, 2, 64, 64, None, True),
    }[route]


@pytest.mark.parametrize(
    "route",
    ["one pass", "two key blocks", "one h row per token", "packed", "low memory", "low memory keeping b and h", "megatron order",
     "megatron order, low memory"],
)
def test_states_in_the_gradient_arena(route, launch):
    """Where h fits (fp32, dk a multiple of GATE_BLOCK, dv = GATE_BLOCK or twice it) the chunk-start
    states live in the dq/dk gradient arena (`_GradArena`): the forward keeps them there and the
    dq/dk kernels write over them (the low-memory windows: recomputed per window into their rows,
    or kept). Both kernel paths (fast_limit 17), shorter last chunks (the spill), packed sequences
    with an empty and a one-token one, two key blocks: outputs and every gradient against the fp64
    recurrence; the low-memory modes bit for bit the one-pass backward's; a second backward
    through the same graph (the first overwrote h) bit for bit the first's. Megatron order: the
    inputs as [s, b] memory seen as [b, s] (the gradients' rows in that order too)."""
    from regla_kernels import chunk_regla

    batch, length, heads, dk, dv, cu, low_memory = _states_route(route)
    launch.LAUNCH.update(fast_limit=17.0, backward_windows=2)
    made = []
    grad_arena = launch._grad_arena
    launch._grad_arena = lambda *args: made.append(args) or grad_arena(*args)
    try:
        sequences = None if cu is None else cu.numel() - 1
        inputs = _inputs(batch, length, heads, dk, dv, sequences=sequences, logit_scale=1.0, seed=71)
        if route.startswith("megatron order"):  # [s, b] memory seen as [b, s]
            inputs = [x.transpose(0, 1).contiguous().transpose(0, 1) for x in inputs[:5]] + inputs[5:]
        if low_memory:
            _low_memory_equals_one_pass(inputs, cu, low_memory)
        leaves = [x.detach().clone().requires_grad_(True) if x.dim() < 4 else x.detach().requires_grad_(True) for x in inputs]
        made.clear()
        o, state = chunk_regla(
            *leaves[:5], initial_state=leaves[5], cu_seqlens=cu, output_final_state=True, backend="triton", low_memory=low_memory,
        )
        gen = torch.Generator().manual_seed(99)
        w_o, w_s = (torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in (o, state))
        loss = (o.double() * w_o).sum() + (state.double() * w_s).sum()
        first = torch.autograd.grad(loss, leaves, retain_graph=True)
        second = torch.autograd.grad(loss, leaves)
    finally:
        launch._grad_arena = grad_arena
    assert made, "h did not go to the gradient arena"
    if route.startswith("megatron order"):
        assert launch._batch_minor(leaves[0]) and first[2].transpose(0, 1).is_contiguous()
    for name, a, again in zip(NAMES[2:], first, second):
        assert torch.equal(a, again), name
    # the fp64 recurrence, without the empty sequence (it takes none; its state passes through)
    kept = list(range(w_s.shape[0])) if cu is None else [n for n in range(cu.numel() - 1) if cu[n + 1] > cu[n]]
    ref_cu = None if cu is None else torch.unique_consecutive(cu)
    ref_leaves = [x.double().requires_grad_(True) for x in (*inputs[:5], inputs[5][kept])]
    ref_o, ref_state = chunk_regla(*ref_leaves[:5], initial_state=ref_leaves[5], cu_seqlens=ref_cu, output_final_state=True, backend="naive")
    ref_loss = (ref_o * w_o).sum() + (ref_state * w_s[kept]).sum()
    ref = torch.autograd.grad(ref_loss, ref_leaves)
    for name, a, b in zip(NAMES[2:], (*first[:5], first[5][kept]), ref):
        assert ((a.double() - b).norm() / b.norm()).item() < 2e-5, name
    assert ((o.double() - ref_o).norm() / ref_o.norm()).item() < 2e-5


def test_states_stay_apart_where_they_do_not_fit(launch):
    """fp16 keeps fp32 states (twice the gradients' bytes), dv = 16 and dk = 32 key blocks have no
    room: h keeps a buffer of its own there; so do packed sequences whose spill (one state per
    sequence, all of them where one has a shorter last chunk) would outgrow h (one per chunk)."""
    assert launch._states_fit_grads(64, 64, torch.float32) and launch._states_fit_grads(128, 128, torch.bfloat16)
    assert not launch._states_fit_grads(64, 64, torch.float16)
    assert not launch._states_fit_grads(64, 16, torch.float32)
    assert not launch._states_fit_grads(32, 64, torch.float32)
    q, v = torch.zeros(1, 10, 2, 64), torch.zeros(1, 10, 2, 64)
    many_empty = torch.tensor([0, 0, 0, 0, 10], dtype=torch.int32)
    assert launch._arena_spilled(q, v, many_empty, 1, None) is None
    assert launch._arena_spilled(q, v, torch.tensor([0, 10], dtype=torch.int32), 1, None) == 1
    assert launch._arena_spilled(q, v, torch.tensor([0, 128], dtype=torch.int32), 2, 128) == 0


@pytest.mark.parametrize("d", [16, 128])
def test_row_copy_kernel_copies_strided_rows(d):
    """`rows._copy_rows_kernel` (`copy_rows` on CUDA): rows of a strided source (a gradient pair
    buffer's second half) into a strided destination (a fused gradient's slice), nothing else
    written; a row count that is no multiple of its row block."""
    from regla_kernels import rows

    gen = torch.Generator().manual_seed(3)
    src = torch.randn(37, 2, d, generator=gen).to(torch.float16)[:, 1]
    dst = torch.zeros(37, 3 * d, dtype=torch.float16)
    rows._copy_rows_kernel[(triton.cdiv(37, 8),)](src, dst[:, d:], 37, src.stride(0), dst.stride(0), D=d, BLOCK_ROWS=8)
    assert torch.equal(dst[:, d : 2 * d], src)
    assert not dst[:, :d].any() and not dst[:, 2 * d :].any()


@pytest.mark.parametrize(
    "dk, dv, lengths, low_memory", [(64, 64, None, False), (32, 16, None, True), (64, 64, None, "backward"), (32, 16, [37, 63, 50], False)]
)
def test_gate_bias_inside_the_kernels(dk, dv, lengths, low_memory, launch):
    """chunk_regla(gate_bias=...) on the Triton path: the bias goes into the kernels (no biased
    copy of the logits), through both kernel paths, the low-memory windows, packed sequences and
    a second backward; outputs and every gradient, the bias's included, against the fp64
    recurrence on biased logits."""
    launch.LAUNCH.update(fast_limit=17.0, backward_windows=2, gate_bias_in_kernels=True)
    cu = None if lengths is None else torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    batch, length = (2, 150) if lengths is None else (1, sum(lengths))
    inputs = _inputs(batch, length, 2, dk, dv, sequences=None if cu is None else len(lengths), logit_scale=1.0, seed=81)
    bias = torch.randn(2, 2 * dk, generator=torch.Generator().manual_seed(82))
    seen = []
    kernel_bias = launch._kernel_bias
    launch._kernel_bias = lambda b: seen.append(b) or kernel_bias(b)
    try:
        got = _run_with_bias("triton", inputs, bias, cu, low_memory)
    finally:
        launch._kernel_bias = kernel_bias
    assert seen and seen[0] is not None, "the bias did not reach the kernels"
    ref = _run_with_bias("naive", [x.double() for x in inputs], bias.double(), cu, False)
    for name, a, b in zip(NAMES + ["dbias"], got, ref):
        assert ((a.double() - b).norm() / b.norm()).item() < 2e-5, name


def _run_with_bias(backend, inputs, bias, cu, low_memory):
    """o, the final state and every gradient (inputs, initial state, bias) of a fixed random
    projection, the gradients twice (retain_graph) and asserted equal."""
    from regla_kernels import chunk_regla

    leaves = [x.detach().clone().requires_grad_(True) for x in (*inputs, bias)]
    o, state = chunk_regla(
        *leaves[:5], initial_state=leaves[5], gate_bias=leaves[6], cu_seqlens=cu, output_final_state=True, backend=backend,
        low_memory=low_memory,
    )
    gen = torch.Generator().manual_seed(99)
    loss = (o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
    loss = loss + (state.double() * torch.randn(state.shape, generator=gen, dtype=torch.float64)).sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    for index, (a, again) in enumerate(zip(first, torch.autograd.grad(loss, leaves))):
        assert torch.equal(a, again), index
    return [o.detach(), state.detach(), *first]


def test_unsupported_shapes_and_dtypes_name_the_limit(launch):
    from regla_kernels import chunk_regla

    x = torch.randn(1, 8, 1, 24)
    with pytest.raises(ValueError, match=r"dk=24 unsupported.*powers of two"):
        chunk_regla(x, x, x, x, x, backend="triton")
    y = torch.randn(1, 8, 1, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        chunk_regla(y, y, y, y, y, backend="triton")


def test_auto_backend_stays_on_torch_for_cpu_tensors():
    from regla_kernels import resolve_backend

    x = torch.randn(1, 8, 1, 16)
    assert resolve_backend("auto", x, x) == "torch"
    assert resolve_backend("triton", x, x) == "triton"


def _triton_cp_errors(rank, cp_size, data_layout, claimed_layout, overlap_forward=False):
    """Relative errors of context_parallel_regla (Triton kernels, gloo) against the one-process
    fp64 recurrence: output, every input gradient, and the initial state's summed shares."""
    import functools

    from regla_kernels import chunk_regla
    from regla_megatron.context_parallel import context_parallel_regla, get_batch_cp_slice

    inputs = _inputs(2, 128, 2, 32, 16, seed=21)
    weight = torch.randn(2, 128, 2, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    full = [x.double().requires_grad_(True) for x in inputs]
    ref, _ = chunk_regla(*full[:5], initial_state=full[5], backend="naive")
    (ref * weight).sum().backward()
    cut = functools.partial(get_batch_cp_slice, cp_rank=rank, cp_size=cp_size, layout=data_layout, seq_dim=1)
    local = [cut(x).requires_grad_(True) for x in inputs[:5]] + [inputs[5].clone().requires_grad_(True)]
    out = context_parallel_regla(
        *local[:5], cp_group=torch.distributed.group.WORLD, layout=claimed_layout, backend="triton", initial_state=local[5],
        overlap_forward=overlap_forward,
    )
    (out.double() * cut(weight)).sum().backward()
    state_grad = local[5].grad.clone()
    torch.distributed.all_reduce(state_grad)
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    errors = {"o": rel(out, cut(ref.detach()))}
    errors.update({name: rel(x.grad, cut(r.grad)) for name, x, r in zip(["dq", "dk", "dv", "dgate", "drefine"], local, full)})
    errors["dinitial"] = rel(state_grad, full[5].grad)
    return errors


@pytest.mark.parametrize("cp_size, layout, overlap_forward", [(2, "zigzag", False), (2, "contiguous", False), (4, "zigzag", True)])
def test_context_parallel_triton_path_matches_one_process(cp_size, layout, overlap_forward):
    """The Triton segments path through context_parallel_regla with gloo: exact at CP > 1, with the
    forward's one all-gather or its per-slot all-gathers (overlap_forward)."""
    from distributed import run_distributed

    for errors in run_distributed(_triton_cp_errors, cp_size, layout, layout, overlap_forward):
        bad = {name: e for name, e in errors.items() if not e < 2e-5}
        assert not bad, bad


def _mixer_tp2_cp2_triton(rank, world_size):
    from distributed import init_parallel
    from test_context_parallel import _mixer_check

    init_parallel(tp=2, cp=2)
    return _mixer_check(backend="triton", head_dim_v=16)


def test_mixer_tp2_cp2_on_the_triton_kernels_matches_cp1():
    """ReGLAMixer with regla_backend='triton' at TP=2 x CP=2 (4 gloo processes) against the same
    weights at CP=1: output, input gradient and every parameter gradient."""
    from distributed import run_distributed

    for errors in run_distributed(_mixer_tp2_cp2_triton, 4, timeout=400):
        bad = {name: e for name, e in errors.items() if not e < 2e-5}
        assert not bad, bad


def _packed_cp_triton(rank, world_size):
    from test_context_parallel import _packed_regla_check

    return _packed_regla_check(rank, world_size, "zigzag", "zigzag", backend="triton", dv=16)


def test_packed_sequences_under_cp_on_the_triton_kernels():
    """Packed sequences under CP=2 (zigzag per sequence) with the Triton kernels for the local
    passes (gloo): output and every gradient against one process on the PyTorch path."""
    from distributed import run_distributed

    for errors in run_distributed(_packed_cp_triton, 2):
        bad = {name: e for name, e in errors.items() if not e < 2e-5}
        assert not bad, bad


def test_context_parallel_triton_path_detects_a_wrong_layout():
    """Negative control: zigzag-sliced tokens run as contiguous must not match."""
    from distributed import run_distributed

    errors = run_distributed(_triton_cp_errors, 2, "zigzag", "contiguous")[0]
    assert errors["o"] > 1e-2, errors


@pytest.mark.parametrize("dk, dv", [(16, 16), (32, 128)])
def test_decode_step_kernel_matches_torch_step(dk, dv):
    """Three steps of the Triton decode kernel (the running key max grows on the third) against
    the torch step in fp64."""
    from regla_kernels import regla_step

    gen = torch.Generator().manual_seed(dk + dv)
    draw = lambda d, shift=0.0: torch.randn(2, 3, d, generator=gen) + shift
    states = {"triton": (None, None), "torch": (None, None)}
    for step, shift in enumerate([0.0, -1.0, 2.0]):
        q, k, v, z, u = draw(dk), draw(dk, shift), draw(dv), draw(dk, 1.0), draw(dk)
        out = {}
        for backend in ("triton", "torch"):
            cast = (lambda x: x.double()) if backend == "torch" else (lambda x: x)
            state, running_max = states[backend]
            o, state, running_max = regla_step(*(cast(x) for x in (q, k, v, z, u)), state, running_max, backend=backend)
            states[backend] = (state, running_max)
            out[backend] = (o, state, running_max)
        for got, ref in zip(out["triton"], out["torch"]):
            error = ((got.double() - ref).norm() / ref.norm()).item()
            assert error < 1e-5, (step, error)


def test_decode_step_errors_name_the_problem():
    from regla_kernels import regla_step

    x = torch.randn(1, 2, 24)
    with pytest.raises(ValueError, match=r"dk=24 unsupported"):
        regla_step(x, x, x, x, x, None, None, backend="triton")
    with pytest.raises(ValueError, match="both state and running_key_max"):
        regla_step(x, x, x, x, x, torch.zeros(1, 2, 24, 24), None, backend="torch")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        regla_step(x, x, x, x, x, None, None, backend="cuda")
