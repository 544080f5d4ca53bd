"""The Triton kernels compile for the H200 (sm_90) with the launch settings the backend uses,
on a CPU machine (Triton's bundled ptxas; no GPU). The interpreter runs the kernels' Python,
not the compiler, so a kernel that only the compiler refuses shows up here first.

Runs in a child process without TRITON_INTERPRET (Triton reads it when kernels are defined).
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SHARED_MEMORY_LIMIT = 227 * 1024  # bytes of shared memory one program may use on sm_90

CHILD = """
import json, sys
sys.path.insert(0, "benchmarks")
import sm90_resources as tool
rows = []
for name, fn, args, constexprs, warps, stages in tool.kernel_jobs(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"):
    registers, stack, shared = tool.compile_one(fn, args, constexprs, warps, stages)
    rows.append([name, int(registers), int(shared)])
print(json.dumps(rows))
"""


@pytest.mark.parametrize("dtype, d, carry", [("bf16", 128, False), ("bf16", 128, True), ("fp32", 64, False)])
def test_every_kernel_compiles_for_sm90(dtype, d, carry):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, dtype, str(d), "1" if carry else "0"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert rows, "no kernel compiled"
    for name, registers, shared in rows:
        assert 0 < registers <= 255, (name, registers)
        assert shared <= SHARED_MEMORY_LIMIT, (name, shared)
