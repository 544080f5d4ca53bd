"""The CI-sized demo: 4 gloo ranks (TP=2 x CP=2), loss falls, resuming is exact, eval reproduces it.

Two runs of `regla-megatron train --tiny` (the `runs` fixture): one saves at step 3 and
restarts from the checkpoint with a freshly built model and optimizer, the other trains
straight through. Steps 4..6 must give the same losses (the data order and LR are functions
of the step, dropout is off, and the optimizer state travels in the checkpoint). `eval` of
the final checkpoint, at other layouts, must give the validation loss the run printed.
"""

import json
from pathlib import Path

import pytest

from regla_megatron.app.cli import main
from regla_megatron.app.evaluate import EvalConfig, run_eval


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


def test_eval_reproduces_the_validation_loss_at_another_layout(runs):
    """The TP=2 x CP=2 checkpoint of step 6, evaluated at TP=1 x PP=2 on the run's own data."""
    root = Path(runs[1]["workdir"]) / "checkpoint"
    result = run_eval(EvalConfig(load=str(root), tp=1, cp=1, pp=2))
    assert result["step"] == 6 and result["layout"] == {"tp": 1, "cp": 1, "pp": 2}
    assert result["val_loss"] == pytest.approx(runs[1]["val_loss"], abs=1e-5)


def test_eval_of_text_files_prepares_them_aside(runs, capsys):
    """`eval --data FILES` with the run's own input files prepares the same dataset (in a
    temporary folder it deletes) and so gives the same loss, on one rank."""
    work = Path(runs[1]["workdir"])
    sources = json.loads((work / "data" / "corpus.json").read_text())["sources"]
    assert main(["eval", "--load", str(work / "checkpoint" / "step6"), "--data", *sources]) == 0
    printed = capsys.readouterr().out
    loss = float(printed.split("loss ")[1].split(",")[0])
    assert loss == pytest.approx(runs[1]["val_loss"], abs=1e-4)  # printed to 4 decimals
    assert "per byte token" in printed and "/eval" in printed
    scratch = Path(printed.split(" on ")[1].split(":")[0]).parent
    assert scratch.name.startswith("regla-eval-") and not scratch.exists()
