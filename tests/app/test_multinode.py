"""Two torchrun agents on this machine act as two nodes; ranks that cannot see rank 0's files stop.

`torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d` twice (gloo, TP 2 x CP 2 across
the two "nodes") must give the one-node run's losses. With a workdir per node (what nodes
without a shared filesystem see), every rank stops with one message instead of waiting
for a corpus that never appears: end to end in the slow test, and through the detection
functions (`visibility_problem`, `combine_reports`) in the default run.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from regla_megatron.app.corpus import NOT_SHARED, WORKDIR_NOT_SHARED, combine_reports, prepare_corpus, visibility_problem
from tests.app.helpers import one_rank_config

AGENT_TIMEOUT_S = 900  # a cap for a loaded machine, not a speed limit


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_nodes(workdirs, *flags):
    """Runs the tiny demo under two torchrun agents (workdirs[i] for node i); returns their results."""
    port = _port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "regla_megatron", "train",
         "--tiny", "--no-restart", "--workdir", str(w), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for w in workdirs]
    results = []
    for agent in agents:
        out, _ = agent.communicate(timeout=AGENT_TIMEOUT_S)
        results.append((agent.returncode, out))
    return results


def test_two_nodes_match_one_node(runs, tmp_path):
    work = tmp_path / "shared"
    results = _two_nodes([work, work])
    assert all(code == 0 for code, _ in results), results
    metrics = json.loads((work / "metrics.json").read_text())
    one_node = runs[1]  # the same tiny run on 4 spawned ranks, straight through
    assert metrics["losses"].keys() == one_node["losses"].keys()
    for step, loss in one_node["losses"].items():
        assert metrics["losses"][step] == pytest.approx(loss, rel=1e-6), step
    assert metrics["val_loss"] == pytest.approx(one_node["val_loss"], rel=1e-6)


@pytest.mark.slow
def test_a_workdir_per_node_stops_every_rank(tmp_path):
    results = _two_nodes([tmp_path / "node0", tmp_path / "node1"])
    assert all(code != 0 for code, _ in results)
    for _, out in results:
        assert "rank(s) 2 (" in out and NOT_SHARED in out


def test_detection_of_files_rank0_wrote(tmp_path):
    cfg = one_rank_config(tmp_path / "node0")
    corpus = prepare_corpus(cfg, lambda msg: None)
    (tmp_path / "node0" / ".probe-x").write_text("rank 0\n")
    assert visibility_problem(tmp_path / "node0", corpus, ".probe-x", wait_s=0) is None
    missing = visibility_problem(tmp_path / "node1", corpus, ".probe-x", str(tmp_path / "node0"), wait_s=0)
    assert missing.startswith("do not see the dataset rank 0 uses") and missing.endswith(NOT_SHARED)
    # Data prepared on this node too (same files), but the workdir still is not shared.
    prepare_corpus(one_rank_config(tmp_path / "node1"), lambda msg: None)
    probe = visibility_problem(tmp_path / "node1", corpus, ".probe-x", str(tmp_path / "node0"), wait_s=0)
    assert "the file rank 0 wrote into" in probe and probe.endswith(WORKDIR_NOT_SHARED)
    message = combine_reports([(0, "a", None), (1, "a", None), (2, "b", missing), (3, "b", missing)])
    assert message == f"rank(s) 2 (b), 3 (b) {missing}"
    assert combine_reports([(0, "a", None), (1, "b", None)]) is None
