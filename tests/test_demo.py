"""The CI-sized demo: 4 gloo ranks (TP=2 x CP=2), loss falls, resuming is exact.

Two runs of `regla-megatron train --tiny`: one saves at step 3 and restarts from the
checkpoint with a freshly built model and optimizer, the other trains straight through.
Steps 4..6 must give the same losses (the data order and LR are functions of the step,
dropout is off, and the optimizer state travels in the checkpoint).
"""

import pytest

from regla_megatron.demo import DemoConfig, run_demo


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    resumed = run_demo(DemoConfig.preset("tiny", workdir=str(tmp_path_factory.mktemp("resumed"))))
    straight = run_demo(DemoConfig.preset("tiny", save_at=None,
                                          workdir=str(tmp_path_factory.mktemp("straight"))))
    return resumed, straight


def test_loss_falls(runs):
    losses = [v for _, v in sorted(runs[0]["losses"].items(), key=lambda kv: int(kv[0]))]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 1.0, losses
    assert runs[0]["val_ppl"] < 257  # better than uniform over the byte vocab


def test_resume_reproduces_uninterrupted_run(runs):
    resumed, straight = (r["losses"] for r in runs)
    for step in ("4", "5", "6"):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step
    assert runs[0]["generated_ids"] == runs[1]["generated_ids"]


def test_checkpoint_loads_at_another_layout(runs, tmp_path):
    """The TP=2 x CP=2 checkpoint of step 6, loaded at TP=1 x PP=2, evaluates the same."""
    import shutil
    from pathlib import Path

    saved = Path(runs[1]["workdir"])
    shutil.copytree(saved / "data", tmp_path / "data")
    reloaded = run_demo(DemoConfig.preset("tiny", tp=1, cp=1, pp=2, save_at=None,
                                          load=str(saved / "checkpoint" / "step6"),
                                          workdir=str(tmp_path)))
    assert reloaded["losses"] == {}
    assert reloaded["val_loss"] == pytest.approx(runs[1]["val_loss"], abs=1e-5)
