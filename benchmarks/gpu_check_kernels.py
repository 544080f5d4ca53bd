"""GPU correctness of the Triton ReGLA kernels at real shapes, against the torch chunked
reference on fp64-upcast inputs. Fresh random inputs per check, outputs NaN-poisoned
before every run (REGLA_TRITON_POISON=1), saturated gates, T not a multiple of the chunk,
packed sequences, initial state and final-state gradient.

    python benchmarks/gpu_check_kernels.py [--launch diag_limit=40 bwd_warps=8]   # exits 1 on any failure
"""

import argparse
import os
import sys
import time

os.environ["REGLA_TRITON_POISON"] = "1"

import torch  # noqa: E402

from bench_kernels import apply_launch  # noqa: E402
from regla_kernels import chunk_regla, triton_chunk  # noqa: E402

BOUNDS = {torch.float32: 3e-3, torch.bfloat16: 1e-2, torch.float16: 5e-3}
NAMES = ["o", "final_state", "dq", "dk", "dv", "dgate", "drefine", "dinitial"]


def draw(batch, length, heads, dk, dv, dtype, logit_scale, sequences, gen):
    r = lambda *shape, s=1.0: (s * torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32)).to(dtype)
    q, k = r(batch, length, heads, dk), r(batch, length, heads, dk)
    v = r(batch, length, heads, dv)
    if logit_scale == "saturated":  # logits at +-30: gates rounded to 0 or 1 in any float
        z = 30.0 * torch.sign(torch.randn(batch, length, heads, dk, generator=gen, device="cuda"))
        u = 30.0 * torch.sign(torch.randn(batch, length, heads, dk, generator=gen, device="cuda"))
        z, u = z.to(dtype), u.to(dtype)
    else:
        z, u = r(batch, length, heads, dk, s=logit_scale) + 2.0, r(batch, length, heads, dk, s=logit_scale)
    h0 = torch.randn(sequences, heads, dk, dv, generator=gen, device="cuda")
    return [q, k, v, z, u, h0]


