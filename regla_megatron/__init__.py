"""regla_megatron: ReGLA gated linear attention layers for Megatron-Core models.

What to import for what:

- Configure a model: `ReGLAConfig`, Megatron's `TransformerConfig` plus the `regla_*` options
  (heads, head dims, gates, norm, kernel backend, layer pattern such as 'R*R*': 'R' a ReGLA
  layer, '*' a softmax attention layer).
- Build a model from specs (pass them to `GPTModel(transformer_layer_spec=...)`):
  `get_hybrid_block_spec(config)` for the pattern's layers of this pipeline stage,
  `get_regla_layer_spec(backend)` / `get_softmax_layer_spec(backend)` for one layer.
- Megatron-LM's `--spec` (zero-patch form, options from `REGLA_*` variables):
  `--spec regla_megatron.specs regla_spec` (the callable, Megatron-LM 0.19 era and
  Megatron-Bridge) or `--spec regla_megatron.specs regla_hybrid_spec` (the static ModuleSpec,
  core_v0.16.x); `regla_spec` and `regla_hybrid_spec` are those objects.
- Use the token mixer in your own layer spec: `ReGLAMixer` with `ReGLAMixerSubmodules`.
- Call the layer math over a context-parallel group yourself: `context_parallel_regla`
  (more in `regla_megatron.context_parallel`; the kernels alone are `regla_kernels`).
- Run Megatron on CPU with gloo (tests, demos): `apply_cpu_shim()` before building models.
- The patched Megatron-LM's hooks and the `--regla-*` flags: `regla_megatron.megatron_lm`.

`import regla_megatron` itself imports neither Megatron nor Triton and does not touch CUDA:
each name above is imported from its module on first use.
"""

import importlib
from typing import TYPE_CHECKING

_HOMES = {
    "ReGLAConfig": "regla_megatron.config",
    "ReGLAMixer": "regla_megatron.mixer",
    "ReGLAMixerSubmodules": "regla_megatron.mixer",
    "apply_cpu_shim": "regla_megatron.cpu_shim",
    "context_parallel_regla": "regla_megatron.context_parallel.regla",
    "get_hybrid_block_spec": "regla_megatron.specs",
    "get_regla_layer_spec": "regla_megatron.specs",
    "get_softmax_layer_spec": "regla_megatron.specs",
    "regla_hybrid_spec": "regla_megatron.specs",
    "regla_spec": "regla_megatron.specs",
}

__all__ = [
    "ReGLAConfig",
    "ReGLAMixer",
    "ReGLAMixerSubmodules",
    "apply_cpu_shim",
    "context_parallel_regla",
    "get_hybrid_block_spec",
    "get_regla_layer_spec",
    "get_softmax_layer_spec",
    "regla_hybrid_spec",
    "regla_spec",
]

if TYPE_CHECKING:  # static tools see the names; at run time they load on first use
    from regla_megatron.config import ReGLAConfig
    from regla_megatron.context_parallel.regla import context_parallel_regla
    from regla_megatron.cpu_shim import apply_cpu_shim
    from regla_megatron.mixer import ReGLAMixer, ReGLAMixerSubmodules
    from regla_megatron.specs import (
        get_hybrid_block_spec,
        get_regla_layer_spec,
        get_softmax_layer_spec,
        regla_hybrid_spec,
        regla_spec,
    )


def __getattr__(name: str):
    """The public name `name`, imported from its module on first access."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'regla_megatron' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__():
    """The module's names, the not yet loaded public ones included."""
    return sorted(set(globals()) | set(__all__))
