"""Context parallelism on CPU/gloo against one process on the full sequence: the sharded
ReGLA layer function (outputs and every input gradient), the CP softmax attention (alone
and as Megatron's SelfAttention core_attention), and ReGLAMixer under CP.

One spawn per CP size runs every check and returns relative errors (max |got - ref| /
max |ref|); the tests below only read them, so the file costs two process launches.
"""

import functools

import pytest
import torch

from distributed import init_parallel, run_distributed

RTOL = 1e-5
SHAPE = dict(batch=2, length=64, heads=2, dk=16, dv=8)
NAMES = ["q", "k", "v", "gate_logits", "refine_logits"]


def rel_error(got, ref) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# --------------------------------------------------------------------------- per-rank checks


def _regla_inputs(batch, length, heads, dk, dv, seed=0):
    gen = torch.Generator().manual_seed(seed)
    draw = lambda d, s: s * torch.randn(batch, length, heads, d, generator=gen)
    tensors = [draw(dk, 1.5), draw(dk, 1.5), draw(dv, 1.0), draw(dk, 2.0), draw(dk, 2.0)]
    initial_state = torch.randn(batch, heads, dk, dv, generator=gen)
    weight = torch.randn(batch, length, heads, dv, generator=gen)
    return tensors, initial_state, weight


def _regla_check(rank, cp_size, data_layout, claimed_layout):
    """Rel errors of context_parallel_regla on `data_layout`-sliced tokens run as `claimed_layout`."""
    from regla_kernels import chunk_regla
    from regla_megatron.context_parallel import context_parallel_regla, get_batch_cp_slice

    tensors, initial_state, weight = _regla_inputs(**SHAPE)
    full = [x.clone().requires_grad_(True) for x in tensors + [initial_state]]
    ref_out, _ = chunk_regla(*full[:5], initial_state=full[5], backend="torch")
    (ref_out * weight).sum().backward()

    cut = functools.partial(get_batch_cp_slice, cp_rank=rank, cp_size=cp_size, layout=data_layout, seq_dim=1)
    local = [cut(x).requires_grad_(True) for x in tensors] + [initial_state.clone().requires_grad_(True)]
    out = context_parallel_regla(
        *local[:5],
        scale=None,
        cp_group=torch.distributed.group.WORLD,
        layout=claimed_layout,
        backend="torch",
        initial_state=local[5],
    )
    (out * cut(weight)).sum().backward()
    state_grad = local[5].grad.clone()
    torch.distributed.all_reduce(state_grad)  # each rank holds its share (see the docstring)

    errors = {"output": rel_error(out, cut(ref_out))}
    errors.update({name: rel_error(x.grad, cut(ref.grad)) for name, x, ref in zip(NAMES, local, full)})
    errors["initial_state"] = rel_error(state_grad, full[5].grad)
    return errors


