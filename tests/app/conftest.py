"""Shared pieces of the app tests: the two tiny demo runs, and one in-process rank.

`runs` trains the CI-sized demo twice on 4 gloo ranks (TP=2 x CP=2): once saving at step 3
and restarting from the checkpoint, once straight through. Several test files compare
against these runs, so they run once per pytest run.

`single_rank` gives a one-process gloo group in the test process with Megatron's parallel
state torn down, so that `worker(cfg, corpus)` at TP = CP = PP = 1 can set it up itself:
the checks of checkpoints and of the training loop then run without spawning processes.
"""

import pytest

from regla_megatron.app.demo import DemoConfig, run_demo


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """(resumed, straight) metrics of `run_demo` at the tiny preset."""
    resumed = run_demo(DemoConfig.preset("tiny", workdir=str(tmp_path_factory.mktemp("resumed"))))
    straight = run_demo(DemoConfig.preset("tiny", save_at=None,
                                          workdir=str(tmp_path_factory.mktemp("straight"))))
    return resumed, straight


@pytest.fixture
def single_rank(megatron_single_process):
    """A one-rank process group; Megatron's parallel state is left for `worker` to build."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    yield
