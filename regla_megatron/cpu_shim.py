"""Make Megatron-Core 0.16.x-0.19.x run on CPU with gloo (tests, the CPU demo).

`apply_cpu_shim()` is the only place in the project that patches Megatron. It does
nothing when CUDA is available, is idempotent, and raises `RuntimeError` naming the
installed Megatron version when something it patches is missing or has changed shape.
`patch_megatron_for_cpu()` runs the same patches unconditionally, every target checked
again (a CI check that the installed Megatron still fits the shim).

Patches (all scoped to Megatron; `torch` itself is never modified):

1. The Megatron modules that call CUDA-only APIs (`CUDA_CALLING_MODULES`, each listed
   with its reason) see one forwarding proxy as their `torch`, whose
   `cuda.current_device()` is "cpu", whose `cuda.synchronize`/`empty_cache` do nothing,
   whose `cuda.current_stream`/`default_stream` are the CPU stream (0.19's DDP), and
   whose tensor factories put `device="cuda"` tensors on the CPU.
2. The CUDA RNG tracker class behind `get_cuda_rng_tracker()` (and so
   `model_parallel_cuda_manual_seed`) becomes `CpuRNGStatesTracker`, which keeps named
   CPU generator states and forks the CPU default generator.
3. `get_pos_emb_on_this_cp_rank` (RoPE under context parallelism; it uses
   `pin_memory` and `.cuda()`) is replaced, in every module that imported it, by a CPU
   version with the same signature and result.

Not covered: activation recomputation's RNG save/restore, CUDA graphs, TE, the
distributed optimizer (its CUDA tensor-type checks),
`num_distributed_optimizer_instances > 1` (CUDA streams), and the fully parallel
checkpoint *load* exchange (`dist_checkpointing.exchange_utils`, `.cuda()`).
"""

import contextlib
import functools
import importlib
import inspect

import torch

CUDA_CALLING_MODULES = (
    "megatron.core.utils",  # GlobalMemoryBuffer: device=torch.cuda.current_device()
    "megatron.core.tensor_parallel.mappings",  # SP gather/scatter buffers
    "megatron.core.tensor_parallel.layers",  # SP all-gather in linear backward; GPU init
    "megatron.core.tensor_parallel.utils",  # 1-D split/gather buffers
    "megatron.core.tensor_parallel.data",  # broadcast_data (Megatron-LM's get_batch)
    "megatron.core.transformer.attention",  # KV-cache buffers
    "megatron.core.transformer.dot_product_attention",  # off-by-one softmax offset
    "megatron.core.transformer.utils",  # get_default_causal_mask: device="cuda"
    "megatron.core.pipeline_parallel.schedules",  # torch.zeros(..., device="cuda")
    "megatron.core.pipeline_parallel.p2p_communication",  # current_device, synchronize
    "megatron.core.models.common.embeddings.rotary_pos_embedding",  # inv_freq placement
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
    "megatron.core.distributed.distributed_data_parallel",  # synchronize, 0.19 streams
    "megatron.core.distributed.param_and_grad_buffer",  # buffers on current_device
    # Megatron's optimizer (the CPU demo): found_inf/scale flags and grad-norm buffers
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    # dist_checkpointing save: synchronize before the write, result flags on current_device
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.async_utils",
)

_ROPE_CP_MODULES = (
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
)

_APPLIED = False


def megatron_version() -> str:
    """The installed Megatron-Core version string ("0.16.1")."""
    from megatron.core import package_info

    return package_info.__version__


def _fail(what: str) -> RuntimeError:
    return RuntimeError(
        f"regla_megatron.cpu_shim: {what} (megatron-core {megatron_version()}; the shim "
        "was written for 0.16.x-0.19.x). Megatron changed: update regla_megatron/cpu_shim.py."
    )


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):  # a bare index means a CUDA ordinal in Megatron
        return True
    return torch.device(device).type == "cuda"


