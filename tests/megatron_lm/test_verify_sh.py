"""`patches/verify.sh` on a Megatron-LM core_v0.16 checkout, on CPU: the patch, argument parsing
with the ReGLA flags and the data checks, the example's flags, and the model built from the
parsed arguments; and its failure when Megatron-LM's own dependencies are missing.

The checkout is `.megatron-lm-0.16/` at the repository root (git-ignored; `MEGATRON_LM_016`
names another), copied before patching. Megatron-LM's dependencies (six, regex, pyyaml,
pydantic, einops) must be importable for the full check.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKOUT = Path(os.environ.get("MEGATRON_LM_016", ROOT / ".megatron-lm-0.16"))
REQUIREMENTS = {"six": "six", "regex": "regex", "yaml": "pyyaml", "pydantic": "pydantic", "einops": "einops"}
LOCAL_MODULES = ("gpt_builders.py", "model_provider.py")


@pytest.fixture
def checkout(tmp_path):
    if not (CHECKOUT / "pretrain_gpt.py").is_file():
        pytest.skip(f"no Megatron-LM core_v0.16 checkout at {CHECKOUT} (set MEGATRON_LM_016 or place one there)")
    copy = tmp_path / "megatron-lm"
    shutil.copytree(CHECKOUT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _verify(checkout, tmp_path, pythonpath=None):
    env = dict(os.environ, PYTHON=sys.executable)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run(["bash", str(ROOT / "patches" / "verify.sh"), str(checkout)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=400)


def test_parses_checks_and_builds_the_model(checkout, tmp_path):
    missing = [pip for name, pip in REQUIREMENTS.items() if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"Megatron-LM's dependencies are not installed: pip install {' '.join(missing)}")
    result = _verify(checkout, tmp_path)
    out = result.stdout
    for line in ("applied megatron-lm-core_v0.16.patch", "idempotent: ok", "dependencies:",
                 "ReGLAConfig(regla_pattern='R*R*')", "--num-layers is 4", "without --spec regla",
                 "use --vocab-size 257", "leaves the validation set",
                 "pretrain_regla_hybrid.sh (patched): its", "pretrain_regla_hybrid.sh (zero-patch): its",
                 "model (patched, regla_hybrid_spec): GPTModel with ['ReGLAMixer', 'SelfAttention']",
                 "model (zero-patch, regla_hybrid_spec): GPTModel with ['ReGLAMixer', 'SelfAttention']"):
        assert line in out, f"{line!r} not in verify.sh output:\n{out}\n{result.stderr[-3000:]}"
    absent = [name for name in LOCAL_MODULES if not (checkout / name).is_file()]
    if absent:  # an incomplete checkout: verify.sh says what to copy and fails
        assert result.returncode == 1 and f"copy {Path(absent[0]).stem}.py" in out, out
    else:
        assert result.returncode == 0 and "pretrain_gpt.py: imports" in out, out


def test_missing_megatron_lm_dependencies_fail_with_the_pip_command(checkout, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('six', 'regex'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n")
    pythonpath = os.pathsep.join([str(blocker)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    result = _verify(checkout, tmp_path, pythonpath)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "dependencies are missing: six, regex" in result.stdout, result.stdout
    assert "-m pip install six regex" in result.stdout, result.stdout
