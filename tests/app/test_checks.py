"""Bad `train` settings end as one clear line before any process starts or any file is written.

Every case runs `main([...])` in the test process: a case that got past the checks would
prepare data in the workdir and spawn ranks, so each also checks the workdir stays absent.
"""

import pytest

from regla_megatron.app.checks import ConfigError, check_demo_config, fit_layout, layout_problem, stage_patterns
from regla_megatron.app.cli import main
from regla_megatron.app.demo import DemoConfig


def _train_error(tmp_path, capsys, *flags) -> str:
    """stderr of `regla-megatron train --tiny FLAGS`, which must fail with status 2 and write nothing."""
    work = tmp_path / "work"
    try:
        code = main(["train", "--tiny", "--workdir", str(work), *flags])
    except SystemExit as exit_info:  # argparse's own rejections
        code = exit_info.code
    assert code == 2
    assert not work.exists()
    return capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--steps", "-2"], "argument --steps: must be positive, got -2"),
    (["--steps", "0"], "argument --steps: must be positive, got 0"),
    (["--tp", "0"], "argument --tp: must be positive, got 0"),
    (["--seq-length", "0"], "argument --seq-length: must be positive, got 0"),
    (["--micro-batch-size", "0"], "argument --micro-batch-size: must be positive, got 0"),
    (["--log-every", "0"], "argument --log-every: must be positive, got 0"),
    (["--max-bytes", "-5"], "argument --max-bytes: must be positive, got -5"),
    (["--lr", "-1"], "argument --lr: must be positive, got -1"),
    (["--warmup", "-1"], "argument --warmup: must be 0 or more, got -1"),
    (["--save-at", "10"], "--save-at 10 is outside the run of --steps 6: give a step from 1 to 5 "
                          "(such as --save-at 3), or --no-restart"),
    (["--steps", "3", "--save-at", "3"], "--save-at 3 is outside the run of --steps 3"),
    (["--tp", "3"], "--tp 3: the 4 attention heads do not split over 3 tensor-parallel ranks; use --tp 1, 2 or 4"),
    (["--cp", "3"], "--cp 3: --seq-length 64 must be a multiple of 2 x CP = 6 (each CP rank holds two chunks); "
                    "use --cp 1, 2, 4 or 8, or --seq-length 66"),
    (["--pp", "3"], "--pp 3: the 2 layers (R*) do not split into 3 pipeline stages of equal size; use --pp 1 or 2 "
                    "(--pp 1: stages R*)"),
    (["--tp", "4", "--cp", "1", "--seq-length", "6"], "--seq-length 6: each of the 1 CP rank(s) holds 6 tokens, "
                                                      "which sequence parallelism splits over --tp 4; use --seq-length 8"),
    (["--ffn-hidden-size", "129"], "--tp 2: --ffn-hidden-size 129 does not split over 2 tensor-parallel ranks; "
                                   "use --tp 1"),
    (["--hidden-size", "100"], "--num-attention-heads 4: --hidden-size 100 must split into heads of a multiple of 16"),
    (["--prompt", ""], "--prompt must not be empty"),
    (["--pattern", "R*Q"], "unknown symbol(s) ['Q']"),
])
def test_bad_train_flags(tmp_path, capsys, flags, message):
    assert message in _train_error(tmp_path, capsys, *flags)


def test_the_padded_vocab_must_split_over_tp():
    cfg = DemoConfig.preset("tiny", num_attention_heads=3, hidden_size=48, ffn_hidden_size=96, cp=1)
    assert layout_problem(cfg, 3, 1, 1, vocab=257) == (
        "--tp 3: the embedding's 320 rows (vocab 257 padded to a multiple of 64) do not split over 3 "
        "tensor-parallel ranks; use --tp 1")


