"""GPU correctness of the Triton ReGLA kernels at real shapes, against the chunked PyTorch path on
fp64-upcast inputs (the same rounded inputs, so only the kernels' own rounding is measured).

Each case draws fresh random inputs (its own seed), and every buffer the kernels write is
NaN-poisoned first (`settings.POISON`), so an element they miss shows up. Cases: bf16, fp16 and
fp32; saturated and wide gate logits; T not a multiple of the chunk; packed sequences; initial
state and final-state gradient; the low-memory backward (both modes); a second backward through
one graph; the logits' bias inside the kernels; the segments path; Megatron's [s, b] layout; the decode step.

    REGLA_TESTS_SEE_GPU=1 python -m pytest -q tests/gpu
"""

from typing import NamedTuple, Optional, Sequence, Union

import pytest
import torch

from regla_kernels import LocalSegmentExchange, chunk_regla, chunk_regla_segments, regla_step, sequence_key_max
from regla_kernels.triton import function, settings, windows
from regla_kernels.triton.backend import segments_per_sequence

pytestmark = pytest.mark.gpu

# Relative-error bounds (error norm over the fp64 reference's norm) by input dtype:
BOUNDS = {
    # fp32: tf32 products (unit roundoff 2^-11, about 5e-4, per operand), summed over 64-token
    # chunks and carried through the state passes; fp32 states and accumulation.
    torch.float32: 3e-3,
    # fp16: the same tf32 products and fp32 states, then o and every gradient stored in fp16
    # (another 2^-11 per element), and the gate gradients' reverse sums over those.
    torch.float16: 5e-3,
    # bf16: product operands and chunk-start states in bf16 (unit roundoff 2^-8, about 4e-3),
    # fp32 accumulation, o and the gradients stored in bf16.
    torch.bfloat16: 1e-2,
}
NAMES = ["o", "final_state", "dq", "dk", "dv", "dgate", "drefine", "dinitial"]
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """NaN in every buffer the kernels write (`settings.POISON`), LAUNCH restored after the case."""
    monkeypatch.setattr(settings, "POISON", True)
    saved = dict(settings.LAUNCH)
    yield
    settings.LAUNCH.clear()
    settings.LAUNCH.update(saved)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _offsets(seqlens: Optional[Sequence[int]]) -> Optional[torch.Tensor]:
    if seqlens is None:
        return None
    return torch.tensor([0] + list(torch.tensor(list(seqlens)).cumsum(0)), device=DEVICE, dtype=torch.int32)


def _draw(batch, length, heads, dk, dv, dtype, logit_scale, sequences, gen):
    """[q, k, v, z, u] in `dtype` and an fp32 initial state; gate logits around 2 (or +-30 when
    `logit_scale` is "saturated": gates rounded to 0 or 1 in any float)."""
    r = lambda *shape, s=1.0: (s * torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32)).to(dtype)
    q, k, v = r(batch, length, heads, dk), r(batch, length, heads, dk), r(batch, length, heads, dv)
    if logit_scale == "saturated":
        z = 30.0 * torch.sign(torch.randn(batch, length, heads, dk, generator=gen, device=DEVICE))
        u = 30.0 * torch.sign(torch.randn(batch, length, heads, dk, generator=gen, device=DEVICE))
        z, u = z.to(dtype), u.to(dtype)
    else:
        z, u = r(batch, length, heads, dk, s=logit_scale) + 2.0, r(batch, length, heads, dk, s=logit_scale)
    h0 = torch.randn(sequences, heads, dk, dv, generator=gen, device=DEVICE)
    return [q, k, v, z, u, h0]