def _attention_check(rank, cp_size, layout, with_mask=False, heads=4, groups=2, head_dim=8, batch=2, length=64):
    """Rel errors of ContextParallelDotProductAttention vs full causal SDPA (GQA). With
    `with_mask`, a Megatron mask (True = masked: causal plus padded keys in sample 1) is
    given, cut along the query axis as `get_batch_on_this_cp_rank` cuts it."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from regla_megatron.context_parallel import get_batch_cp_slice
    from regla_megatron.cp_attention import ContextParallelDotProductAttention

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


def _self_attention_check(rank, cp_size, heads=4, groups=2, head_dim=8, batch=2, length=64):
    """Megatron's SelfAttention with our core_attention under CP vs the same weights with
    Megatron's own DotProductAttention on the full sequence (CP=1): output, input grad,
    and the parameter grads summed over the CP ranks."""
    import copy

    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from regla_megatron.context_parallel import get_batch_cp_slice
    from regla_megatron.cp_attention import ContextParallelDotProductAttention

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


PACKED_LENGTHS = [16, 40, 8]  # every length divisible by 2 CP for CP <= 4


def _packed_regla_check(rank, cp_size, data_layout, claimed_layout, backend="torch", dv=SHAPE["dv"]):
    """Packed sequences (B = 1, one state and key max per sequence) cut per sequence as
    `data_layout` and run as `claimed_layout`, against one process with cu_seqlens."""
    from regla_kernels import chunk_regla
    from regla_megatron.context_parallel import context_parallel_regla, get_thd_cp_slice

    total = sum(PACKED_LENGTHS)
    cu = torch.tensor([0] + PACKED_LENGTHS).cumsum(0).to(torch.int32)
    tensors, _, weight = _regla_inputs(1, total, SHAPE["heads"], SHAPE["dk"], dv, seed=4)
    states = torch.randn(len(PACKED_LENGTHS), SHAPE["heads"], SHAPE["dk"], dv, generator=torch.Generator().manual_seed(8))
    full = [x.clone().requires_grad_(True) for x in tensors + [states]]
    ref_out, _ = chunk_regla(*full[:5], initial_state=full[5], cu_seqlens=cu, backend="torch")
    (ref_out * weight).sum().backward()

    cut = functools.partial(get_thd_cp_slice, cu_seqlens=cu, cp_rank=rank, cp_size=cp_size, layout=data_layout, seq_dim=1)
    local = [cut(x).requires_grad_(True) for x in tensors] + [states.clone().requires_grad_(True)]
    out = context_parallel_regla(
        *local[:5], cp_group=torch.distributed.group.WORLD, layout=claimed_layout, backend=backend,
        initial_state=local[5], cu_seqlens=cu // cp_size,
    )
    (out * cut(weight)).sum().backward()
    state_grad = local[5].grad.clone()
    torch.distributed.all_reduce(state_grad)
    errors = {"output": rel_error(out, cut(ref_out))}
    errors.update({name: rel_error(x.grad, cut(ref.grad)) for name, x, ref in zip(NAMES, local, full)})
    errors["initial_state"] = rel_error(state_grad, full[5].grad)
    return errors


def _mixer_check(layout="zigzag", batch=2, length=64, backend="torch", head_dim_v=8, packed=False):
    """ReGLAMixer at Megatron's CP size vs the same weights at CP=1 on the full sequence
    (same TP, same kernel backend): output, input grad and the parameter grads summed over
    the CP group."""
    import copy

    from megatron.core import parallel_state
    from megatron.core.transformer.spec_utils import build_module

    from regla_megatron.config import ReGLAConfig
    from regla_megatron.context_parallel import get_batch_cp_slice
    from regla_megatron.specs import get_regla_layer_spec

    cp_group = parallel_state.get_context_parallel_group()
    cp_rank, cp_size = parallel_state.get_context_parallel_rank(), parallel_state.get_context_parallel_world_size()
    config = ReGLAConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=2,
        regla_head_dim_k=16,
        regla_head_dim_v=head_dim_v,
        use_cpu_initialization=True,
        regla_backend=backend,
        regla_cp_layout=layout,
        context_parallel_size=cp_size,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
    )
    full_config = copy.deepcopy(config)
    full_config.context_parallel_size = 1
    spec = get_regla_layer_spec("local").submodules.self_attention
    sharded = build_module(spec, config=config, layer_number=1)
    reference = build_module(spec, config=full_config, layer_number=1)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p, ref_p in zip(sharded.parameters(), reference.parameters()):
            p.copy_(0.3 * torch.randn(p.shape, generator=gen) + (1.0 if bool((p == 1).all()) else 0.0))
            ref_p.copy_(p)
    hidden = torch.randn(length, batch, 32, generator=gen)
    weight = torch.randn(length, batch, 32, generator=gen)
    cut = functools.partial(get_batch_cp_slice, cp_rank=cp_rank, cp_size=cp_size, layout=layout, seq_dim=0)
    packing = {}
    if packed:  # Megatron's THD batch: B = 1, offsets in PackedSeqParams, sliced per sequence under CP
        from megatron.core.packed_seq_params import PackedSeqParams

        from regla_megatron.context_parallel import get_thd_cp_slice

        cu = torch.tensor([0] + PACKED_LENGTHS).cumsum(0).to(torch.int32)
        packing["packed_seq_params"] = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
        cut = functools.partial(get_thd_cp_slice, cu_seqlens=cu, cp_rank=cp_rank, cp_size=cp_size, layout=layout, seq_dim=0)

    full_hidden = hidden.clone().requires_grad_(True)
    ref_out, _ = reference(full_hidden, attention_mask=None, **packing)
    (ref_out * weight).sum().backward()
    local_hidden = cut(hidden).requires_grad_(True)
    out, _ = sharded(local_hidden, attention_mask=None, **packing)
    (out * cut(weight)).sum().backward()

    errors = {"output": rel_error(out, cut(ref_out)), "hidden": rel_error(local_hidden.grad, cut(full_hidden.grad))}
    for (name, p), ref_p in zip(sharded.named_parameters(), reference.parameters()):
        if p.grad is None and ref_p.grad is None:  # e.g. out_proj's bias, returned unapplied
            continue
        grad = p.grad.clone()
        torch.distributed.all_reduce(grad, group=cp_group)
        errors[name] = rel_error(grad, ref_p.grad)
    return errors


def _bf16_strided_check(rank, cp_size, layout="zigzag"):
    """bf16 inputs given as strided [s, b, H, d] -> [b, s, H, d] views (as the mixer does)."""
    from regla_kernels import chunk_regla
    from regla_megatron.context_parallel import context_parallel_regla, get_batch_cp_slice

    tensors, _, _ = _regla_inputs(**SHAPE)
    tensors = [x.to(torch.bfloat16) for x in tensors]
    ref, _ = chunk_regla(*(x.float() for x in tensors), backend="torch")  # fp32 math on the same inputs
    local = [get_batch_cp_slice(x, rank, cp_size, layout).transpose(0, 1).contiguous().transpose(0, 1) for x in tensors]
    out = context_parallel_regla(*local, cp_group=torch.distributed.group.WORLD, layout=layout, backend="torch")
    return {
        "dtype_ok": out.dtype == torch.bfloat16,
        "error": rel_error(out, get_batch_cp_slice(ref, rank, cp_size, layout)),
    }


def _error_messages(rank, cp_size):
    """The messages of the input errors a user can hit first (raised before any collective)."""
    from regla_megatron.context_parallel import context_parallel_regla

    odd = torch.randn(1, 5, 1, 4)
    messages = {}
    for name, call in {
        "odd_zigzag": lambda: context_parallel_regla(odd, odd, odd, odd, odd, cp_group=torch.distributed.group.WORLD),
        "layout": lambda: context_parallel_regla(
            odd, odd, odd, odd, odd, cp_group=torch.distributed.group.WORLD, layout="ring"
        ),
    }.items():
        try:
            call()
            messages[name] = "no error"
        except ValueError as error:
            messages[name] = str(error)
    return messages


def _packed_error_messages(rank, cp_size):
    """Packed sequences under CP whose lengths do not split: the layer function and the mixer."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from regla_megatron.context_parallel import context_parallel_regla

    x = torch.randn(1, 6, 1, 4)
    bad_cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    messages = {}
    try:
        context_parallel_regla(x, x, x, x, x, cp_group=torch.distributed.group.WORLD, cu_seqlens=bad_cu)
        messages["packed_layer"] = "no error"
    except ValueError as error:
        messages["packed_layer"] = str(error)
    mixer = _tiny_mixer()
    try:
        cu = torch.tensor([0, 6, 12], dtype=torch.int32)
        mixer(torch.randn(6, 1, 32), attention_mask=None, packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu))
        messages["packed_mixer"] = "no error"
    except ValueError as error:
        messages["packed_mixer"] = str(error)
    return messages


