"""Compile the Triton ReGLA kernels for sm_90 on this machine (no GPU needed) and print
registers, stack (spills) and shared memory per kernel, as the H200 would run them.

    python benchmarks/sm90_resources.py [--dtype bf16] [--warps fast_dqk=8 ...] [--only NAME]

Uses Triton's bundled ptxas and cuobjdump; the numbers are for this Triton version, which
may differ from the GPU machine's.
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

from regla_kernels import triton_chunk as tc
from regla_kernels import triton_fast as tf
from regla_kernels import triton_stages as ts

PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def compile_one(fn, args, constexprs, warps):
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = args[name]
    src = ASTSource(fn, signature, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (m.groups() + (kernel.metadata.shared,)) if m else out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--warps", nargs="*", default=[])
    parser.add_argument("--fast-output-bv", type=int, default=tc.LAUNCH["fast_output_block_v"])
    parser.add_argument("--fast-bwd-bv", type=int, default=tc.LAUNCH["fast_dqk_block_v"])
    parser.add_argument("--only", default="")
    parser.add_argument("--carry", action="store_true", help="the context-parallel variants (carried states)")
    parser.add_argument("--fast-bk", type=int, default=tc.LAUNCH["fast_dqk_block_k"])
    parser.add_argument("--fast-dv-bv", type=int, default=tc.LAUNCH["fast_dv_block_v"])
    a = parser.parse_args()
    warps = {k.replace("_warps", ""): v for k, v in tc.LAUNCH.items() if k.endswith("_warps")}
    warps.update({k: int(v) for k, v in (w.split("=") for w in a.warps)})
    p = PTR[a.dtype]
    dt = tl.bfloat16 if a.dtype == "bf16" else tl.float32
    d = a.d
    common = dict(DK=d, DV=d, C=tc.CHUNK_SIZE, S=tc.SUB_CHUNK_SIZE)
    i32, f32 = "*i32", "*fp32"
    args = dict(q_ptr=p, k_ptr=p, v_ptr=p, z_ptr=p, u_ptr=p, b_ptr=f32, flag_ptr="*i8", kmax_ptr=f32, h_ptr=p, dh_ptr=p,
                do_ptr=p, o_ptr=p, dq_ptr=p, dk_ptr=p, dv_ptr=p, dz_ptr=p, du_ptr=p, table_ptr=i32, cu_ptr=i32, choff_ptr=i32,
                h0_ptr=f32, ht_ptr=f32, dht_ptr=f32, dh0_ptr=f32, bend_ptr=f32, hadd_ptr=f32, hdecay_ptr=f32,
                dhadd_ptr=f32, dhdecay_ptr=f32, qmax_ptr=f32, da_ptr=p if a.dtype == "bf16" else f32, scale="fp32", H="i32")
    # input strides (`triton_chunk._layout`): Megatron's [s, b] projection views, divisible by 16
    args.update({name: "i32" for name in ("S_T", "S_N", "S_H", "V_T", "V_N", "V_H", "Z_T", "Z_N", "Z_H")})
    jobs = []
    jobs.append(("gates", ts.chunk_gates_kernel, dict(DK=d, C=tc.CHUNK_SIZE, LIMIT=60.0, KEY_MAX=True, STAGES=tc.LAUNCH["gates_stages"]), warps["gates"]))
    jobs.append(("fwd_states", ts.chunk_fwd_states_kernel, dict(DK=d, DV=d, C=tc.CHUNK_SIZE, BK=64, BV=64, HAS_H0=False, STORE_HT=True, DT=dt), warps["states"]))
    jobs.append(("fwd_output_fast", tf.chunk_fwd_output_fast_kernel, dict(DK=d, DV=d, C=tc.CHUNK_SIZE, BV=a.fast_output_bv, DT=dt, HAS_HADD=a.carry), warps["fast_output"]))
    jobs.append(("fwd_output_sub", ts.chunk_fwd_output_kernel, dict(common, BV=64, DT=tl.float32, DIAG_LIMIT=-1.0, HAS_HADD=a.carry), warps["output"]))
    jobs.append(("bwd_dstates", ts.chunk_bwd_dstates_kernel, dict(DK=d, DV=d, C=tc.CHUNK_SIZE, BK=64, BV=64, HAS_DHT=False, DT=dt), warps["states"]))
    jobs.append(("bwd_dv_fast", tf.chunk_bwd_dv_fast_kernel, dict(DK=d, DV=d, C=tc.CHUNK_SIZE, BV=a.fast_dv_bv, DT=dt, HAS_DHADD=a.carry), warps["fast_dv"]))
    jobs.append(("bwd_dqk_fast", tf.chunk_bwd_dqk_fast_kernel, dict(DK=d, DV=d, C=tc.CHUNK_SIZE, BK=a.fast_bk, BV=a.fast_bwd_bv, DT=dt, HAS_HADD=a.carry, HAS_DHADD=a.carry), warps["fast_dqk"]))
    jobs.append(("bwd_main_sub", ts.chunk_bwd_main_kernel, dict(common, BV=32, DT=tl.float32, DIAG_LIMIT=-1.0, HAS_HADD=a.carry, HAS_DHADD=a.carry), warps["bwd"]))
    print(f"triton {triton.__version__}, sm_90, {a.dtype}, d={d}, warps {warps}")
    for name, fn, constexprs, w in jobs:
        if a.only and a.only not in name:
            continue
        print(f"{name:18s} REG/STACK/SHARED(dyn) {compile_one(fn, args, constexprs, w)}", flush=True)


if __name__ == "__main__":
    main()
