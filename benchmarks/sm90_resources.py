"""Compile the Triton ReGLA kernels for sm_90 on this machine (no GPU needed) and print
registers, stack (spills) and shared memory per kernel, as the H200 would run them.

    python benchmarks/sm90_resources.py [--dtype bf16] [--warps fast_dqk=8 ...] [--only NAME]

Uses Triton's bundled ptxas and cuobjdump; the numbers are for this Triton version, which
may differ from the GPU machine's (`pip install --target DIR triton==3.6.0` and PYTHONPATH=DIR
compiles with the GPU's). Pointers and integer arguments get the divisibility-by-16 hint the
runtime gives them; without it the counts were far off (255 registers with spills where the
H200 ran 166). Run it before a GPU call: it also catches compile errors the interpreter does not.
"""

import argparse
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from regla_kernels.triton import chunk_kernels as ts
from regla_kernels.triton import fast as tf
from regla_kernels.triton import settings as tc

PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


# LAUNCH register caps by job name (`regla_kernels.triton.settings.register_cap`)
CAPS = {"gates": "gates", "fwd_states": "states", "fwd_states (starts)": "states", "bwd_dstates": "states",
    "fwd_output_fast": "fast_output",
        "bwd_dv_fast": "fast_dv", "bwd_dqk_fast": "fast_dqk"}


def compile_one(fn, args, constexprs, warps, stages=1, maxnreg=0):
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = args[name]
    # as the runtime specializes them: pointers and integer arguments divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name] != "constexpr" and (signature[name].startswith("*") or signature[name] == "i32")}
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (m.groups() + (kernel.metadata.shared,)) if m else out


