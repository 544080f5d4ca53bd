"""regla_kernels: ReGLA token-mixing kernels (Triton) and their PyTorch references.

Tensors in, tensors out; knows nothing about Megatron.
"""

from regla_kernels.api import BACKENDS, chunk_regla, register_backend, resolve_backend
from regla_kernels.decode import regla_step
from regla_kernels.exchange import LocalSegmentExchange, SegmentExchange
from regla_kernels.gating import default_scale, key_feature_map, query_feature_map, refined_log_gate, sequence_key_max
from regla_kernels.reference.chunk_torch import chunk_regla_torch
from regla_kernels.reference.naive import naive_recurrent_regla
from regla_kernels.rows import copy_rows, split_features
from regla_kernels.segments import chunk_regla_segments
from regla_kernels.state_passing import cp_state_grad_scan, cp_state_scan, inter_segment_output, segment_log_decay

try:  # the Triton backend, only where Triton imports
    from regla_kernels.triton.backend import chunk_regla_triton, triton_supports
except ImportError:  # pragma: no cover - CPU-only installs without triton
    chunk_regla_triton = None
else:
    register_backend("triton", chunk_regla_triton, auto=True, supports=triton_supports)

__all__ = [
    "BACKENDS",
    "LocalSegmentExchange",
    "SegmentExchange",
    "chunk_regla",
    "chunk_regla_segments",
    "chunk_regla_torch",
    "copy_rows",
    "cp_state_grad_scan",
    "cp_state_scan",
    "default_scale",
    "inter_segment_output",
    "key_feature_map",
    "naive_recurrent_regla",
    "query_feature_map",
    "refined_log_gate",
    "regla_step",
    "register_backend",
    "resolve_backend",
    "segment_log_decay",
    "sequence_key_max",
    "split_features",
]