def _run(backend, inputs, cu, weights, low_memory=False, twice=False):
    """Output, final state and every input gradient (inputs[6], when there, is the logits' bias
    [H, 2 dk]). twice: the gradients of a second backward through the same graph (retain_graph),
    asserted bit for bit equal to the first's (the first writes the gate gradients over the b the
    forward kept; the second computes b again)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    bias = {"gate_bias": leaves[6]} if len(leaves) > 6 else {}
    o, state = chunk_regla(
        *leaves[:5], initial_state=leaves[5], output_final_state=True, cu_seqlens=cu, backend=backend, low_memory=low_memory, **bias
    )
    loss = (o.double() * weights[0]).sum() + (state.double() * weights[1]).sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=True) if twice else None
    loss.backward()
    if twice:
        assert all(torch.equal(a, x.grad) for a, x in zip(first, leaves)), "a second backward through the same graph differs"
    return [o.detach(), state.detach()] + [x.grad for x in leaves]


def _assert_within(errors: dict, got, dtype) -> None:
    assert all(bool(torch.isfinite(a).all()) for a in got), "a kernel left an element unwritten (NaN) or overflowed"
    bad = {name: e for name, e in errors.items() if not e < BOUNDS[dtype]}
    assert not bad, (bad, errors)


class Case(NamedTuple):
    """One `test_chunk_regla` case: shape, dtype, gate logits (a scale or "saturated"), packed
    lengths, the low-memory mode, a second backward, the logits' bias in the kernels."""

    batch: int
    length: int
    heads: int
    dk: int
    dv: int
    dtype: torch.dtype
    logit_scale: Union[float, str] = 1.0
    seqlens: Optional[Sequence[int]] = None
    low_memory: Union[bool, str] = False
    twice: bool = False
    gate_bias: bool = False


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
CASES = {
    "fp32 B2 T1000 H4 d128": Case(2, 1000, 4, 128, 128, FP32),
    "bf16 B2 T1000 H4 d128": Case(2, 1000, 4, 128, 128, BF16),
    "fp32 saturated B2 T777 H2 d128": Case(2, 777, 2, 128, 128, FP32, "saturated"),
    "bf16 saturated B2 T777 H2 d128": Case(2, 777, 2, 128, 128, BF16, "saturated"),
    "bf16 wide logits B1 T2048 H2 d128": Case(1, 2048, 2, 128, 128, BF16, 4.0),
    "bf16 logits x2 B1 T2048 H2 d128": Case(1, 2048, 2, 128, 128, BF16, 2.0),
    "bf16 logits x2.5 B1 T4096 H2 d128": Case(1, 4096, 2, 128, 128, BF16, 2.5),
    "bf16 B2 T8192 H4 d128": Case(2, 8192, 4, 128, 128, BF16),
    "bf16 dk64 dv128 B2 T300 H4": Case(2, 300, 4, 64, 128, BF16),
    "fp32 dk128 dv64 B2 T129 H2": Case(2, 129, 2, 128, 64, FP32),
    "fp16 d64 B2 T200 H2": Case(2, 200, 2, 64, 64, FP16),
    "bf16 packed [300,1000,77] H4 d128": Case(1, 1377, 4, 128, 128, BF16, 1.0, [300, 1000, 77]),
    "fp32 packed [1,64,65,500] H2 d64": Case(1, 630, 2, 64, 64, FP32, 1.0, [1, 64, 65, 500]),
    # the windowed backward: low_memory=True (b and h computed again per window) or "backward" (kept)
    "low memory bf16 B2 T8192 H4 d128": Case(2, 8192, 4, 128, 128, BF16, low_memory=True),
    "low memory backward bf16 B2 T8192 H4 d128": Case(2, 8192, 4, 128, 128, BF16, low_memory="backward"),
    "low memory fp32 B3 T1000 H4 d128": Case(3, 1000, 4, 128, 128, FP32, low_memory=True),
    "low memory backward bf16 wide logits B2 T2048": Case(2, 2048, 2, 128, 128, BF16, 4.0, low_memory="backward"),
    "low memory backward fp32 logits x2.5 B2 T1500 d64": Case(2, 1500, 2, 64, 64, FP32, 2.5, low_memory="backward"),
    "low memory bf16 packed [300,5000,77,3000]": Case(1, 8377, 4, 128, 128, BF16, 1.0, [300, 5000, 77, 3000], True),
    "low memory backward fp32 packed [1,64,65,900]": Case(1, 1030, 2, 64, 64, FP32, 2.5, [1, 64, 65, 900], "backward"),
    # a second backward through one graph (retain_graph), one pass and low memory
    "second backward bf16 B2 T1000 H4 d128": Case(2, 1000, 4, 128, 128, BF16, twice=True),
    "second backward low memory backward bf16 B2 T8192": Case(2, 8192, 4, 128, 128, BF16, low_memory="backward", twice=True),
    # the logits' bias inside the kernels (as ReGLAMixer passes its gate bias), every route that takes it
    "bias bf16 B2 T1000 H4 d128": Case(2, 1000, 4, 128, 128, BF16, gate_bias=True, twice=True),
    "bias fp32 B2 T300 H2 d64": Case(2, 300, 2, 64, 64, FP32, gate_bias=True),
    "bias low memory bf16 B2 T4096 H4 d128": Case(2, 4096, 4, 128, 128, BF16, low_memory=True, gate_bias=True),
    "bias low memory backward bf16 B2 T4096 H4 d128": Case(2, 4096, 4, 128, 128, BF16, low_memory="backward", gate_bias=True),
    "bias bf16 packed [300,1000,77] H4 d128": Case(1, 1377, 4, 128, 128, BF16, 1.0, [300, 1000, 77], gate_bias=True),
    "bias low memory fp32 packed [1,64,65,500] d64": Case(1, 630, 2, 64, 64, FP32, 2.5, [1, 64, 65, 500], True, gate_bias=True),
    "bias low memory backward bf16 packed [300,2000,77]": Case(
        1, 2377, 4, 128, 128, BF16, 1.0, [300, 2000, 77], "backward", gate_bias=True
    ),
}