def test_library_config_is_checked_too():
    with pytest.raises(ConfigError, match="--steps must be positive, got -2"):
        check_demo_config(DemoConfig.preset("tiny", steps=-2))
    with pytest.raises(ConfigError, match="--micro-batch-size must be positive, got 0"):
        check_demo_config(DemoConfig.preset("tiny", micro_batch_size=0))
    with pytest.raises(ConfigError, match="--tp must be positive, got 0"):
        check_demo_config(DemoConfig.preset("tiny", tp=0))
    check_demo_config(DemoConfig.preset("tiny"))
    check_demo_config(DemoConfig())
    assert stage_patterns("R*R*", 2) == ["R*", "R*"]


def test_default_layout_adapts_to_fewer_gpus():
    cfg = DemoConfig()  # TP 2 x CP 2
    assert fit_layout(cfg, set(), gpus=None) == (2, 2, 1, None)  # CPU: spawns any number
    assert fit_layout(cfg, set(), gpus=8) == (2, 2, 1, None)
    tp, cp, pp, note = fit_layout(cfg, set(), gpus=2)
    assert (tp, cp, pp) == (2, 1, 1)
    assert note == ("this machine has 2 GPU(s): running TP 2 x CP 1 x PP 1 instead of TP 2 x CP 2 x PP 1 "
                    "(pass --tp/--cp/--pp to choose)")
    assert fit_layout(cfg, set(), gpus=3)[:3] == (2, 1, 1)
    assert fit_layout(cfg, set(), gpus=1)[:3] == (1, 1, 1)
    assert fit_layout(cfg, {"cp"}, gpus=2)[:3] == (1, 2, 1)  # the flag given stays


def test_explicit_layout_that_does_not_fit_says_what_to_pass():
    cfg = DemoConfig()
    with pytest.raises(ConfigError) as err:
        fit_layout(cfg, {"tp", "cp"}, gpus=2)
    assert str(err.value) == ("--tp 2 --cp 2: TP 2 x CP 2 x PP 1 needs 4 GPUs (one per rank) but this machine "
                              "has 2; pass e.g. --tp 2 --cp 1 --pp 1")
    with pytest.raises(ConfigError, match="needs 4 GPUs"):
        check_demo_config(cfg, gpus=2)  # the library path: nothing adapts


def test_layout_under_torchrun_must_use_its_processes():
    cfg = DemoConfig()
    assert fit_layout(cfg, set(), gpus=None, world=4) == (2, 2, 1, None)
    assert fit_layout(cfg, set(), gpus=None, world=2)[:3] == (2, 1, 1)
    tp, cp, pp, _ = fit_layout(cfg, set(), gpus=None, world=8)
    assert tp * cp * pp == 8 and tp == 2
    with pytest.raises(ConfigError, match="TP 2 x CP 2 x PP 1 is 4 processes but torchrun started 2; pass e.g."):
        fit_layout(cfg, {"tp", "cp", "pp"}, gpus=None, world=2)


def test_the_command_line_adapts_and_says_so(tmp_path, capsys, monkeypatch):
    from regla_megatron.app import launch

    monkeypatch.setattr(launch, "available_gpus", lambda: 2)
    # --save-at 6 stops the run right after the layout is chosen, before any work.
    assert main(["train", "--workdir", str(tmp_path / "w"), "--steps", "6", "--save-at", "6"]) == 2
    out = capsys.readouterr()
    assert "this machine has 2 GPU(s): running TP 2 x CP 1 x PP 1 instead of TP 2 x CP 2 x PP 1" in out.out
    assert main(["train", "--workdir", str(tmp_path / "w"), "--tp", "2", "--cp", "2"]) == 2
    assert "needs 4 GPUs (one per rank) but this machine has 2; pass e.g. --tp 2 --cp 1 --pp 1" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_more_torchrun_processes_than_gpus(monkeypatch):
    from regla_megatron.app import launch

    monkeypatch.setattr(launch, "available_gpus", lambda: 2)
    for key, value in dict(RANK="0", WORLD_SIZE="4", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           LOCAL_WORLD_SIZE="4").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="torchrun starts 4 processes on this node but it has 2 GPU"):
        launch.check_gpus_per_node()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    launch.check_gpus_per_node()
