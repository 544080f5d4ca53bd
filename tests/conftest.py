"""The suite tests the CPU / gloo paths (and Triton under TRITON_INTERPRET in subprocesses).

On a GPU machine it hides the GPUs so the same paths run there (set REGLA_TESTS_SEE_GPU=1
to keep them visible); the GPU checks live in benchmarks/gpu_check_*.py.
"""

import os
import sys

if os.environ.get("REGLA_TESTS_SEE_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

sys.path.insert(0, os.path.dirname(__file__))

import socket

import pytest
import torch


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
