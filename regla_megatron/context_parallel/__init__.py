"""Context parallelism for hybrid models: the ReGLA layer by state passing, and a softmax
attention that runs under CP without TransformerEngine.

- `layout`: which tokens each CP rank holds (zigzag, contiguous; packed THD batches) and
  slicing a full batch to them;
- `communication`: the collectives (differentiable all-gather, key-max all-reduce, the
  Triton path's asynchronous state exchange);
- `regla`: `context_parallel_regla`, the ReGLA layer function over a CP-sharded sequence;
- `attention`: `ContextParallelDotProductAttention`, imported from its module (it needs
  Megatron's transformer modules).
"""

from regla_megatron.context_parallel.communication import all_gather_cp, cp_key_max
from regla_megatron.context_parallel.layout import (
    CP_LAYOUTS,
    check_cp_layout,
    cp_num_segments,
    cp_segment_indices,
    cp_token_positions,
    get_batch_cp_slice,
    get_thd_cp_slice,
    megatron_cp_batch,
    thd_cp_indices,
)
from regla_megatron.context_parallel.regla import context_parallel_regla

__all__ = [
    "CP_LAYOUTS",
    "all_gather_cp",
    "check_cp_layout",
    "context_parallel_regla",
    "cp_key_max",
    "cp_num_segments",
    "cp_segment_indices",
    "cp_token_positions",
    "get_batch_cp_slice",
    "get_thd_cp_slice",
    "megatron_cp_batch",
    "thd_cp_indices",
]