@pytest.mark.parametrize("label", list(CASES))
def test_chunk_regla(label, monkeypatch):
    """The Triton path against the chunked PyTorch path in fp64 (output, final state, every
    gradient). With low_memory the windowed backward, which in fp32 must also equal the one-pass
    backward bit for bit. Saturated gates: F is 0 or 1 to fp64, so the true gate gradients are
    ~1e-13 and a relative error says nothing; the reverse-cumsum identity gives them to an
    absolute error set by the q.dq and k.dk terms, bound against the key gradient's norm."""
    case = CASES[label]
    gen = torch.Generator(device=DEVICE).manual_seed(list(CASES).index(label))
    cu = _offsets(case.seqlens)
    sequences = case.batch if case.seqlens is None else len(case.seqlens)
    inputs = _draw(case.batch, case.length, case.heads, case.dk, case.dv, case.dtype, case.logit_scale, sequences, gen)
    names = list(NAMES)
    seen = []
    if case.gate_bias:
        inputs.append(torch.randn(case.heads, 2 * case.dk, generator=gen, device=DEVICE))
        names.append("dbias")
        for module in (function, windows):  # record the bias the Functions hand the kernels
            original = module.kernel_bias
            monkeypatch.setattr(module, "kernel_bias", lambda b, _f=original: seen.append(b) or _f(b))
    weights = [
        torch.randn(case.batch, case.length, case.heads, case.dv, generator=gen, device=DEVICE, dtype=torch.float64),
        torch.randn(sequences, case.heads, case.dk, case.dv, generator=gen, device=DEVICE, dtype=torch.float64),
    ]
    got = _run("triton", inputs, cu, weights, case.low_memory, case.twice)
    if case.gate_bias:
        assert seen and seen[0] is not None, "the bias did not reach the kernels"
    ref = _run("torch", [x.double() for x in inputs], cu, weights)
    errors = {name: _relative(a, b) for name, a, b in zip(names, got, ref)}
    if case.logit_scale == "saturated":
        for index, name in ((5, "dgate"), (6, "drefine")):
            errors[name] = ((got[index].double() - ref[index].double()).norm() / ref[3].double().norm()).item()
    if case.low_memory and case.dtype == torch.float32:
        one_pass = _run("triton", inputs, cu, weights)
        differ = [name for name, a, b in zip(names, got, one_pass) if not torch.equal(a, b)]
        assert not differ, f"low_memory differs from the one-pass backward in {differ}"
    _assert_within(errors, got, case.dtype)


