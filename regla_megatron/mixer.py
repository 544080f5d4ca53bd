"""`ReGLAMixer`: the ReGLA token mixer for a Megatron `TransformerLayer`'s self_attention slot.

Data flow (REGLA_SPEC 1), shapes per TP rank with Hl = heads / TP:
  x [s, b, h] -> in_proj (column-parallel, one GEMM) -> [s, b, Hl * W]
  -> per head q, k [dk], v [dv], z, u [dk] (+ output gate [dv]) as [b, s, Hl, d] views
  -> chunk_regla with the gate biases b_g, b_r (or CP state passing) -> o [b, s, Hl, dv]
  -> per-head norm -> (* swish(output gate)) -> out_proj (row-parallel) -> [s, b, h]

Fused projection layout: HEAD-MAJOR. Output row block i holds head i's
[q (dk) | k (dk) | v (dv) | z (dk) | u (dk) | output gate (dv, optional)], so a plain
column split over TP (and a plain axis-0 checkpoint shard) keeps whole heads per rank.
With `regla_gate_rank = r > 0`, z and u leave the fused GEMM: x -> W_down [r, h]
(replicated) -> gate_up (column-parallel, head-major [z (dk) | u (dk)] per head).

Biases: the projections carry none; q, k, v have no bias by the spec, and the gate and
refine biases live in one separate parameter `gate_bias` [Hl, 2 * dk] (per head
[b_g | b_r], TP-split on axis 0, initialised to `regla_gate_bias_init`). That keeps the
fused GEMM bias-free (no trained zeros for q/k/v) and the bias independent of the gate rank.

Positional information comes from the decay alone: rotary embeddings are ignored, and
the layer is causal by construction (attention_mask is not read).
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from regla_kernels import chunk_regla, default_scale, split_features
from regla_megatron.config import ReGLAConfig
from regla_megatron.context_parallel import context_parallel_regla, cp_num_segments
from regla_megatron.norms import param_device

INFERENCE_UNSUPPORTED = "ReGLA decoding through Megatron inference is not supported yet"


@dataclass
class ReGLAMixerSubmodules:
    """The swappable pieces: column-parallel input linear, per-head norm, row-parallel output linear."""

    in_proj: Union[ModuleSpec, type] = IdentityOp
    out_norm: Union[ModuleSpec, type] = IdentityOp
    out_proj: Union[ModuleSpec, type] = IdentityOp


def _process_groups(pg_collection: Optional[ProcessGroupCollection]):
    """(tp_group, cp_group) from the collection when given (0.16+), else from parallel_state."""
    tp = getattr(pg_collection, "tp", None)
    cp = getattr(pg_collection, "cp", None)
    if tp is None:
        tp = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
    if cp is None:
        cp = parallel_state.get_context_parallel_group(check_initialized=False)
    return tp, cp


def _batch_major_pieces(projected: torch.Tensor, heads: int, sizes: List[int]) -> List[torch.Tensor]:
    """[s, b, heads * sum(sizes)] -> per-head pieces [b, s, heads, size], all views (the Triton
    kernels read them with their strides). Split first, then transpose each piece: the
    backward then writes the pieces' gradients straight into the [s, b] layout the projection's
    backward wants (transposing the whole first would leave it a transposed gradient, copied
    again inside the linear layer), by row copies (`split_features`: the kernels' dq, dk, dz and
    du are strided views, which torch.cat copies element by element)."""
    seq, batch = projected.shape[:2]
    per_head = projected.view(seq, batch, heads, -1)
    return [piece.transpose(0, 1) for piece in split_features(per_head, sizes)]


class ReGLAMixer(MegatronModule):
    """ReGLA layer: `forward(hidden_states [s, b, h]) -> (output [s, b, h], out_proj bias or None)`.

    Args:
        config: a `ReGLAConfig`; a plain TransformerConfig is converted, the ReGLA options
            then coming from `REGLA_*` environment variables
            (`regla_megatron.megatron_lm.arguments.regla_config_from`).
        submodules: `ReGLAMixerSubmodules`.
        layer_number: global, 1-based (kept for Megatron's bookkeeping).
        pg_collection: process groups (tp, cp); None means parallel_state's.
        cp_comm_type: accepted for signature compatibility with attention; unused.
        **kwargs: later Megatron versions pass more (name=, pp_layer_offset=); ignored.
    """

    def __init__(
        self,
        config,
        submodules: ReGLAMixerSubmodules,
        layer_number: int,
        pg_collection: Optional[ProcessGroupCollection] = None,
        cp_comm_type: Optional[str] = None,
        **kwargs,
    ):
        if not isinstance(config, ReGLAConfig):
            # Zero-patch --spec form: Megatron built a plain TransformerConfig.
            from regla_megatron.megatron_lm.arguments import regla_config_from

            config = regla_config_from(config)
        super().__init__(config)
        self.layer_number = layer_number
        self.tp_group, self.cp_group = _process_groups(pg_collection)
        tp_size = self.tp_group.size() if self.tp_group is not None else 1
        self.cp_size = config.context_parallel_size

        self.num_local_heads = config.regla_num_heads // tp_size
        self.dk, self.dv = config.regla_head_dim_k, config.regla_head_dim_v
        self.gate_rank = config.regla_gate_rank
        self.output_gate = config.regla_output_gate
        self.scale = default_scale(self.dk)
        self.split_sizes = [self.dk, self.dk, self.dv]
        if self.gate_rank == 0:
            self.split_sizes += [self.dk, self.dk]
        if self.output_gate:
            self.split_sizes.append(self.dv)
        heads = config.regla_num_heads
        linear_kwargs = dict(config=config, gather_output=False, bias=False, skip_bias_add=False, is_expert=False)

        self.in_proj = build_module(
            submodules.in_proj,
            config.hidden_size,
            heads * sum(self.split_sizes),
            init_method=config.init_method,
            tp_comm_buffer_name="fc1",
            tp_group=self.tp_group,
            **linear_kwargs,
        )
        factory = dict(device=param_device(config), dtype=config.params_dtype)
        if self.gate_rank > 0:
            # Replicated, and it sees the sequence-sharded input under SP: its gradient
            # is partial per TP rank and finalize_model_grads sums it (sequence_parallel).
            self.gate_down_weight = torch.nn.Parameter(torch.empty(self.gate_rank, config.hidden_size, **factory))
            self.gate_down_weight.sequence_parallel = config.sequence_parallel
            if config.perform_initialization:
                config.init_method(self.gate_down_weight)
            self.gate_up = build_module(
                submodules.in_proj,
                self.gate_rank,
                heads * 2 * self.dk,
                init_method=config.init_method,
                tp_comm_buffer_name="fc1",
                tp_group=self.tp_group,
                **linear_kwargs,
            )
        self.gate_bias = torch.nn.Parameter(
            torch.full((self.num_local_heads, 2 * self.dk), float(config.regla_gate_bias_init), **factory)
        )
        set_tensor_model_parallel_attributes(self.gate_bias, True, 0, 1)

        self.out_norm = build_module(
            submodules.out_norm,
            config=config,
            num_local_heads=self.num_local_heads,
            head_dim=self.dv,
            norm_type=config.regla_norm,
            eps=config.regla_norm_eps,
            tp_group=self.tp_group,
        )
        self.out_proj = build_module(
            submodules.out_proj,
            heads * self.dv,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="proj",
            tp_group=self.tp_group,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        inference_context=None,
        rotary_pos_emb=None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        attention_bias=None,
        packed_seq_params=None,
        sequence_len_offset=None,
        *,
        inference_params=None,
        **kwargs,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """hidden_states [s, b, h] (s/TP under SP, CP-local under CP), params dtype.

        Returns (output [s, b, h] in the same layout, out_proj bias or None).
        """
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError(INFERENCE_UNSUPPORTED)
        projected, _ = self.in_proj(hidden_states)
        seq, batch = projected.shape[:2]
        pieces = _batch_major_pieces(projected, self.num_local_heads, self.split_sizes)
        q, k, v = pieces[:3]
        if self.gate_rank > 0:
            gates, _ = self.gate_up(F.linear(hidden_states, self.gate_down_weight))
            z, u = _batch_major_pieces(gates, self.num_local_heads, [self.dk, self.dk])
        else:
            z, u = pieces[3:5]
        out = self.out_norm(self._mix(q, k, v, z, u, packed_seq_params))  # [b, s, Hl, dv]
        if self.output_gate:
            gate = pieces[-1]
            out = out * F.silu(gate.to(torch.promote_types(gate.dtype, torch.float32))).to(out.dtype)
        out = out.reshape(batch, seq, -1).transpose(0, 1).contiguous()
        return self.out_proj(out)

    def _mix(self, q, k, v, z, u, packed_seq_params) -> torch.Tensor:
        """The recurrence on [b, s, Hl, d] views, the gate biases added to z and u (by the
        kernels where they can: no biased copy of the logits is made or saved); returns
        o [b, s, Hl, dv]."""
        backend = self.config.regla_backend
        if self.cp_size > 1:
            z = z + self.gate_bias[:, : self.dk]
            u = u + self.gate_bias[:, self.dk :]
            return context_parallel_regla(
                q, k, v, z, u,
                scale=self.scale, cp_group=self.cp_group, layout=self.config.regla_cp_layout, backend=backend,
                cu_seqlens=self._local_cu_seqlens(packed_seq_params, q.shape[0], q.shape[1]),
                overlap_forward=self.config.regla_cp_overlap_forward,
            )
        cu_seqlens = _packed_cu_seqlens(packed_seq_params, q.shape[0])
        low_memory = self.config.regla_low_memory
        if low_memory and self.config.regla_low_memory_keep_gates:
            low_memory = "backward"
        out, _ = chunk_regla(
            q, k, v, z, u, scale=self.scale, cu_seqlens=cu_seqlens, backend=backend, low_memory=low_memory,
            gate_bias=self.gate_bias,
        )
        return out

    def _local_cu_seqlens(self, packed_seq_params, batch: int, local_length: int) -> Optional[torch.Tensor]:
        """This CP rank's offsets of the packed sequences: Megatron's (global, padded) / CP, as
        TransformerEngine's THD partitioning lays each sequence's chunks out (None: not packed)."""
        cu_seqlens = _packed_cu_seqlens(packed_seq_params, batch)
        if cu_seqlens is None:
            return None
        segments = cp_num_segments(self.config.regla_cp_layout, self.cp_size)
        if int(cu_seqlens[-1]) != local_length * self.cp_size or bool((cu_seqlens % segments).any()):
            raise ValueError(
                f"ReGLAMixer: packed sequences under context parallelism need every sequence length divisible by "
                f"{segments} ({self.config.regla_cp_layout} layout, CP={self.cp_size}; Megatron pads them into "
                f"cu_seqlens_q_padded) and {local_length * self.cp_size} tokens in all; got offsets {cu_seqlens.tolist()}"
            )
        return cu_seqlens // self.cp_size

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata: Optional[dict] = None):
        """As MegatronModule's, except that `gate_bias` is TP-split on axis 0 (global [H, 2 dk]).

        The linears shard themselves (head-major rows: a plain axis-0 split) and the
        per-head norm shards its own weights.
        """
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        sharded = make_sharded_tensors_for_checkpoint(
            own,
            prefix,
            {"gate_bias": 0},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )
        for name, module in self.named_children():
            child_prefix = f"{prefix}{name}."
            sharded.update(
                sharded_state_dict_default(module, child_prefix, sharded_offsets, metadata, tp_group=self.tp_group)
            )
        return sharded


def _packed_cu_seqlens(packed_seq_params, batch: int) -> Optional[torch.Tensor]:
    """chunk_regla's cu_seqlens from Megatron's PackedSeqParams (THD layout, batch 1)."""
    if packed_seq_params is None:
        return None
    if batch != 1:
        raise ValueError(
            f"ReGLAMixer: packed sequences (packed_seq_params) need micro-batch size 1 with all "
            f"sequences concatenated along the sequence dim, got batch {batch}"
        )
    # The padded offsets, when present, are where the sequences actually sit in memory.
    cu_seqlens = getattr(packed_seq_params, "cu_seqlens_q_padded", None)
    if cu_seqlens is None:
        cu_seqlens = packed_seq_params.cu_seqlens_q
    if cu_seqlens is None:
        raise ValueError("ReGLAMixer: packed_seq_params has no cu_seqlens_q")
    return cu_seqlens