def _tiny_mixer():
    from megatron.core import parallel_state
    from megatron.core.transformer.spec_utils import build_module

    from regla_megatron.config import ReGLAConfig
    from regla_megatron.specs import get_regla_layer_spec

    config = ReGLAConfig(
        num_layers=1, hidden_size=32, num_attention_heads=2, regla_head_dim_k=16, regla_head_dim_v=8,
        use_cpu_initialization=True, regla_backend="torch",
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
    )
    return build_module(get_regla_layer_spec("local").submodules.self_attention, config=config, layer_number=1)


def _megatron_slice_check(rank, cp_size):
    """get_batch_cp_slice('zigzag') == Megatron's get_batch_on_this_cp_rank (cp_group explicit)."""
    from regla_megatron.context_parallel import get_batch_cp_slice, megatron_cp_batch

    batch = {"tokens": torch.arange(2 * 32).view(2, 32), "hidden": torch.randn(2, 32, 3, 4)}
    expected = {k: get_batch_cp_slice(v, rank, cp_size, "zigzag", seq_dim=1) for k, v in batch.items()}
    got = megatron_cp_batch(batch, torch.distributed.group.WORLD)
    return all(torch.equal(got[k], expected[k]) for k in batch)


def _cp_worker(rank, world_size):
    init_parallel(cp=world_size)
    results = {"megatron_slice": _megatron_slice_check(rank, world_size)}
    for layout in ("zigzag", "contiguous"):
        results[f"regla/{layout}"] = _regla_check(rank, world_size, layout, layout)
    results["attention/zigzag"] = _attention_check(rank, world_size, "zigzag")
    if world_size == 2:
        results["regla/negative_control"] = _regla_check(rank, world_size, "zigzag", "contiguous")
        results["attention/contiguous"] = _attention_check(rank, world_size, "contiguous")
        results["attention/zigzag_with_mask"] = _attention_check(rank, world_size, "zigzag", with_mask=True)
        results["attention/self_attention"] = _self_attention_check(rank, world_size)
        results["errors"] = _error_messages(rank, world_size)
        results["bf16"] = _bf16_strided_check(rank, world_size)
        results["mixer/zigzag"] = _mixer_check()
        results["mixer/packed_zigzag"] = _mixer_check(batch=1, length=sum(PACKED_LENGTHS), packed=True)
        results["packed/contiguous"] = _packed_regla_check(rank, world_size, "contiguous", "contiguous")
        results["packed/negative_control"] = _packed_regla_check(rank, world_size, "zigzag", "contiguous")
        results["errors"].update(_packed_error_messages(rank, world_size))
    results["packed/zigzag"] = _packed_regla_check(rank, world_size, "zigzag", "zigzag")
    if world_size == 4:  # CP over a subgroup of the world, next to TP
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        init_parallel(tp=2, cp=2)
        results["mixer/tp2_cp2_zigzag"] = _mixer_check()
    return results


