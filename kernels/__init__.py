"""regla_kernels: ReGLA token-mixing kernels (Triton) and their PyTorch references.

Tensors in, tensors out; knows nothing about Megatron.
"""

from .chunk import BACKENDS, chunk_regla, register_backend
from .chunk_torch import chunk_regla_torch
from .gating import default_scale, key_feature_map, query_feature_map, refined_log_gate, sequence_key_max
from .naive import naive_recurrent_regla

__all__ = [
    "BACKENDS",
    "chunk_regla",
    "chunk_regla_torch",
    "default_scale",
    "key_feature_map",
    "naive_recurrent_regla",
    "query_feature_map",
    "refined_log_gate",
    "register_backend",
    "sequence_key_max",
]