def run(backend, inputs, cu, weights, low_memory=False, twice=False):
    """Output, final state and every input gradient. twice: the gradients come from a second
    backward through the same graph (retain_graph), asserted bit for bit equal to the first's
    (the first writes the gate gradients over the b the forward kept; the second computes b again)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    bias = dict(gate_bias=leaves[6]) if len(leaves) > 6 else {}  # inputs[6]: the logits' bias [H, 2 dk]
    o, state = chunk_regla(
        *leaves[:5], initial_state=leaves[5], output_final_state=True, cu_seqlens=cu, backend=backend, low_memory=low_memory, **bias
    )
    loss = (o.double() * weights[0]).sum() + (state.double() * weights[1]).sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=True) if twice else None
    loss.backward()
    if twice and not all(torch.equal(a, x.grad) for a, x in zip(first, leaves)):
        raise AssertionError("a second backward through the same graph differs from the first")
    return [o.detach(), state.detach()] + [x.grad for x in leaves]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def check(label, batch, length, heads, dk, dv, dtype, logit_scale=1.0, seqlens=None, seed=0, low_memory=False, twice=False,
          gate_bias=False):
    """Triton against the torch reference in fp64 (forward, final state, every gradient). With
    low_memory the windowed backward, which in fp32 must also equal the one-pass backward bit for
    bit. gate_bias: with a bias of the logits (fp32 [H, 2 dk], added inside the Triton kernels)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    cu = None
    sequences = batch
    if seqlens is not None:
        cu = torch.tensor([0] + list(torch.tensor(seqlens).cumsum(0)), device="cuda", dtype=torch.int32)
        sequences = len(seqlens)
    inputs = draw(batch, length, heads, dk, dv, dtype, logit_scale, sequences, gen)
    names = NAMES
    triton_chunk.LAUNCH["gate_bias_in_kernels"] = gate_bias  # the bias inside the kernels (off by default until checked here)
    if gate_bias:
        inputs.append(torch.randn(heads, 2 * dk, generator=gen, device="cuda"))
        names = NAMES + ["dbias"]
    weights = [torch.randn(batch, length, heads, dv, generator=gen, device="cuda", dtype=torch.float64),
               torch.randn(sequences, heads, dk, dv, generator=gen, device="cuda", dtype=torch.float64)]
    if seqlens is None:
        fast = triton_chunk.fast_chunk_mask(inputs[3], inputs[4]).float().mean().item()
    else:
        fast = float("nan")
    start = time.time()
    got = run("triton", inputs, cu, weights, low_memory, twice)
    torch.cuda.synchronize()
    ref = run("torch", [x.double() for x in inputs], cu, weights)
    errors = {name: rel(a, b) for name, a, b in zip(names, got, ref)}
    same = True
    if low_memory:
        one_pass = run("triton", inputs, cu, weights)
        differ = [name for name, a, b in zip(names, got, one_pass) if not torch.equal(a, b)]
        same = dtype != torch.float32 or not differ
        print(f"     {label}: low_memory differs from the one-pass backward in {differ or 'nothing'}", flush=True)
    finite = all(bool(torch.isfinite(a).all()) for a in got)
    bound = BOUNDS[dtype]
    if logit_scale == "saturated":
        # F is 0 or 1 to fp64, so the true gate gradients are ~1e-13 and a relative error says
        # nothing; the reverse-cumsum identity gives them to an absolute error set by the q.dq
        # and k.dk terms: bound that error against the key gradient's norm instead.
        for i, name in ((5, "dgate"), (6, "drefine")):
            errors[name + "/|dk|"] = ((got[i].double() - ref[i].double()).norm() / ref[3].double().norm()).item()
        checked = {n: e for n, e in errors.items() if n not in ("dgate", "drefine")}
    else:
        checked = errors
    ok = finite and same and all(e < bound for e in checked.values())
    text = " ".join(f"{n}={e:.1e}" for n, e in errors.items())
    print(f"{'PASS' if ok else 'FAIL'} {label:38s} bound {bound:.0e} finite={finite} fast={fast:.2f} {text} ({time.time() - start:.1f}s)", flush=True)
    return ok


def report(label, dtype, names, got, ref):
    """Print PASS/FAIL with each relative error (bound by dtype); True when all are finite and within it."""
    errors = {name: rel(a, b) for name, a, b in zip(names, got, ref)}
    finite = all(bool(torch.isfinite(a).all()) for a in got)
    ok = finite and all(e < BOUNDS[dtype] for e in errors.values())
    text = " ".join(f"{n}={e:.1e}" for n, e in errors.items())
    print(f"{'PASS' if ok else 'FAIL'} {label:38s} bound {BOUNDS[dtype]:.0e} finite={finite} {text}", flush=True)
    return ok