_RUNS = {}


def cp_results(cp_size):
    """Per-check errors, worst over the ranks: {check: {quantity: error}} (bools for slices).

    One run per CP size and pytest process; a failed run is remembered and re-raised.
    """
    if cp_size not in _RUNS:
        try:
            _RUNS[cp_size] = _merge(run_distributed(_cp_worker, cp_size))
        except Exception as error:  # noqa: BLE001 - every test of this size reports it
            _RUNS[cp_size] = error
    if isinstance(_RUNS[cp_size], Exception):
        raise _RUNS[cp_size]
    return _RUNS[cp_size]


def _merge(per_rank):
    merged = {}
    for name, value in per_rank[0].items():
        if name == "errors":
            merged[name] = value
        elif name == "bf16":
            merged[name] = {
                "dtype_ok": all(r[name]["dtype_ok"] for r in per_rank),
                "error": max(r[name]["error"] for r in per_rank),
            }
        elif isinstance(value, dict):
            merged[name] = {q: max(r[name][q] for r in per_rank) for q in value}
        else:
            merged[name] = all(r[name] for r in per_rank)
    return merged


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("cp_size", [2, 4])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_regla_cp_matches_one_process(cp_size, layout):
    errors = cp_results(cp_size)[f"regla/{layout}"]
    bad = {q: e for q, e in errors.items() if e > RTOL}
    assert not bad, f"CP={cp_size} {layout}: rel errors above {RTOL}: {bad}"


@pytest.mark.parametrize("cp_size", [2, 4])
def test_zigzag_slice_matches_megatron(cp_size):
    assert cp_results(cp_size)["megatron_slice"]


def test_negative_control_wrong_layout_is_detected():
    """Zigzag-sliced tokens run as 'contiguous' must NOT match: the comparison has teeth."""
    errors = cp_results(2)["regla/negative_control"]
    assert errors["output"] > 1e-2, errors
    assert max(errors[name] for name in NAMES) > 1e-2, errors


@pytest.mark.parametrize("cp_size,check", [(2, "zigzag"), (2, "contiguous"), (2, "zigzag_with_mask"), (4, "zigzag")])
def test_cp_attention_matches_full_causal_sdpa(cp_size, check):
    errors = cp_results(cp_size)[f"attention/{check}"]
    bad = {q: e for q, e in errors.items() if e > RTOL}
    assert not bad, f"CP={cp_size} attention {check}: rel errors above {RTOL}: {bad}"


def test_cp_attention_as_megatron_core_attention():
    """SelfAttention(core_attention=ContextParallelDotProductAttention) at CP=2 zigzag equals
    SelfAttention(core_attention=DotProductAttention) on the full sequence."""
    errors = cp_results(2)["attention/self_attention"]
    bad = {q: e for q, e in errors.items() if e > RTOL}
    assert not bad, f"SelfAttention under CP: rel errors above {RTOL}: {bad}"


def test_clear_errors():
    messages = cp_results(2)["errors"]
    assert "divisible by 2" in messages["odd_zigzag"] and "T_local=5" in messages["odd_zigzag"], messages
    assert "unknown context-parallel layout 'ring'" in messages["layout"], messages


