"""Per-rank checks of context parallelism on CPU/gloo against one process on the full sequence.

Not a test file. Each check runs inside a `tests.support.distributed.run_distributed` rank
(after `init_process_group`; the mixer checks also after `init_parallel`) and returns relative
errors (max |got - ref| / max |ref|, `tests.support.distributed.rel_error`) keyed by quantity,
or the messages of the errors it provoked. `runs.cp_results` runs them all once per CP size;
the kernels' interpreter tests call `mixer_cp_check` and `packed_regla_cp_check` with the
Triton backend.
"""

import copy
import functools

import torch

from regla_kernels import chunk_regla
from regla_megatron.context_parallel import (
    context_parallel_regla,
    get_batch_cp_slice,
    get_thd_cp_slice,
    megatron_cp_batch,
)
from tests.support.distributed import rel_error

SHAPE = dict(batch=2, length=64, heads=2, dk=16, dv=8)
NAMES = ["q", "k", "v", "gate_logits", "refine_logits"]
PACKED_LENGTHS = [16, 40, 8]  # every length divisible by 2 CP for CP <= 4


def regla_inputs(batch, length, heads, dk, dv, seed=0):
    """Random fp32 layer inputs: ([q, k, v, gate_logits, refine_logits] each [batch, length,
    heads, dk] (v: dv), initial state [batch, heads, dk, dv], output weight [batch, length, heads, dv])."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda d, s: s * torch.randn(batch, length, heads, d, generator=gen)
    tensors = [draw(dk, 1.5), draw(dk, 1.5), draw(dv, 1.0), draw(dk, 2.0), draw(dk, 2.0)]
    initial_state = torch.randn(batch, heads, dk, dv, generator=gen)
    weight = torch.randn(batch, length, heads, dv, generator=gen)
    return tensors, initial_state, weight


def regla_cp_check(rank, cp_size, data_layout, claimed_layout):
    """Rel errors (output, each input's gradient, the summed initial-state gradient) of
    `context_parallel_regla` (torch backend, fp32, `SHAPE`) on `data_layout`-sliced tokens run as
    `claimed_layout`, against `chunk_regla` on the full sequence."""
    tensors, initial_state, weight = regla_inputs(**SHAPE)
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


def packed_regla_cp_check(rank, cp_size, data_layout, claimed_layout, backend="torch", dv=SHAPE["dv"]):
    """Packed sequences (`PACKED_LENGTHS`, B = 1, one state and key max per sequence) cut per
    sequence as `data_layout` and run as `claimed_layout` through `context_parallel_regla` with
    `backend` for the local passes (fp32, dk 16, value dim `dv`), against one process with
    cu_seqlens: rel errors of the output, each input's gradient and the summed state gradient."""
    total = sum(PACKED_LENGTHS)
    cu = torch.tensor([0] + PACKED_LENGTHS).cumsum(0).to(torch.int32)
    tensors, _, weight = regla_inputs(1, total, SHAPE["heads"], SHAPE["dk"], dv, seed=4)
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


def mixer_cp_check(layout="zigzag", batch=2, length=64, backend="torch", head_dim_v=8, packed=False):
    """ReGLAMixer at Megatron's CP size vs the same weights at CP=1 on the full sequence
    (same TP, same kernel backend; hidden 32, 2 heads, dk 16, value dim `head_dim_v`, fp32 input
    [length, batch, 32]): rel errors of the output, the input gradient and each parameter's
    gradient summed over the CP group. With `packed`, a THD batch of `PACKED_LENGTHS` (batch 1,
    length their sum). Needs `init_parallel(cp=..., tp=...)` first."""
    from megatron.core import parallel_state
    from megatron.core.transformer.spec_utils import build_module

    from regla_megatron.config import ReGLAConfig
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


def tiny_mixer():
    """A ReGLAMixer (hidden 32, 2 heads, dk 16, dv 8, torch backend) at this process's CP size."""
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


def bf16_strided_check(rank, cp_size, layout="zigzag"):
    """bf16 inputs given as strided [s, b, H, d] -> [b, s, H, d] views (as the mixer does):
    {"dtype_ok": the output is bf16, "error": rel error against fp32 math on the same inputs}."""
    tensors, _, _ = regla_inputs(**SHAPE)
    tensors = [x.to(torch.bfloat16) for x in tensors]
    ref, _ = chunk_regla(*(x.float() for x in tensors), backend="torch")
    local = [get_batch_cp_slice(x, rank, cp_size, layout).transpose(0, 1).contiguous().transpose(0, 1) for x in tensors]
    out = context_parallel_regla(*local, cp_group=torch.distributed.group.WORLD, layout=layout, backend="torch")
    return {
        "dtype_ok": out.dtype == torch.bfloat16,
        "error": rel_error(out, get_batch_cp_slice(ref, rank, cp_size, layout)),
    }


def _message_of(call) -> str:
    """The ValueError text `call()` raises, or "no error"."""
    try:
        call()
    except ValueError as error:
        return str(error)
    return "no error"


def error_messages(rank, cp_size):
    """The messages of the input errors a user can hit first (raised before any collective):
    an odd local length under zigzag, an unknown layout, packed lengths that do not split (the
    layer function and the mixer)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    world = torch.distributed.group.WORLD
    odd = torch.randn(1, 5, 1, 4)
    x = torch.randn(1, 6, 1, 4)
    bad_cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    cu = torch.tensor([0, 6, 12], dtype=torch.int32)
    mixer = tiny_mixer()
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    return {
        "odd_zigzag": _message_of(lambda: context_parallel_regla(odd, odd, odd, odd, odd, cp_group=world)),
        "layout": _message_of(lambda: context_parallel_regla(odd, odd, odd, odd, odd, cp_group=world, layout="ring")),
        "packed_layer": _message_of(lambda: context_parallel_regla(x, x, x, x, x, cp_group=world, cu_seqlens=bad_cu)),
        "packed_mixer": _message_of(lambda: mixer(torch.randn(6, 1, 32), attention_mask=None, packed_seq_params=packed)),
    }


def megatron_slice_check(rank, cp_size):
    """Whether get_batch_cp_slice('zigzag') equals Megatron's get_batch_on_this_cp_rank (through
    `megatron_cp_batch`, cp_group explicit) on int64 and fp32 tensors."""
    batch = {"tokens": torch.arange(2 * 32).view(2, 32), "hidden": torch.randn(2, 32, 3, 4)}
    expected = {k: get_batch_cp_slice(v, rank, cp_size, "zigzag", seq_dim=1) for k, v in batch.items()}
    got = megatron_cp_batch(batch, torch.distributed.group.WORLD)
    return all(torch.equal(got[k], expected[k]) for k in batch)


__all__ = [
    "NAMES",
    "PACKED_LENGTHS",
    "SHAPE",
    "bf16_strided_check",
    "error_messages",
    "megatron_slice_check",
    "mixer_cp_check",
    "packed_regla_cp_check",
    "regla_cp_check",
    "regla_inputs",
    "tiny_mixer",
]