def run_outputs_only(call, inputs, weight):
    """Output and every input gradient of (call(q, k, v, z, u, h0) * weight).sum()."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    o = call(*leaves)
    (o.double() * weight).sum().backward()
    return [o.detach()] + [x.grad for x in leaves]


def by_segments(segments, slots):
    """The sequences cut into `segments` segments carried by a LocalSegmentExchange (the
    context-parallel kernel path on one device); no final state."""
    from regla_kernels import LocalSegmentExchange, chunk_regla_segments, sequence_key_max

    def call(q, k, v, z, u, h0):
        batch, length = q.shape[:2]
        cut = lambda x: x.reshape(batch, segments, length // segments, *x.shape[2:]).transpose(0, 1).flatten(0, 1)
        key_max = sequence_key_max(k).repeat(segments, 1)
        o = chunk_regla_segments(*(cut(x) for x in (q, k, v, z, u)), LocalSegmentExchange(segments, slots), key_max=key_max, initial_state=h0)
        return o.reshape(segments, batch, length // segments, *o.shape[2:]).transpose(0, 1).reshape(batch, length, *o.shape[2:])

    return call


def as_long_sequences(q, k, v, z, u, h0):
    """chunk_regla without a final state, LAUNCH["segment_min_programs"] forcing segments."""
    saved = triton_chunk.LAUNCH["segment_min_programs"]
    triton_chunk.LAUNCH["segment_min_programs"] = 10**6
    try:
        return chunk_regla(q, k, v, z, u, initial_state=h0, backend="triton")[0]
    finally:
        triton_chunk.LAUNCH["segment_min_programs"] = saved


def check_segments(label, batch, length, heads, d, dtype, segments, slots, gate_shift=0.0, seed=0):
    """The segments path (slots > 0: through chunk_regla_segments; 0: chunk_regla's long-sequence
    route) against the one-pass torch reference in fp64 (output, all gradients). gate_shift moves
    the gate logits up: slow gates, so the carried states weigh in every chunk of a segment."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    inputs = draw(batch, length, heads, d, d, dtype, 1.0, batch, gen)
    inputs[3] = inputs[3] + gate_shift
    weights = [torch.randn(batch, length, heads, d, generator=gen, device="cuda", dtype=torch.float64)]
    got = run_outputs_only(by_segments(segments, slots) if slots else as_long_sequences, inputs, weights[0])
    ref = run("torch", [x.double() for x in inputs], None, weights + [torch.zeros(batch, heads, d, d, device="cuda", dtype=torch.float64)])
    ref = [ref[0]] + ref[2:]
    return report(label, dtype, [n for n in NAMES if n != "final_state"], got, ref)