def _cpu_factory(factory):
    @functools.wraps(factory)
    def make(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
            kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    return make


class _CpuCuda:
    """`torch.cuda` as seen by patched Megatron modules on a machine without CUDA."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(device=None):
        pass

    @staticmethod
    def empty_cache():
        pass

    @staticmethod
    def current_stream(device=None):
        return torch.cpu.current_stream()

    default_stream = current_stream


class _CpuTorch:
    """Forwards to `torch`, except `cuda` and the factories that take `device="cuda"`."""

    cuda = _CpuCuda()
    zeros = staticmethod(_cpu_factory(torch.zeros))
    ones = staticmethod(_cpu_factory(torch.ones))
    empty = staticmethod(_cpu_factory(torch.empty))
    full = staticmethod(_cpu_factory(torch.full))
    tensor = staticmethod(_cpu_factory(torch.tensor))
    arange = staticmethod(_cpu_factory(torch.arange))

    def __getattr__(self, name):
        return getattr(torch, name)


_CPU_TORCH = _CpuTorch()


def _patch_module_torch():
    for name in CUDA_CALLING_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            raise _fail(f"cannot import {name}: {err}") from err
        current = getattr(module, "torch", None)
        if current is _CPU_TORCH:
            continue
        if current is not torch:
            raise _fail(f"{name} has no module-level `torch` to redirect")
        module.torch = _CPU_TORCH


def _make_cpu_tracker_class(base):
    class CpuRNGStatesTracker(base):
        """Megatron's named RNG states, kept as CPU generator states.

        `fork(name)` swaps the CPU default generator to the named state (dropout on CPU
        draws from it) and restores the caller's state afterwards, as the CUDA one does.
        """

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=None):
            from megatron.core.tensor_parallel import random as mrandom

            name = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME if name is None else name
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


def _patch_rng_tracker():
    from megatron.core.tensor_parallel import random as mrandom

    base = getattr(mrandom, "CudaRNGStatesTracker", None)
    init = getattr(mrandom, "initialize_rng_tracker", None)
    if getattr(base, "_regla_cpu_shim", False):
        return
    if not (
        inspect.isclass(base)
        and all(callable(getattr(base, m, None)) for m in ("add", "fork", "reset"))
        and callable(init)
        and "CudaRNGStatesTracker" in init.__code__.co_names
        and hasattr(mrandom, "_MODEL_PARALLEL_RNG_TRACKER_NAME")
    ):
        raise _fail("tensor_parallel.random.CudaRNGStatesTracker/initialize_rng_tracker changed")
    cpu_class = _make_cpu_tracker_class(base)
    cpu_class._regla_cpu_shim = True
    mrandom.CudaRNGStatesTracker = cpu_class
    tracker = getattr(mrandom, "_CUDA_RNG_STATE_TRACKER", None)
    if type(tracker) is base:  # created before the shim: convert it in place
        tracker.__class__ = cpu_class


def _cpu_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    """CPU twin of Megatron's `get_pos_emb_on_this_cp_rank` (chunks r and 2*CP-1-r)."""
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    cp_idx = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
    pos_emb = pos_emb.view(
        *pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[(seq_dim + 1) :]
    )
    pos_emb = pos_emb.index_select(seq_dim, cp_idx)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[(seq_dim + 2) :])


def _patch_rope_cp():
    for name in _ROPE_CP_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            raise _fail(f"cannot import {name}: {err}") from err
        original = getattr(module, "get_pos_emb_on_this_cp_rank", None)
        if original is _cpu_pos_emb_on_this_cp_rank:
            continue
        params = list(inspect.signature(original).parameters) if callable(original) else None
        if params != ["pos_emb", "seq_dim", "cp_group"]:
            raise _fail(f"{name}.get_pos_emb_on_this_cp_rank missing or its signature changed")
        module.get_pos_emb_on_this_cp_rank = _cpu_pos_emb_on_this_cp_rank


def patch_megatron_for_cpu() -> None:
    """Apply every patch of this module now, with or without CUDA, checking each target.

    Targets already patched stay as they are, so it may run after `apply_cpu_shim`; a target
    that is missing or has changed shape since (or was never patchable) raises RuntimeError
    naming it and the installed Megatron version. Users call `apply_cpu_shim`, which also
    leaves a CUDA machine alone.
    """
    _patch_module_torch()
    _patch_rng_tracker()
    _patch_rope_cp()


def apply_cpu_shim() -> bool:
    """Patch Megatron-Core for CPU/gloo if no GPU is present.

    Returns True if the shim is active (now or from an earlier call), False on a CUDA
    machine, where nothing is touched.
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if not _APPLIED:
        patch_megatron_for_cpu()
        _APPLIED = True
    return True


__all__ = ["CUDA_CALLING_MODULES", "apply_cpu_shim", "megatron_version", "patch_megatron_for_cpu"]
