"""Per-rank checks of the context-parallel softmax attention (`ContextParallelDotProductAttention`)
on CPU/gloo against one process on the full sequence; `runs.cp_results` runs them. Not a test file.
"""

import copy
import functools

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from regla_megatron.context_parallel import get_batch_cp_slice
from regla_megatron.context_parallel.attention import ContextParallelDotProductAttention
from tests.support.distributed import rel_error


def attention_cp_check(rank, cp_size, layout, with_mask=False, heads=4, groups=2, head_dim=8, batch=2, length=64):
    """Rel errors (output, q, k, v gradients) of ContextParallelDotProductAttention vs full causal
    SDPA (GQA; fp32 q [length, batch, heads, head_dim], k/v [length, batch, groups, head_dim]).
    With `with_mask`, a Megatron mask (True = masked: causal plus padded keys in sample 1) is
    given, cut along the query axis as `get_batch_on_this_cp_rank` cuts it."""
    gen = torch.Generator().manual_seed(5)
    query = torch.randn(length, batch, heads, head_dim, generator=gen)
    key, value = (torch.randn(length, batch, groups, head_dim, generator=gen) for _ in range(2))
    weight = torch.randn(length, batch, heads * head_dim, generator=gen)

    full = [x.clone().requires_grad_(True) for x in (query, key, value)]
    to_bhsd = lambda x: x.repeat_interleave(heads // x.shape[2], dim=2).permute(1, 2, 0, 3)
    masked = torch.ones(length, length, dtype=torch.bool).triu(1).repeat(batch, 1, 1, 1)  # [b, 1, s, s]
    masked[1, :, :, -5:] = True
    masked[1, :, -5:, :] = False  # padded queries still see something: no all-masked row
    if not with_mask:
        masked = torch.ones(length, length, dtype=torch.bool).triu(1)
    ref = torch.nn.functional.scaled_dot_product_attention(*(to_bhsd(x) for x in full), attn_mask=~masked)
    ref = ref.permute(2, 0, 1, 3).reshape(length, batch, heads * head_dim)
    (ref * weight).sum().backward()

    config = TransformerConfig(
        num_layers=1,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        context_parallel_size=cp_size,
        attention_dropout=0.0,
    )
    module = ContextParallelDotProductAttention(config, 1, AttnMaskType.causal, "self", layout=layout)
    cut = functools.partial(get_batch_cp_slice, cp_rank=rank, cp_size=cp_size, layout=layout, seq_dim=0)
    local = [cut(x).requires_grad_(True) for x in (query, key, value)]
    out = module(*local, cut(masked, seq_dim=2) if with_mask else None)
    (out * cut(weight)).sum().backward()
    errors = {"output": rel_error(out, cut(ref))}
    errors.update({name: rel_error(x.grad, cut(r.grad)) for name, x, r in zip(("q", "k", "v"), local, full)})
    return errors


def self_attention_cp_check(rank, cp_size, heads=4, groups=2, head_dim=8, batch=2, length=64):
    """Megatron's SelfAttention with our core_attention under CP (zigzag) vs the same weights
    with Megatron's own DotProductAttention on the full sequence (CP=1), fp32 hidden
    [length, batch, heads * head_dim]: rel errors of the output, the input gradient and the
    parameter gradients summed over the CP ranks."""

    def build(config, core_attention):
        submodules = SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear, core_attention=core_attention, linear_proj=RowParallelLinear
        )
        spec = ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal}, submodules=submodules)
        return build_module(spec, config=config, layer_number=1)

    config = TransformerConfig(
        num_layers=1,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        context_parallel_size=cp_size,
        use_cpu_initialization=True,
        attention_dropout=0.0,
        masked_softmax_fusion=False,
        add_bias_linear=False,  # linear_proj returns its bias unapplied: no gradient to compare
    )
    sharded = build(config, ContextParallelDotProductAttention)
    full_config = copy.deepcopy(config)
    full_config.context_parallel_size = 1
    reference = build(full_config, DotProductAttention)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for (name, p), (ref_name, ref_p) in zip(sharded.named_parameters(), reference.named_parameters()):
            assert name == ref_name
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            ref_p.copy_(p)
    hidden = torch.randn(length, batch, heads * head_dim, generator=gen)
    weight = torch.randn(length, batch, heads * head_dim, generator=gen)
    cut = functools.partial(get_batch_cp_slice, cp_rank=rank, cp_size=cp_size, layout="zigzag", seq_dim=0)

    full_hidden = hidden.clone().requires_grad_(True)
    ref_out, _ = reference(full_hidden, attention_mask=None)
    (ref_out * weight).sum().backward()
    local_hidden = cut(hidden).requires_grad_(True)
    out, _ = sharded(local_hidden, attention_mask=None)
    (out * cut(weight)).sum().backward()

    errors = {"output": rel_error(out, cut(ref_out)), "hidden": rel_error(local_hidden.grad, cut(full_hidden.grad))}
    for (name, p), (_, ref_p) in zip(sharded.named_parameters(), reference.named_parameters()):
        grad = p.grad.clone()
        torch.distributed.all_reduce(grad)
        errors[name] = rel_error(grad, ref_p.grad)
    return errors


__all__ = ["attention_cp_check", "self_attention_cp_check"]
