"""Softmax attention for the softmax layers of a hybrid, with context parallelism and
without TransformerEngine (Megatron's local `DotProductAttention` refuses CP).

Keys and values are all-gathered over the CP group (one differentiable all-gather of
K and V together; backward a reduce-scatter), and the causal mask compares the global
positions of this rank's queries with those of every gathered key, so it is right for
the zigzag and the contiguous layouts alike. The attention itself is torch's
`scaled_dot_product_attention` (any device, CPU included).

Communication per layer: forward an all-gather of s * b * ng * (hn_k + hn_v) values
(s the full sequence length, ng the local query groups); backward the reduce-scatter of
their gradients. Memory holds the full-length K/V and a [b, np, s/CP, s] score matrix
(math backend on CPU): fine for tests and the CPU demo, not for long contexts on GPU.
"""

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from regla_megatron.context_parallel.communication import all_gather_cp
from regla_megatron.context_parallel.layout import check_cp_layout, cp_token_positions


class ContextParallelDotProductAttention(MegatronModule):
    """Drop-in `core_attention` for `SelfAttentionSubmodules` (same constructor and forward
    as Megatron's `DotProductAttention`), correct under context parallelism.

    q: [sq, b, np, hn], k/v: [sk, b, ng, hn] (this rank's tokens; np/ng heads and query
    groups on this TP rank) -> [sq, b, np * hn]. `attention_mask`, when given, is
    Megatron's boolean mask (True = masked), [b or 1, 1, sq, s_full] with the key axis
    in natural sequence order (what `get_batch_on_this_cp_rank` leaves of a full mask);
    it replaces the causal mask (both apply for `padding_causal`). Rows masked entirely
    give NaN (SDPA), where Megatron's softmax gives a uniform row.
    The CP layout is `layout`, else `config.regla_cp_layout`, else "zigzag".
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        layout: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(config=config)
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise NotImplementedError(
                f"ContextParallelDotProductAttention: softmax_type {config.softmax_type!r} is not supported"
            )
        if getattr(config, "window_size", None) is not None:
            raise NotImplementedError("ContextParallelDotProductAttention: sliding-window attention is not supported")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.layout = layout or getattr(config, "regla_cp_layout", None) or "zigzag"
        check_cp_layout(self.layout)

        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if cp_group is None:
            cp_group = parallel_state.get_context_parallel_group(check_initialized=False)
        self.cp_group = cp_group
        self.cp_size = 1 if cp_group is None else torch.distributed.get_world_size(cp_group)
        if self.cp_size != config.context_parallel_size:
            raise ValueError(
                f"ContextParallelDotProductAttention: context_parallel_size={config.context_parallel_size} "
                f"but the CP process group has {self.cp_size} ranks"
            )
        # apply_query_key_layer_scaling divides and re-multiplies by layer_number in
        # Megatron; the product is softmax_scale, which is all SDPA needs.
        self.softmax_scale = config.kv_channels**-0.5 if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def _key_positions(self, local_keys: int, device) -> torch.Tensor:
        ranks = range(self.cp_size)
        return torch.cat([cp_token_positions(self.layout, r, self.cp_size, local_keys, device) for r in ranks])

    def _allowed(self, sq: int, sk_local: int, mask_type, attention_mask, device) -> Optional[torch.Tensor]:
        """SDPA's boolean mask (True = attend), [sq, sk] or [b|1, 1, sq, sk]; None = all."""
        if self.cp_size > 1:
            rank = torch.distributed.get_rank(self.cp_group)
            q_pos = cp_token_positions(self.layout, rank, self.cp_size, sq, device)
            k_pos = self._key_positions(sk_local, device)
        else:
            q_pos, k_pos = torch.arange(sq, device=device), torch.arange(sk_local, device=device)
        # As Megatron's unfused softmax: a given mask replaces the default causal one;
        # padding_causal applies both.
        allowed = None
        if mask_type == AttnMaskType.padding_causal or (mask_type == AttnMaskType.causal and attention_mask is None):
            if sq != sk_local:
                raise ValueError(
                    f"ContextParallelDotProductAttention: a causal mask needs as many queries as keys per rank, "
                    f"got {sq} and {sk_local} (decoding with a KV cache is not supported)"
                )
            allowed = k_pos[None, :] <= q_pos[:, None]
        if attention_mask is not None:
            if attention_mask.shape[-2:] != (sq, k_pos.numel()):
                raise ValueError(
                    f"ContextParallelDotProductAttention: attention_mask must be [b, 1, {sq}, {k_pos.numel()}] "
                    f"(local queries x full sequence), got {tuple(attention_mask.shape)}"
                )
            keep = ~attention_mask.to(torch.bool).index_select(-1, k_pos)
            allowed = keep if allowed is None else keep & allowed
        return allowed

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> context [sq, b, np * hn]."""
        if packed_seq_params is not None:
            raise NotImplementedError("ContextParallelDotProductAttention: packed sequences are not supported")
        if attention_bias is not None:
            raise NotImplementedError("ContextParallelDotProductAttention: attention_bias is not supported")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if isinstance(mask_type, torch.Tensor):
            mask_type = AttnMaskType(int(mask_type.item()))
        sq, batch, heads = query.shape[:3]
        # Built first so that a bad mask fails on every rank before the collective.
        allowed = self._allowed(sq, key.shape[0], mask_type, attention_mask, query.device)
        if self.cp_size > 1:
            kv = all_gather_cp(torch.cat([key, value], dim=-1), self.cp_group)
            key, value = kv.split([key.shape[-1], value.shape[-1]], dim=-1)
        if heads != key.shape[2]:
            key = key.repeat_interleave(heads // key.shape[2], dim=2)
            value = value.repeat_interleave(heads // value.shape[2], dim=2)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, hn]
        dropout = self.dropout_p if self.training else 0.0
        # Megatron draws attention dropout from the tracker's stream unless SP is on.
        use_tracker = dropout > 0.0 and not self.config.sequence_parallel
        with tensor_parallel.get_cuda_rng_tracker().fork() if use_tracker else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, dropout_p=dropout, scale=self.softmax_scale
            )
        return out.permute(2, 0, 1, 3).reshape(sq, batch, heads * value.shape[-1])


__all__ = ["ContextParallelDotProductAttention"]
