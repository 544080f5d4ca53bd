"""Test setup: which device the suite sees, the Triton interpreter, and the markers.

By default the suite hides the GPUs and runs the Triton kernels in Triton's CPU interpreter
(`TRITON_INTERPRET=1`, set here before anything imports Triton, since Triton reads it when a
kernel is defined). `REGLA_TESTS_SEE_GPU=1` keeps the GPUs visible and the compiler on: then
the tests under `tests/gpu/` run on the GPU and the interpreter cases are skipped.

Markers: `slow` (deselected unless `--slow` is given: the full interpreter matrix),
`interpreter` (needs the interpreter), `gpu` (needs CUDA).
"""

import os
import socket

SEE_GPU = os.environ.get("REGLA_TESTS_SEE_GPU") == "1"
if not SEE_GPU:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long cases (the full interpreter matrix); run with --slow")
    config.addinivalue_line("markers", "interpreter: runs Triton kernels in the CPU interpreter")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (REGLA_TESTS_SEE_GPU=1)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--slow"):
        kept = [item for item in items if "slow" not in item.keywords]
        deselected = [item for item in items if "slow" in item.keywords]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = kept
    for item in items:
        if "interpreter" in item.keywords and not INTERPRETING:
            item.add_marker(pytest.mark.skip(reason="needs TRITON_INTERPRET=1 (the default without REGLA_TESTS_SEE_GPU)"))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU and REGLA_TESTS_SEE_GPU=1"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def megatron_single_process():
    """Megatron in this process: CPU shim, a one-rank gloo group, model parallel sizes 1, seeded.

    Idempotent: the process group is created once per pytest process and reused.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from regla_megatron.cpu_shim import apply_cpu_shim

    apply_cpu_shim()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel()
    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()