def check_strided(label, batch, length, heads, d, dtype, seqlens=None, seed=0, low_memory=False):
    """q, k, v, z, u as views of one [s, b, H, 5d] projection seen as [b, s] (Megatron's layout,
    read in place by the kernels) against the torch reference on contiguous fp64 copies: output,
    final state and the gradients of the projection and the initial state."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    cu = None if seqlens is None else torch.tensor([0] + list(torch.tensor(seqlens).cumsum(0)), device="cuda", dtype=torch.int32)
    sequences = batch if seqlens is None else len(seqlens)
    proj = torch.randn(length, batch, heads, 5 * d, generator=gen, device="cuda")
    proj[..., 3 * d : 4 * d] += 2.0  # gate logits around 2, as in `draw`
    h0 = torch.randn(sequences, heads, d, d, generator=gen, device="cuda")
    w_o = torch.randn(batch, length, heads, d, generator=gen, device="cuda", dtype=torch.float64)
    w_s = torch.randn(sequences, heads, d, d, generator=gen, device="cuda", dtype=torch.float64)

    def run_one(backend, cast):
        leaves = [cast(x).detach().requires_grad_(True) for x in (proj, h0)]
        pieces = leaves[0].transpose(0, 1).split(d, dim=-1)
        o, state = chunk_regla(
            *pieces, initial_state=leaves[1], output_final_state=True, cu_seqlens=cu, backend=backend,
            low_memory=low_memory and backend == "triton",
        )
        loss = (o.double() * w_o).sum() + (state.double() * w_s).sum()
        return [o.detach(), state.detach(), *torch.autograd.grad(loss, leaves)]

    got = run_one("triton", lambda x: x.to(dtype))
    ref = run_one("torch", lambda x: x.to(dtype).double())
    return report(label, dtype, ["o", "final_state", "dprojection", "dinitial"], got, ref)


def check_decode(label, batch, heads, dk, dv, dtype, steps=6, seed=0):
    """Triton decode steps against the torch step in fp64 (output, state, running key max)."""
    from regla_kernels import regla_step

    gen = torch.Generator(device="cuda").manual_seed(seed)
    states = {"triton": (None, None), "torch": (None, None)}
    worst = 0.0
    for step in range(steps):
        draw = lambda d, shift=0.0: (torch.randn(batch, heads, d, generator=gen, device="cuda") + shift).to(dtype)
        inputs = [draw(dk), draw(dk, 0.5 * step), draw(dv), draw(dk, 2.0), draw(dk)]
        out = {}
        for backend in ("triton", "torch"):
            cast = (lambda x: x.double()) if backend == "torch" else (lambda x: x)
            state, running_max = states[backend]
            result = regla_step(*(cast(x) for x in inputs), state, running_max, backend=backend)
            states[backend] = result[1:]
            out[backend] = result
        worst = max(worst, max(rel(a, b) for a, b in zip(out["triton"], out["torch"])))
    ok = worst < BOUNDS[dtype]
    print(f"{'PASS' if ok else 'FAIL'} {label:38s} bound {BOUNDS[dtype]:.0e} worst relative error over {steps} steps {worst:.1e}", flush=True)
    return ok


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--launch", nargs="*", help="KEY=VALUE overrides of regla_kernels.triton_chunk.LAUNCH")
    apply_launch(parser.parse_args().launch)
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} launch {triton_chunk.LAUNCH}", flush=True)
    cases = [
        ("fp32 B2 T1000 H4 d128", 2, 1000, 4, 128, 128, torch.float32),
        ("bf16 B2 T1000 H4 d128", 2, 1000, 4, 128, 128, torch.bfloat16),
        ("fp32 saturated B2 T777 H2 d128", 2, 777, 2, 128, 128, torch.float32, "saturated"),
        ("bf16 saturated B2 T777 H2 d128", 2, 777, 2, 128, 128, torch.bfloat16, "saturated"),
        ("bf16 wide logits B1 T2048 H2 d128", 1, 2048, 2, 128, 128, torch.bfloat16, 4.0),
        ("bf16 logits x2 B1 T2048 H2 d128", 1, 2048, 2, 128, 128, torch.bfloat16, 2.0),
        ("bf16 logits x2.5 B1 T4096 H2 d128", 1, 4096, 2, 128, 128, torch.bfloat16, 2.5),
        ("bf16 B2 T8192 H4 d128", 2, 8192, 4, 128, 128, torch.bfloat16),
        ("bf16 dk64 dv128 B2 T300 H4", 2, 300, 4, 64, 128, torch.bfloat16),
        ("fp32 dk128 dv64 B2 T129 H2", 2, 129, 2, 128, 64, torch.float32),
        ("fp16 d64 B2 T200 H2", 2, 200, 2, 64, 64, torch.float16),
        ("bf16 cu_seqlens [300,1000,77] H4 d128", 1, 1377, 4, 128, 128, torch.bfloat16, 1.0, [300, 1000, 77]),
        ("fp32 cu_seqlens [1,64,65,500] H2 d64", 1, 630, 2, 64, 64, torch.float32, 1.0, [1, 64, 65, 500]),
    ]
    low_memory = [  # the windowed backward: low_memory=True (b and h computed again per window) or "backward" (both kept)
        ("low memory bf16 B2 T8192 H4 d128", 2, 8192, 4, 128, 128, torch.bfloat16, 1.0, None, True),
        ("low memory backward bf16 B2 T8192 H4 d128", 2, 8192, 4, 128, 128, torch.bfloat16, 1.0, None, "backward"),
        ("low memory fp32 B3 T1000 H4 d128", 3, 1000, 4, 128, 128, torch.float32, 1.0, None, True),
        ("low memory backward bf16 wide logits B2 T2048", 2, 2048, 2, 128, 128, torch.bfloat16, 4.0, None, "backward"),
        ("low memory backward fp32 logits x2.5 B2 T1500 d64", 2, 1500, 2, 64, 64, torch.float32, 2.5, None, "backward"),
        ("low memory bf16 cu_seqlens [300,5000,77,3000]", 1, 8377, 4, 128, 128, torch.bfloat16, 1.0, [300, 5000, 77, 3000], True),
        ("low memory backward fp32 cu_seqlens [1,64,65,900]", 1, 1030, 2, 64, 64, torch.float32, 2.5, [1, 64, 65, 900], "backward"),
    ]
    twice = [  # a second backward through one graph (retain_graph), default and low-memory
        ("second backward bf16 B2 T1000 H4 d128", 2, 1000, 4, 128, 128, torch.bfloat16, 1.0, None, False),
        ("second backward low memory backward bf16 B2 T8192", 2, 8192, 4, 128, 128, torch.bfloat16, 1.0, None, "backward"),
    ]
    with_bias = [  # the logits' bias inside the kernels (Megatron's ReGLAMixer passes its gate bias so)
        ("bias bf16 B2 T1000 H4 d128", 2, 1000, 4, 128, 128, torch.bfloat16, 1.0, None, False),
        ("bias low memory backward bf16 B2 T4096 H4 d128", 2, 4096, 4, 128, 128, torch.bfloat16, 1.0, None, "backward"),
        ("bias low memory fp32 cu_seqlens [1,64,65,500] d64", 1, 630, 2, 64, 64, torch.float32, 2.5, [1, 64, 65, 500], True),
    ]
    results = []
    for seed, case in enumerate(with_bias, start=100):
        results.append(check(*case[:-1], seed=seed, low_memory=case[-1], gate_bias=True))
    for seed, case in enumerate(cases + low_memory + twice):
        try:
            if seed >= len(cases):
                results.append(check(*case[:-1], seed=seed, low_memory=case[-1], twice=seed >= len(cases) + len(low_memory)))
            else:
                results.append(check(*case, seed=seed))
        except Exception as error:  # report and go on: one broken case must not hide the others
            cause = error
            while cause.__cause__ is not None:
                cause = cause.__cause__
            print(f"FAIL {case[0]}: {type(error).__name__}: {str(error)[:300]} / cause {type(cause).__name__}: {str(cause)[-600:]}", flush=True)
            results.append(False)
    for label, *case in [("segments 4 slots 4 bf16 B2 T4096 H4 d128", 2, 4096, 4, 128, torch.bfloat16, 4, 4),
                         ("segments 2 slots 1 fp32 B1 T1920 H2 d64", 1, 1920, 2, 64, torch.float32, 2, 1),
                         ("long sequences as 8 segments bf16 B2 T8192 H4", 2, 8192, 4, 128, torch.bfloat16, 8, 0),
                         ("slow gates as 4 segments bf16 B2 T4096 H4", 2, 4096, 4, 128, torch.bfloat16, 4, 0, 4.0)]:
        try:
            results.append(check_segments(label, *case))
        except Exception as error:
            print(f"FAIL {label}: {type(error).__name__}: {str(error)[:300]}", flush=True)
            results.append(False)
    for label, *case in [("strided [s, b] projection bf16 B2 T1000 H4 d128", 2, 1000, 4, 128, torch.bfloat16),
                         ("strided packed [100, 900, 27] fp32 H2 d64", 1, 1027, 2, 64, torch.float32, [100, 900, 27]),
                         ("strided low memory bf16 B4 T3000 H4 d128", 4, 3000, 4, 128, torch.bfloat16, None, 0, True)]:
        try:
            results.append(check_strided(label, *case))
        except Exception as error:
            print(f"FAIL {label}: {type(error).__name__}: {str(error)[:300]}", flush=True)
            results.append(False)
    for label, *shape in [("decode bf16 B4 H16 d128", 4, 16, 128, 128, torch.bfloat16), ("decode fp32 B2 H4 dk64 dv128", 2, 4, 64, 128, torch.float32)]:
        try:
            results.append(check_decode(label, *shape))
        except Exception as error:
            print(f"FAIL {label}: {type(error).__name__}: {str(error)[:300]}", flush=True)
            results.append(False)
    print(f"{sum(results)}/{len(results)} checks passed", flush=True)
    return all(results)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
