"""Norms with the parallel bookkeeping Megatron needs (MEGATRON_NOTES, TP/SP traps).

- `PerHeadNorm`: the ReGLA output norm, RMSNorm or LayerNorm over dv with one weight
  row per head. Weights are TP-split by head (each rank holds its heads' rows), so
  gradients are complete on each rank and checkpoints carry the global shape.
- `SequenceParallelNorm`: a replicated hidden-size RMSNorm/LayerNorm for Megatron's
  input_layernorm / pre_mlp_layernorm / final layer norm slots that runs anywhere
  (CPU included). Under sequence parallelism each TP rank sees only its tokens, so the
  weight gradients are partial; the params carry `sequence_parallel = True` and
  Megatron's `finalize_model_grads` (`_allreduce_non_tensor_model_parallel_grads`)
  sums them over the TP group.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

NORM_TYPES = ("rmsnorm", "layernorm")
"""The kinds of `PerHeadNorm` (the ReGLA output norm, `ReGLAConfig.regla_norm`)."""


def param_device(config: TransformerConfig) -> torch.device:
    """Where Megatron would allocate a parameter: the current GPU, or CPU when asked or absent."""
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _normalize(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], kind: str, eps: float
) -> torch.Tensor:
    """Normalize the last dim of x in fp32 (fp64 for fp64 input); weight/bias broadcast on it."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(dtype)
    if kind == "rmsnorm":
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    else:
        y = F.layer_norm(xf, xf.shape[-1:], eps=eps)
    y = y * weight.to(dtype)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype)


class PerHeadNorm(torch.nn.Module):
    """RMSNorm or LayerNorm over the value dim of each head, one learnable row per head.

    Args:
        config: the model config (params_dtype, use_cpu_initialization).
        num_local_heads: heads on this TP rank.
        head_dim: dv.
        norm_type: 'rmsnorm' or 'layernorm' (the latter adds a per-head bias).
        eps: epsilon inside the square root.
        tp_group: the tensor-parallel group the heads are split over (for checkpoints).
    Params: weight [num_local_heads, head_dim] (ones), bias [num_local_heads, head_dim]
    (zeros, layernorm only), both with tensor_model_parallel=True, partition_dim=0.
    """

    def __init__(
        self,
        config: TransformerConfig,
        num_local_heads: int,
        head_dim: int,
        norm_type: str = "rmsnorm",
        eps: float = 1e-5,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
    ):
        super().__init__()
        if norm_type not in NORM_TYPES:
            raise ValueError(f"PerHeadNorm: unknown norm_type {norm_type!r}; choose {' or '.join(map(repr, NORM_TYPES))}")
        self.norm_type = norm_type
        self.eps = eps
        self.tp_group = tp_group
        factory = dict(device=param_device(config), dtype=config.params_dtype)
        self.weight = torch.nn.Parameter(torch.ones(num_local_heads, head_dim, **factory))
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)
        if norm_type == "layernorm":
            self.bias = torch.nn.Parameter(torch.zeros(num_local_heads, head_dim, **factory))
            set_tensor_model_parallel_attributes(self.bias, True, 0, 1)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., num_local_heads, head_dim], any float dtype -> same shape and dtype."""
        return _normalize(x, self.weight, self.bias, self.norm_type, self.eps)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata: Optional[dict] = None):
        """Checkpoint entries with the global [num_heads, head_dim] shape (split on axis 0)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = self.state_dict(prefix="", keep_vars=True)
        tp_group = self.tp_group if self.tp_group is not None else parallel_state.get_tensor_model_parallel_group()
        return make_sharded_tensors_for_checkpoint(
            state,
            prefix,
            {name: 0 for name in state},
            sharded_offsets,
            tp_group=tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )


class SequenceParallelNorm(torch.nn.Module):
    """Replicated RMSNorm / LayerNorm over the hidden size, correct under sequence parallelism.

    Built by Megatron as `Norm(config=, hidden_size=, eps=)`; `config.normalization`
    ('RMSNorm' or 'LayerNorm') picks the kind and `config.layernorm_zero_centered_gamma`
    stores the weight as (gamma - 1).

    forward: x [..., hidden_size] any float dtype -> same shape and dtype (math in fp32).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        kinds = {"RMSNorm": "rmsnorm", "LayerNorm": "layernorm"}
        if config.normalization not in kinds:
            raise ValueError(
                f"SequenceParallelNorm: normalization {config.normalization!r} is not supported; "
                f"choose one of {sorted(kinds)}"
            )
        self.kind = kinds[config.normalization]
        self.eps = eps
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        factory = dict(device=param_device(config), dtype=config.params_dtype)
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, **factory))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, **factory)) if self.kind == "layernorm" else None
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., hidden_size], any float dtype -> same shape and dtype."""
        weight = self.weight + 1 if self.zero_centered_gamma else self.weight
        return _normalize(x, weight, self.bias, self.kind, self.eps)
