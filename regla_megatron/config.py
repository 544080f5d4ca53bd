"""`ReGLAConfig`: Megatron's `TransformerConfig` plus the ReGLA layer options (REGLA_SPEC 1).

Validated once, at construction; every later consumer may trust the fields. The layer
pattern is interpreted in exactly one place, `layer_is_regla`.
"""

from dataclasses import dataclass
from typing import Optional

from megatron.core.transformer.transformer_config import TransformerConfig

from regla_kernels.limits import CONFIG_BACKENDS, TRITON_MAX_HEAD_DIM, TRITON_MIN_HEAD_DIM, triton_head_dim_supported
from regla_megatron.context_parallel.layout import CP_LAYOUTS
from regla_megatron.norms import NORM_TYPES
from regla_megatron.pattern import REGLA_SYMBOL, validate_regla_pattern

# Head-dim bounds for every backend; the Triton kernels take the narrower set in
# regla_kernels.limits, and 'auto' runs the other head dims on the PyTorch path.
MAX_HEAD_DIM = 256
HEAD_DIM_K_MULTIPLE = 16


@dataclass
class ReGLAConfig(TransformerConfig):
    """TransformerConfig with the ReGLA options (all `regla_`-prefixed).

    Defaults follow REGLA_SPEC's (decision) items: full-rank gates with bias 0, per-head
    RMSNorm on the output, no output gate, every layer ReGLA.
    """

    regla_num_heads: Optional[int] = None
    """ReGLA heads; None means num_attention_heads."""

    regla_head_dim_k: Optional[int] = None
    """Key/query/gate dim per head (dk); None means kv_channels (hidden_size / heads)."""

    regla_head_dim_v: Optional[int] = None
    """Value dim per head (dv); None means kv_channels."""

    regla_norm: str = "rmsnorm"
    """Per-head output norm over dv: 'rmsnorm' or 'layernorm'."""

    regla_norm_eps: float = 1e-5
    """Epsilon of the per-head output norm."""

    regla_gate_rank: int = 0
    """0: full-rank gate/refine projections. r > 0: x -> r (shared by gate and refine)
    -> dk per head, as GLA's low-rank gate; the biases are added after the up-projection."""

    regla_gate_bias_init: float = 0.0
    """Initial value of the gate and refine biases b_g, b_r."""

    regla_output_gate: bool = False
    """Multiply the normed output by swish(W_og x) per head before the output projection."""

    regla_pattern: Optional[str] = None
    """One symbol per layer (`regla_megatron.pattern`): 'R' ReGLA, '*' softmax attention; None
    means all ReGLA."""

    regla_backend: str = "auto"
    """Kernel backend handed to `regla_kernels.chunk_regla`: 'auto', 'triton' or 'torch'."""

    regla_cp_layout: str = "zigzag"
    """Sequence layout under context parallelism: 'zigzag' (Megatron's load-balanced
    2*CP-chunk layout) or 'contiguous'."""

    regla_cp_overlap_forward: bool = False
    """Triton path under CP, zigzag: the forward's state all-gather one segment at a time, each
    overlapped with the other segment's compute. Off by default: on one H200 it cost more (half
    the state pass's parallelism per launch) than an NVLink all-gather of the few MB takes;
    worth trying over slow links. The backward's all-gather overlaps compute either way."""

    regla_low_memory: bool = False
    """Triton path without CP: the kernels' backward over time windows, the forward keeping neither
    the fp32 gate tensor nor the chunk-start states for it (`chunk_regla(..., low_memory=True)`):
    1.08 GB fewer saved activations per layer and a backward peak under 2 GB instead of 2.3 at
    64K tokens, 16 heads of 128, bf16, for about 1.2 ms of the kernels' 5.4
    (benchmarks/results/kernels.md). Packed sequences (THD) too."""

    regla_low_memory_keep_gates: bool = False
    """With regla_low_memory: the forward keeps the gate tensor and the chunk-start states as
    without it (each in a gradient's buffer, `chunk_regla(..., low_memory="backward")`): a backward
    peak under 2 GB for about 1.1 ms less per layer than regla_low_memory alone, and 0.1 ms more
    than without low memory, at 64K tokens, 16 heads of 128, bf16; not the 1.08 GB fewer saved
    activations."""

    def __post_init__(self):
        super().__post_init__()
        if self.regla_num_heads is None:
            self.regla_num_heads = self.num_attention_heads
        if self.regla_head_dim_k is None:
            self.regla_head_dim_k = self.kv_channels
        if self.regla_head_dim_v is None:
            self.regla_head_dim_v = self.kv_channels
        self._validate_regla()
        if self.regla_pattern is not None and len(set(self.regla_pattern)) > 1:
            # Layers of two types have different parameter names, so each layer must be
            # saved under its own key (like Megatron's linear_attention_freq hybrids).
            self.hetereogenous_dist_checkpoint = True  # sic: Megatron's spelling

    def _validate_regla(self) -> None:
        if self.regla_num_heads <= 0:
            raise ValueError(f"ReGLAConfig: regla_num_heads must be positive, got {self.regla_num_heads}")
        tp = self.tensor_model_parallel_size
        if self.regla_num_heads % tp != 0:
            raise ValueError(
                f"ReGLAConfig: regla_num_heads ({self.regla_num_heads}) must be divisible by "
                f"tensor_model_parallel_size ({tp}) so that each TP rank holds whole heads; "
                f"change regla_num_heads (or num_attention_heads) or the TP size"
            )
        for name in ("regla_head_dim_k", "regla_head_dim_v"):
            dim = getattr(self, name)
            if dim <= 0 or dim > MAX_HEAD_DIM:
                raise ValueError(
                    f"ReGLAConfig: {name} = {dim} is outside the kernels' limits (1..{MAX_HEAD_DIM}); "
                    f"use more, smaller heads or set {name} explicitly"
                )
        if self.regla_head_dim_k % HEAD_DIM_K_MULTIPLE != 0:
            raise ValueError(
                f"ReGLAConfig: regla_head_dim_k = {self.regla_head_dim_k} must be a multiple of "
                f"{HEAD_DIM_K_MULTIPLE} (the kernels' tile size); set regla_head_dim_k explicitly"
            )
        if self.regla_norm not in NORM_TYPES:
            raise ValueError(f"ReGLAConfig: unknown regla_norm {self.regla_norm!r}; choose one of {NORM_TYPES}")
        if self.regla_norm_eps <= 0:
            raise ValueError(f"ReGLAConfig: regla_norm_eps must be positive, got {self.regla_norm_eps}")
        if self.regla_gate_rank < 0:
            raise ValueError(
                f"ReGLAConfig: regla_gate_rank must be 0 (full rank) or a positive rank, got {self.regla_gate_rank}"
            )
        if self.regla_backend not in CONFIG_BACKENDS:
            raise ValueError(
                f"ReGLAConfig: unknown regla_backend {self.regla_backend!r}; choose one of {CONFIG_BACKENDS}"
            )
        if self.regla_backend == "triton":
            for name in ("regla_head_dim_k", "regla_head_dim_v"):
                dim = getattr(self, name)
                if not triton_head_dim_supported(dim):
                    raise ValueError(
                        f"ReGLAConfig: regla_backend='triton' needs head dims that are powers of two in "
                        f"[{TRITON_MIN_HEAD_DIM}, {TRITON_MAX_HEAD_DIM}], got {name} = {dim}; change the head "
                        f"dim or use regla_backend='auto' (Triton where it can, torch elsewhere)"
                    )
        if self.regla_low_memory_keep_gates and not self.regla_low_memory:
            raise ValueError(
                "ReGLAConfig: regla_low_memory_keep_gates only changes regla_low_memory, which is off; "
                "turn regla_low_memory on too, or drop regla_low_memory_keep_gates"
            )
        if self.regla_low_memory and self.context_parallel_size > 1:
            raise ValueError(
                f"ReGLAConfig: regla_low_memory is not implemented with context parallelism "
                f"(context_parallel_size = {self.context_parallel_size}); turn it off, or use CP = 1"
            )
        if self.regla_cp_layout not in CP_LAYOUTS:
            raise ValueError(
                f"ReGLAConfig: unknown regla_cp_layout {self.regla_cp_layout!r}; choose one of {CP_LAYOUTS}"
            )
        if self.regla_pattern is not None:
            validate_regla_pattern(
                self.regla_pattern, self.num_layers, subject="ReGLAConfig: regla_pattern", num_layers_name="num_layers"
            )


def layer_is_regla(config: TransformerConfig, layer_number: int) -> bool:
    """Whether global layer `layer_number` (1-based, as Megatron counts) is a ReGLA layer.

    The one place that reads `regla_pattern`. A config without the field (a plain
    TransformerConfig) or with pattern None means every layer is ReGLA.
    """
    if not 1 <= layer_number <= config.num_layers:
        raise ValueError(f"layer_is_regla: layer_number {layer_number} is outside 1..{config.num_layers}")
    pattern = getattr(config, "regla_pattern", None)
    if pattern is None:
        return True
    return pattern[layer_number - 1] == REGLA_SYMBOL
