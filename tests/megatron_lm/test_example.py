"""`examples/pretrain_regla_hybrid.sh`: the torchrun command per node (DRY_RUN=1), and the data
check it runs before launching."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pretrain_regla_hybrid.sh"
CLEAN = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "MASTER_ADDR", "MASTER_PORT",
         "NNODES", "NODE_RANK", "ZERO_PATCH", "DRY_RUN", "DIST_OPT", "GPUS_PER_NODE")


def _run(tmp_path, *args, **env):
    environ = {k: v for k, v in os.environ.items() if k not in CLEAN and not k.startswith("REGLA_")}
    environ.update(PYTHON=sys.executable, MEGATRON_LM="/opt/Megatron-LM", **env)
    return subprocess.run(["bash", str(EXAMPLE), *args], env=environ, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def _commands(output):
    """{node rank: (env assignments, torchrun argv)} from the dry-run output."""
    commands = {}
    for line in output.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        words = shlex.split(line)
        assert words[0] == "env", line
        start = words.index("torchrun")
        env = dict(w.split("=", 1) for w in words[1:start])
        argv = words[start:]
        commands[int(argv[argv.index("--node-rank") + 1])] = (env, argv)
    return commands


def _value(argv, flag):
    return argv[argv.index(flag) + 1]


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] || exit 1\nprintf 'gpu-a01\\ngpu-a02\\n'\n")
    scontrol.chmod(0o755)
    return dict(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="42",
                SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_JOB_NUM_NODES="2")


def test_slurm_dry_run_prints_one_command_per_node(tmp_path, fake_slurm):
    result = _run(tmp_path, "--seed", "7", DRY_RUN="1", GPUS_PER_NODE="4", DIST_OPT="1", **fake_slurm)
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    assert sorted(commands) == [0, 1]
    for rank, (env, argv) in commands.items():
        assert (_value(argv, "--nnodes"), _value(argv, "--nproc-per-node")) == ("2", "4")
        assert (_value(argv, "--master-addr"), _value(argv, "--master-port")) == ("gpu-a01", "29500")
        assert _value(argv, "--spec") == "regla" and _value(argv, "--regla-pattern") == "R*" * 12
        assert "--use-distributed-optimizer" in argv and argv[-2:] == ["--seed", "7"]
        assert _value(argv, "--vocab-size") == "257" and "REGLA_PATTERN" not in env
        assert argv[argv.index("--node-rank") + 1] == str(rank)


def test_node_rank_dry_run_zero_patch(tmp_path):
    result = _run(tmp_path, DRY_RUN="1", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.5",
                  MASTER_PORT="6001", GPUS_PER_NODE="8", ZERO_PATCH="1", NUM_LAYERS="4", DIST_OPT="0")
    assert result.returncode == 0, result.stderr
    (env, argv), = _commands(result.stdout).values()
    assert (_value(argv, "--nnodes"), _value(argv, "--node-rank"), _value(argv, "--nproc-per-node")) == ("2", "1", "8")
    assert (_value(argv, "--master-addr"), _value(argv, "--master-port")) == ("10.0.0.5", "6001")
    assert argv[argv.index("--spec") + 1: argv.index("--spec") + 3] == ["regla_megatron.specs", "regla_hybrid_spec"]
    assert not any(a.startswith("--regla-") for a in argv)
    assert env["REGLA_PATTERN"] == "R*R*" and env["REGLA_NORM"] == "rmsnorm"
    assert "--use-distributed-optimizer" not in argv and "--overlap-param-gather" not in argv
    assert argv[0] == "torchrun" and argv[argv.index("--nproc-per-node") + 2] == "--nnodes"


def test_launch_rejects_a_split_without_validation_documents(tmp_path):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path / "one"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    builder.add_document(np.arange(100, dtype=np.uint16), [100])
    builder.finalize(f"{prefix}.idx")
    (tmp_path / "one.json").write_text(json.dumps({"tokenizer": "byte", "vocab_size": 257, "eod": 256}))
    result = _run(tmp_path, DATA_PATH=str(prefix), GPUS_PER_NODE="1")
    assert result.returncode != 0
    assert "validation set" in result.stderr and "1 document" in result.stderr, result.stderr
    result = _run(tmp_path, DATA_PATH=str(prefix), VOCAB_SIZE="256", SPLIT="100,0,0")
    assert result.returncode != 0 and "use --vocab-size 257" in result.stderr, result.stderr
