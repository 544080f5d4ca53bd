"""`SDPADotProductAttention` computes what Megatron's `DotProductAttention` computes."""

import pytest
import torch

from tests.support.distributed import tiny_config


def _attention(cls, config, mask_type):
    return cls(config, layer_number=2, attn_mask_type=mask_type, attention_type="self")


@pytest.mark.parametrize("groups, layer_scaling", [(4, False), (2, False), (4, True)])
def test_sdpa_attention_matches_megatron_dot_product_attention(megatron_single_process, groups, layer_scaling):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from regla_megatron.attention import SDPADotProductAttention

    config = tiny_config(num_query_groups=groups, apply_query_key_layer_scaling=layer_scaling, attention_dropout=0.0)
    s, b, heads, d = 11, 3, config.num_attention_heads, config.kv_channels
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    q = torch.randn(s, b, heads, d, generator=gen, requires_grad=True)
    k = torch.randn(s, b, groups, d, generator=gen, requires_grad=True)
    v = torch.randn(s, b, groups, d, generator=gen, requires_grad=True)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    results = []
    for cls in (DotProductAttention, SDPADotProductAttention):
        module = _attention(cls, config, AttnMaskType.causal)
        out = module(q, k, v, causal)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        results.append((out, *grads))
    for ref, got in zip(*results):
        # fp32 on both sides, different summation orders: rounding only.
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_sdpa_attention_refuses_what_sdpa_cannot_do(megatron_single_process):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from regla_megatron.attention import SDPADotProductAttention

    with pytest.raises(ValueError, match="sliding-window"):
        _attention(SDPADotProductAttention, tiny_config(window_size=(4, 0)), AttnMaskType.causal)
    module = _attention(SDPADotProductAttention, tiny_config(), AttnMaskType.causal)
    x = torch.randn(4, 1, 4, 16)
    with pytest.raises(NotImplementedError, match="packed sequences"):
        module(x, x, x, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))
