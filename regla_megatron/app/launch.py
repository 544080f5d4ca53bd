"""Start N training processes on one machine and set up Megatron's parallel state.

`launch(fn, world_size, *args)` runs `fn(*args)` in `world_size` processes: it reuses the
processes of an outer `torchrun` (RANK/WORLD_SIZE/LOCAL_RANK set, one or several nodes) or
spawns them itself with torch.multiprocessing. Backend: NCCL on GPUs (one GPU per rank),
gloo on CPU (with `apply_cpu_shim`). An exception in a spawned rank comes back to the
caller as `RankError` with that rank's message.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Optional

import torch

RANK_TIMEOUT = datetime.timedelta(minutes=10)  # collectives, and waiting for all ranks to join


class RankError(RuntimeError):
    """A spawned rank raised; the message is that rank's last error line."""


def available_gpus() -> Optional[int]:
    """GPUs this process can use, or None on a machine without CUDA."""
    return torch.cuda.device_count() if torch.cuda.is_available() else None


def under_torchrun() -> bool:
    """True when an outer launcher (torchrun, SLURM srun with env) already made the processes."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def check_gpus_per_node() -> None:
    """Raises ValueError when an outer torchrun starts more processes on this node than it has GPUs."""
    gpus = available_gpus()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) if under_torchrun() else 0
    if gpus is not None and local > gpus:
        raise ValueError(f"torchrun starts {local} processes on this node but it has {gpus} GPU(s), one per "
                         f"rank: pass --nproc-per-node {gpus} (or fewer)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawned(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    _run(fn, args)


def _run(fn, args) -> None:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local} has no GPU of its own ({torch.cuda.device_count()} "
                               f"here): start at most {torch.cuda.device_count()} processes per node")
        torch.cuda.set_device(local)
        backend = "nccl"
    else:
        # Ranks share the CPU cores; one thread each avoids oversubscription.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        from regla_megatron.cpu_shim import apply_cpu_shim

        apply_cpu_shim()
        backend = "gloo"
    torch.distributed.init_process_group(backend, rank=rank, world_size=world_size,
                                         timeout=RANK_TIMEOUT)
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
    try:
        torch.multiprocessing.start_processes(_spawned, args=(world_size, _free_port(), fn, args),
                                              nprocs=world_size, start_method="spawn")
    except torch.multiprocessing.ProcessRaisedException as err:
        raise RankError(f"rank {err.error_index}: {last_error_line(str(err))}") from err


def last_error_line(traceback_text: str) -> str:
    """The 'SomeError: message' line that ends a formatted traceback (the whole text if none)."""
    lines = [line for line in traceback_text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else traceback_text


def init_model_parallel(tp: int, cp: int, pp: int, seed: int) -> None:
    """Megatron's TP/CP/PP/DP groups and its model-parallel RNG (call once per process)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             pipeline_model_parallel_size=pp,
                                             context_parallel_size=cp)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