@pytest.mark.parametrize("cp_size,layout", [(2, "zigzag"), (4, "zigzag"), (2, "contiguous")])
def test_packed_sequences_under_cp_match_one_process(cp_size, layout):
    """Packed sequences (THD, B = 1) cut per sequence as TransformerEngine's partitioning does:
    output and every gradient, each sequence's initial state included, equal one process."""
    errors = cp_results(cp_size)[f"packed/{layout}"]
    bad = {q: e for q, e in errors.items() if e > RTOL}
    assert not bad, f"CP={cp_size} packed {layout}: rel errors above {RTOL}: {bad}"


def test_packed_negative_control_wrong_layout_is_detected():
    errors = cp_results(2)["packed/negative_control"]
    assert errors["output"] > 1e-2, errors


def test_packed_mixer_under_cp_matches_one_process():
    """ReGLAMixer with Megatron's PackedSeqParams at CP=2 (zigzag per sequence) equals CP=1."""
    errors = cp_results(2)["mixer/packed_zigzag"]
    bad = {q: e for q, e in errors.items() if e > RTOL}
    assert not bad, f"packed ReGLAMixer under CP: rel errors above {RTOL}: {bad}"


def test_packed_errors_under_cp():
    messages = cp_results(2)["errors"]
    assert "packed sequence 0 has 3 local tokens" in messages["packed_layer"], messages
    assert "divisible by 4" in messages["packed_mixer"] and "cu_seqlens_q_padded" in messages["packed_mixer"], messages


def test_thd_slices_partition_each_sequence():
    from regla_megatron.context_parallel import thd_cp_indices

    cu = torch.tensor([0, 8, 24, 32])
    for layout, size in (("zigzag", 2), ("zigzag", 4), ("contiguous", 4)):
        parts = [thd_cp_indices(cu, rank, size, layout) for rank in range(size)]
        assert sorted(torch.cat(parts).tolist()) == list(range(32))
    # zigzag CP=2, rank 0: chunks 0 and 3 of every sequence
    assert thd_cp_indices(cu, 0, 2).tolist() == [0, 1, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23, 24, 25, 30, 31]
    with pytest.raises(ValueError, match="packed sequence 0 has 8 tokens.*divisible by 32"):
        thd_cp_indices(cu, 0, 16)


def test_bf16_strided_inputs():
    result = cp_results(2)["bf16"]
    assert result["dtype_ok"] and result["error"] < 1e-2, result  # bf16 output rounding


@pytest.mark.parametrize("world,check", [(2, "zigzag"), (4, "tp2_cp2_zigzag")])
def test_regla_mixer_under_cp_matches_one_process(world, check):
    """ReGLAMixer (which calls context_parallel_regla when context_parallel_size > 1) at CP=2
    zigzag (alone, and next to TP=2) equals the same weights at CP=1, parameter grads included."""
    errors = cp_results(world)[f"mixer/{check}"]
    bad = {q: e for q, e in errors.items() if e > RTOL}
    assert not bad, f"ReGLAMixer under CP: rel errors above {RTOL}: {bad}"


# --------------------------------------------------------------------------- layout helpers (one process)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("cp_size", [1, 2, 3, 4])
def test_token_positions_match_slices(layout, cp_size):
    from regla_megatron.context_parallel import cp_token_positions, get_batch_cp_slice

    length = 24
    cuts = [get_batch_cp_slice(torch.arange(length), r, cp_size, layout, seq_dim=0) for r in range(cp_size)]
    assert sorted(torch.cat(cuts).tolist()) == list(range(length))  # a partition of the sequence
    for rank, cut in enumerate(cuts):
        assert torch.equal(cut, cp_token_positions(layout, rank, cp_size, length // cp_size))


def test_layout_errors():
    from regla_megatron.context_parallel import cp_token_positions, get_batch_cp_slice

    with pytest.raises(ValueError, match="divisible by 8"):
        get_batch_cp_slice(torch.zeros(2, 12), 0, 4, "zigzag")
    with pytest.raises(ValueError, match="divisible by 2"):
        cp_token_positions("zigzag", 0, 2, 7)
    with pytest.raises(ValueError, match="unknown context-parallel layout"):
        get_batch_cp_slice(torch.zeros(2, 12), 0, 2, "ring")
    with pytest.raises(ValueError, match="outside"):
        cp_token_positions("contiguous", 2, 2, 8)