def kernel_jobs(dtype="bf16", d=128, carry=False, warps=None, fast_output_bv=None, fast_bwd_bv=None, fast_bk=None,
                fast_dv_bv=None):
    """(name, kernel, argument types, constexprs, warps, loop stages) of every Triton kernel of the
    chunked path as `regla_kernels.triton.launch` launches it (LAUNCH settings unless given); carry: the
    carried-state (context-parallel) variants."""
    launch = tc.LAUNCH
    warps = {**{k.replace("_warps", ""): v for k, v in launch.items() if k.endswith("_warps")}, **(warps or {})}
    fast_output_bv = fast_output_bv or launch["fast_output_block_v_carried" if carry else "fast_output_block_v"]
    p = PTR[dtype]
    dt = tl.bfloat16 if dtype == "bf16" else tl.float32
    common = dict(DK=d, DV=d, C=tc.CHUNK_SIZE, S=tc.SUB_CHUNK_SIZE)
    i32, f32 = "*i32", "*fp32"
    args = dict(q_ptr=p, k_ptr=p, v_ptr=p, z_ptr=p, u_ptr=p, b_ptr=f32, flag_ptr="*i8", kmax_ptr=f32, h_ptr=p, dh_ptr=p,
                do_ptr=p, o_ptr=p, dq_ptr=p, dk_ptr=p, dv_ptr=p, dz_ptr=p, du_ptr=p, table_ptr=i32, cu_ptr=i32, work_ptr=i32, choff_ptr=i32,
                h0_ptr=f32, ht_ptr=f32, dht_ptr=f32, dh0_ptr=f32, bend_ptr=f32, hadd_ptr=f32, hdecay_ptr=f32,
                dhadd_ptr=f32, dhdecay_ptr=f32, qmax_ptr=f32, starts_ptr=p, every="i32", N="i32", spill="i32", bias_ptr=f32,
                da_ptr=p if dtype == "bf16" else f32, scale="fp32", H="i32")
    # input strides (`regla_kernels.triton.layout.input_strides`): Megatron's [s, b] projection views, divisible by 16
    args.update({name: "i32" for name in ("R_T", "R_N", "S_T", "S_N", "S_H", "V_T", "V_N", "V_H", "Z_T", "Z_N", "Z_H")})
    args["reach_ptr"] = "*i8" if carry else f32  # without a carried state the runtime passes a placeholder
    fast_bv = dict(BV=fast_bwd_bv or launch["fast_dqk_block_v"])
    gate_stride = 1 if dtype == "fp32" else 2  # 16-bit: the gate gradients over b (`regla_kernels.triton.buffers.gate_arena`)
    # h in the dq/dk gradient arena (`regla_kernels.triton.buffers.GradArena`) where it fits; not with carried states (segments)
    in_grads = dtype != "fp16" and not carry
    grads = dict(QS=2 if in_grads else 1, IN_GRADS=in_grads, HAS_BIAS=True)  # the logits' bias in the kernels (Megatron's)
    states = dict(DK=d, DV=d, C=tc.CHUNK_SIZE, BK=min(d, launch["states_block_k"]), BV=min(d, launch["states_block_v"]), DT=dt)
    jobs = [
        ("gates", ts.chunk_gates_kernel, dict(DK=d, C=tc.CHUNK_SIZE, LIMIT=60.0, KEY_MAX=True, STAGES=launch["gates_stages"], WORK=True,
                                              HAS_BIAS=True), warps["gates"], 1),
        ("fwd_states", ts.chunk_fwd_states_kernel, dict(states, HAS_H0=False, STORE_HT=True, STARTS=False, IN_GRADS=in_grads),
            warps["states"], launch["states_stages"]),
        ("fwd_states (starts)", ts.chunk_fwd_states_kernel, dict(states, HAS_H0=False, STORE_HT=True, STARTS=True, IN_GRADS=in_grads),
            warps["states"], launch["states_stages"]),
        ("fwd_output_sub", ts.chunk_fwd_output_kernel, dict(common, BV=min(d, launch["block_v"]), DT=tl.float32,
            HAS_HADD=carry, IN_GRADS=in_grads), warps["output"], 1),
        ("bwd_dstates", ts.chunk_bwd_dstates_kernel, dict(states, HAS_DHT=False), warps["states"], launch["states_stages"]),
        ("bwd_dqk_fast", tf.chunk_bwd_dqk_fast_kernel, dict(DK=d, DV=d, C=tc.CHUNK_SIZE, BK=fast_bk or min(d, launch["fast_dqk_block_k"]),
                                                        DT=dt, HAS_HADD=carry, HAS_DHADD=carry, GS=gate_stride, **grads, **fast_bv),
         warps["fast_dqk"], launch["fast_dqk_stages"]),
        ("bwd_main_sub", ts.chunk_bwd_main_kernel, dict(common, BV=min(d, 32), DT=tl.float32, HAS_HADD=carry,
            HAS_DHADD=carry, GS=gate_stride, **grads), warps["bwd"], 1),
    ]
    for launch_carry in (1, 2) if carry else (0,):
        suffix = {0: "", 1: " (not reached)", 2: ""}[launch_carry]
        jobs.append((f"fwd_output_fast{suffix}", tf.chunk_fwd_output_fast_kernel, dict(DK=d, DV=d, C=tc.CHUNK_SIZE, BV=min(d,
            fast_output_bv), DT=dt, CARRY=launch_carry, IN_GRADS=in_grads),
                     warps["fast_output"], 1))
        jobs.append((f"bwd_dv_fast{suffix}", tf.chunk_bwd_dv_fast_kernel, dict(DK=d, DV=d, C=tc.CHUNK_SIZE, BV=min(d,
            fast_dv_bv or launch["fast_dv_block_v"]), DT=dt, CARRY=launch_carry),
                     warps["fast_dv"], launch["fast_dv_stages"]))
    return [(name, fn, args, constexprs, w, stages) for name, fn, constexprs, w, stages in jobs]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--warps", nargs="*", default=[])
    parser.add_argument("--fast-output-bv", type=int, default=None)
    parser.add_argument("--fast-bwd-bv", type=int, default=None)
    parser.add_argument("--only", default="")
    parser.add_argument("--carry", action="store_true", help="the context-parallel variants (carried states)")
    parser.add_argument("--fast-bk", type=int, default=None)
    parser.add_argument("--fast-dv-bv", type=int, default=None)
    a = parser.parse_args()
    warps = {k: int(v) for k, v in (w.split("=") for w in a.warps)}
    jobs = kernel_jobs(a.dtype, a.d, a.carry, warps, a.fast_output_bv, a.fast_bwd_bv, a.fast_bk, a.fast_dv_bv)
    print(f"triton {triton.__version__}, sm_90, {a.dtype}, d={a.d}")
    for name, fn, args, constexprs, w, stages in jobs:
        if a.only and a.only not in name:
            continue
        cap = tc.LAUNCH.get(CAPS.get(name.split(" ")[0], "") + "_maxnreg", 0)
        print(f"{name:26s} warps {w} REG/STACK/SHARED(dyn) {compile_one(fn, args, constexprs, w, stages, cap)}", flush=True)


if __name__ == "__main__":
    main()