def _outputs_and_grads(call, inputs, weight):
    """Output and every input gradient of (call(*inputs) * weight).sum()."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    o = call(*leaves)
    (o.double() * weight).sum().backward()
    return [o.detach()] + [x.grad for x in leaves]


def _by_segments(segments, slots):
    """The sequences cut into `segments` segments carried by a LocalSegmentExchange (the
    context-parallel kernel path on one device); no final state."""

    def call(q, k, v, z, u, h0):
        batch, length = q.shape[:2]
        cut = lambda x: x.reshape(batch, segments, length // segments, *x.shape[2:]).transpose(0, 1).flatten(0, 1)
        key_max = sequence_key_max(k).repeat(segments, 1)
        exchange = LocalSegmentExchange(segments, slots)
        o = chunk_regla_segments(*(cut(x) for x in (q, k, v, z, u)), exchange, key_max=key_max, initial_state=h0)
        return o.reshape(segments, batch, length // segments, *o.shape[2:]).transpose(0, 1).reshape(batch, length, *o.shape[2:])

    return call


def _as_long_sequences(q, k, v, z, u, h0, bias=None):
    """chunk_regla without a final state, LAUNCH["segment_min_programs"] forcing segments."""
    settings.LAUNCH["segment_min_programs"] = 10**6
    assert segments_per_sequence(q.shape[0], q.shape[2], q.shape[3], v.shape[3], q.shape[1]) > 1
    options = {} if bias is None else {"gate_bias": bias}
    return chunk_regla(q, k, v, z, u, initial_state=h0, backend="triton", **options)[0]


SEGMENT_CASES = {  # batch, length, heads, d, dtype, segments, slots (0: chunk_regla's long-sequence route), gate shift, bias
    "segments 4 slots 4 bf16 B2 T4096 H4 d128": (2, 4096, 4, 128, BF16, 4, 4, 0.0, False),
    "segments 2 slots 1 fp32 B1 T1920 H2 d64": (1, 1920, 2, 64, FP32, 2, 1, 0.0, False),
    "long sequences as 8 segments bf16 B2 T8192 H4": (2, 8192, 4, 128, BF16, 8, 0, 0.0, False),
    "slow gates as segments bf16 B2 T4096 H4": (2, 4096, 4, 128, BF16, 8, 0, 4.0, False),
    "bias long sequences as segments bf16 B2 T8192 H4": (2, 8192, 4, 128, BF16, 8, 0, 0.0, True),
}


@pytest.mark.parametrize("label", list(SEGMENT_CASES))
def test_segments(label):
    """The segments path (through chunk_regla_segments, or chunk_regla's long-sequence route)
    against the one-pass torch path in fp64: output and every gradient. A gate shift moves the
    gate logits up: slow gates, so the carried states weigh in every chunk of a segment. With the
    bias, the route adds it to the logits first."""
    batch, length, heads, d, dtype, segments, slots, gate_shift, with_bias = SEGMENT_CASES[label]
    gen = torch.Generator(device=DEVICE).manual_seed(100 + list(SEGMENT_CASES).index(label))
    inputs = _draw(batch, length, heads, d, d, dtype, 1.0, batch, gen)
    inputs[3] = inputs[3] + gate_shift
    names = [n for n in NAMES if n != "final_state"]
    if with_bias:
        inputs.append(torch.randn(heads, 2 * d, generator=gen, device=DEVICE))
        names.append("dbias")
    weight = torch.randn(batch, length, heads, d, generator=gen, device=DEVICE, dtype=torch.float64)
    call = _by_segments(segments, slots) if slots else _as_long_sequences
    got = _outputs_and_grads(call, inputs, weight)
    no_state = torch.zeros(batch, heads, d, d, device=DEVICE, dtype=torch.float64)
    ref = _run("torch", [x.double() for x in inputs], None, [weight, no_state])
    ref = [ref[0]] + ref[2:]
    _assert_within({name: _relative(a, b) for name, a, b in zip(names, got, ref)}, got, dtype)


STRIDED_CASES = {  # batch, length, heads, d, dtype, packed lengths, low memory, bias
    "strided [s, b] projection bf16 B2 T1000 H4 d128": (2, 1000, 4, 128, BF16, None, False, False),
    "strided packed [100, 900, 27] fp32 H2 d64": (1, 1027, 2, 64, FP32, [100, 900, 27], False, False),
    "strided low memory bf16 B4 T3000 H4 d128": (4, 3000, 4, 128, BF16, None, True, False),
    "strided bias bf16 B2 T1000 H4 d128": (2, 1000, 4, 128, BF16, None, False, True),
}


@pytest.mark.parametrize("label", list(STRIDED_CASES))
def test_megatron_layout(label):
    """q, k, v, z, u as views of one [s, b, H, 5d] projection seen as [b, s] (Megatron's layout,
    read in place by the kernels) against the torch path on contiguous fp64 copies: output,
    final state and the gradients of the projection, the initial state (and the bias)."""
    batch, length, heads, d, dtype, seqlens, low_memory, with_bias = STRIDED_CASES[label]
    gen = torch.Generator(device=DEVICE).manual_seed(200 + list(STRIDED_CASES).index(label))
    cu = _offsets(seqlens)
    sequences = batch if seqlens is None else len(seqlens)
    proj = torch.randn(length, batch, heads, 5 * d, generator=gen, device=DEVICE)
    proj[..., 3 * d : 4 * d] += 2.0  # gate logits around 2, as in `_draw`
    h0 = torch.randn(sequences, heads, d, d, generator=gen, device=DEVICE)
    bias = torch.randn(heads, 2 * d, generator=gen, device=DEVICE) if with_bias else None
    w_o = torch.randn(batch, length, heads, d, generator=gen, device=DEVICE, dtype=torch.float64)
    w_s = torch.randn(sequences, heads, d, d, generator=gen, device=DEVICE, dtype=torch.float64)

    def run_one(backend, cast):
        leaves = [cast(x).detach().requires_grad_(True) for x in (proj, h0)]
        if bias is not None:  # the bias in fp32 (any float dtype), fp64 for the reference
            leaves.append((bias.double() if backend == "torch" else bias).detach().requires_grad_(True))
        pieces = leaves[0].transpose(0, 1).split(d, dim=-1)
        o, state = chunk_regla(
            *pieces, initial_state=leaves[1], output_final_state=True, cu_seqlens=cu, backend=backend,
            low_memory=low_memory and backend == "triton", gate_bias=None if bias is None else leaves[2],
        )
        loss = (o.double() * w_o).sum() + (state.double() * w_s).sum()
        return [o.detach(), state.detach(), *torch.autograd.grad(loss, leaves)]

    got = run_one("triton", lambda x: x.to(dtype))
    ref = run_one("torch", lambda x: x.to(dtype).double())
    names = ["o", "final_state", "dprojection", "dinitial", "dbias"]
    _assert_within({name: _relative(a, b) for name, a, b in zip(names, got, ref)}, got, dtype)


DECODE_CASES = {"decode bf16 B4 H16 d128": (4, 16, 128, 128, BF16), "decode fp32 B2 H4 dk64 dv128": (2, 4, 64, 128, FP32)}


@pytest.mark.parametrize("label", list(DECODE_CASES))
def test_decode(label, steps=6):
    """Triton decode steps against the torch step in fp64 (output, state, running key max), the
    keys drifting up so the running max grows."""
    batch, heads, dk, dv, dtype = DECODE_CASES[label]
    gen = torch.Generator(device=DEVICE).manual_seed(300 + list(DECODE_CASES).index(label))
    states = {"triton": (None, None), "torch": (None, None)}
    worst = 0.0
    for step in range(steps):
        draw = lambda d, shift=0.0: (torch.randn(batch, heads, d, generator=gen, device=DEVICE) + shift).to(dtype)
        inputs = [draw(dk), draw(dk, 0.5 * step), draw(dv), draw(dk, 2.0), draw(dk)]
        out = {}
        for backend in ("triton", "torch"):
            cast = (lambda x: x.double()) if backend == "torch" else (lambda x: x)
            state, running_max = states[backend]
            result = regla_step(*(cast(x) for x in inputs), state, running_max, backend=backend)
            states[backend] = result[1:]
            out[backend] = result
        assert all(bool(torch.isfinite(a).all()) for a in out["triton"]), step
        worst = max(worst, max(_relative(a, b) for a, b in zip(out["triton"], out["torch"])))
    assert worst < BOUNDS[dtype], worst
