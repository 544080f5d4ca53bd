"""Start N training processes on one machine and set up Megatron's parallel state.

`launch(fn, world_size, *args)` runs `fn(*args)` in `world_size` processes: it reuses the
processes of an outer `torchrun` (RANK/WORLD_SIZE/LOCAL_RANK set) or spawns them itself
with torch.multiprocessing. Backend: NCCL on GPUs, gloo on CPU (with `apply_cpu_shim`).
"""

from __future__ import annotations

import datetime
import os
import socket

import torch


def under_torchrun() -> bool:
    """True when an outer launcher (torchrun, SLURM srun with env) already made the processes."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawned(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    _run(fn, args)


def _run(fn, args) -> None:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "nccl"
    else:
        # Ranks share the CPU cores; one thread each avoids oversubscription.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        from regla_megatron.cpu_shim import apply_cpu_shim

        apply_cpu_shim()
        backend = "gloo"
    torch.distributed.init_process_group(backend, rank=rank, world_size=world_size,
                                         timeout=datetime.timedelta(minutes=10))
    try:
        fn(*args)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def launch(fn, world_size: int, *args) -> None:
    """Runs `fn(*args)` on every rank of a `world_size`-process job (see module doc)."""
    if under_torchrun():
        if int(os.environ["WORLD_SIZE"]) != world_size:
            raise ValueError(f"torchrun started {os.environ['WORLD_SIZE']} processes but the "
                             f"parallel layout needs {world_size}")
        _run(fn, args)
        return
    if torch.cuda.is_available() and torch.cuda.device_count() < world_size:
        raise ValueError(f"{world_size} processes need {world_size} GPUs, "
                         f"found {torch.cuda.device_count()}")
    torch.multiprocessing.start_processes(_spawned, args=(world_size, _free_port(), fn, args),
                                          nprocs=world_size, start_method="spawn")


def init_model_parallel(tp: int, cp: int, pp: int, seed: int) -> None:
    """Megatron's TP/CP/PP/DP groups and its model-parallel RNG (call once per process)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             pipeline_model_parallel_size=pp,
                                             context_parallel_size=cp)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
