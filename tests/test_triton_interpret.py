"""The Triton ReGLA kernels in Triton's CPU interpreter (cases in triton_interpret_cases.py).

Triton reads TRITON_INTERPRET when the kernels are defined, so the cases run in a child
pytest process with the variable set; it never reaches this process's other tests.
"""

import os
import re
import subprocess
import sys

import pytest

CASES = os.path.join(os.path.dirname(__file__), "triton_interpret_cases.py")


def test_interpreted_kernels_match_fp64_reference():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", CASES],
        env=env, capture_output=True, text=True, timeout=900, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 10 and "skipped" not in summary, summary
