"""Softmax core attention through `torch.nn.functional.scaled_dot_product_attention`.

`SDPADotProductAttention` takes the place of Megatron's local `DotProductAttention` in the
softmax layers of a hybrid when TransformerEngine is absent. Megatron's local attention
materializes the `[b, heads, s, s]` scores (a hybrid at 8K tokens ran out of a 140 GB card);
SDPA picks FlashAttention or cuDNN's fused kernel on the GPU and never stores the scores, and
runs its math path on the CPU. Same parameters, scale, dropout and layout as
`DotProductAttention`, so checkpoints and specs interchange.

What SDPA cannot express is refused at construction or at the first call, with the
alternative named: packed sequences (THD), attention bias, sliding windows, a learnable
softmax offset; context parallelism has its own attention
(`regla_megatron.context_parallel.attention`).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPADotProductAttention(DotProductAttention):
    """Megatron's core-attention interface over SDPA (flash attention on the GPU).

    forward(query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
    packed_seq_params=None):
        query: [s, b, heads_per_partition, head_dim]; key, value: [s, b, groups_per_partition,
        head_dim] (grouped-query attention: groups divide heads); bf16, fp16 or fp32.
        attention_mask: ignored for the causal mask type (as TransformerEngine does); for
        the padding/arbitrary types a boolean `[b or 1, 1, s, s]` mask, True where masked.
    Returns: [s, b, heads_per_partition * head_dim], query's dtype.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, *args, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, attention_type, *args, **kwargs)
        if getattr(config, "window_size", None) is not None:
            raise ValueError(
                "SDPADotProductAttention: sliding-window attention (window_size) is not expressible in "
                "torch SDPA without materializing the mask; use TransformerEngine's attention (--transformer-impl "
                "transformer_engine) or window_size=None"
            )
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(
                f"SDPADotProductAttention: softmax_type={config.softmax_type!r} (a softmax offset) is not supported "
                "by torch SDPA; use softmax_type='vanilla' or TransformerEngine's attention"
            )
        # DotProductAttention divides its scale by the layer number under query-key layer
        # scaling and multiplies the scores back in fp32; SDPA computes in fp32 inside.
        self.sdpa_scale = self.softmax_scale * (self.layer_number if config.apply_query_key_layer_scaling else 1)

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
        if packed_seq_params is not None:
            raise NotImplementedError(
                "SDPADotProductAttention: packed sequences (THD) are not supported by torch SDPA; use "
                "TransformerEngine's attention for packed softmax layers"
            )
        if attention_bias is not None:
            raise NotImplementedError("SDPADotProductAttention: attention_bias is not supported; use TransformerEngine")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        sdpa_mask = None
        if not causal and attention_mask is not None:
            sdpa_mask = ~attention_mask.to(torch.bool)  # Megatron: True = masked; SDPA: True = attend
        s, b, heads, head_dim = query.shape
        groups = key.shape[2]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        if groups != heads:
            k = k.repeat_interleave(heads // groups, dim=1)
            v = v.repeat_interleave(heads // groups, dim=1)
        dropout = self.config.attention_dropout if self.training else 0.0
        if dropout > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=sdpa_mask, dropout_p=dropout, is_causal=causal, scale=self.sdpa_scale
                )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=sdpa_mask, dropout_p=dropout, is_causal=causal, scale=self.sdpa_scale
            )
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * head_dim)
