"""The Triton segments path under context parallelism, in gloo processes running the kernels
in the interpreter: `context_parallel_regla` (dense and packed sequences) and ReGLAMixer at
TP x CP, against one process."""

import copy
import functools

import pytest
import torch

from tests.kernels.triton.cases import make_inputs, relative_error
from tests.support.distributed import run_distributed

pytestmark = pytest.mark.interpreter

BOUND = 2e-5


def _state_grad_sum(state: torch.Tensor) -> torch.Tensor:
    """The initial state's gradient summed over the group (each rank holds its share)."""
    grad = state.grad.clone()
    torch.distributed.all_reduce(grad)
    return grad


def _errors(out, ref_out, local, full, state_grad, cut):
    """Relative errors of the output and the five input gradients (local tokens, `cut` from the
    whole ones) and of the initial state's gradient."""
    names = ["dq", "dk", "dv", "dgate", "drefine"]
    errors = {"o": relative_error(out, cut(ref_out.detach()))}
    errors.update({name: relative_error(x.grad, cut(r.grad)) for name, x, r in zip(names, local, full)})
    errors["dinitial"] = relative_error(state_grad, full[5].grad)
    return errors


def cp_errors(rank, cp_size, data_layout, claimed_layout, overlap_forward=False):
    """Per rank: relative errors of context_parallel_regla (Triton kernels, gloo) on tokens cut
    as `data_layout` and run as `claimed_layout`, against the one-process fp64 recurrence."""
    from regla_kernels import chunk_regla
    from regla_megatron.context_parallel import context_parallel_regla, get_batch_cp_slice

    inputs = make_inputs(2, 128, 2, 32, 16, seed=21)
    weight = torch.randn(2, 128, 2, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    full = [x.double().requires_grad_(True) for x in inputs]
    ref, _ = chunk_regla(*full[:5], initial_state=full[5], backend="naive")
    (ref * weight).sum().backward()
    cut = functools.partial(get_batch_cp_slice, cp_rank=rank, cp_size=cp_size, layout=data_layout, seq_dim=1)
    local = [cut(x).requires_grad_(True) for x in inputs[:5]] + [inputs[5].clone().requires_grad_(True)]
    out = context_parallel_regla(
        *local[:5], cp_group=torch.distributed.group.WORLD, layout=claimed_layout, backend="triton", initial_state=local[5],
        overlap_forward=overlap_forward,
    )
    (out.double() * cut(weight)).sum().backward()
    return _errors(out, ref, local, full, _state_grad_sum(local[5]), cut)


def packed_cp_errors(rank, cp_size, lengths):
    """Per rank: relative errors of context_parallel_regla with packed sequences (B = 1, each
    sequence cut zigzag, `get_thd_cp_slice`) on the Triton kernels, against the one-process fp64
    recurrence with cu_seqlens."""
    from regla_kernels import chunk_regla
    from regla_megatron.context_parallel import context_parallel_regla, get_thd_cp_slice

    cu = torch.tensor([0] + list(lengths)).cumsum(0).to(torch.int32)
    inputs = make_inputs(1, sum(lengths), 2, 16, 16, sequences=len(lengths), seed=23)
    weight = torch.randn(1, sum(lengths), 2, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    full = [x.double().requires_grad_(True) for x in inputs]
    ref, _ = chunk_regla(*full[:5], initial_state=full[5], cu_seqlens=cu, backend="naive")
    (ref * weight).sum().backward()
    cut = functools.partial(get_thd_cp_slice, cu_seqlens=cu, cp_rank=rank, cp_size=cp_size, layout="zigzag", seq_dim=1)
    local = [cut(x).requires_grad_(True) for x in inputs[:5]] + [inputs[5].clone().requires_grad_(True)]
    out = context_parallel_regla(
        *local[:5], cp_group=torch.distributed.group.WORLD, layout="zigzag", backend="triton", initial_state=local[5],
        cu_seqlens=cu // cp_size,
    )
    (out.double() * cut(weight)).sum().backward()
    return _errors(out, ref, local, full, _state_grad_sum(local[5]), cut)


def mixer_cp_errors(rank, world_size, tp, cp):
    """Per rank: ReGLAMixer (regla_backend='triton') at TP = tp x CP = cp against a mixer with the
    same TP shards at CP = 1 on the whole sequence: the output, the input gradient and every
    parameter gradient (summed over the CP group, as Megatron sums them)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.spec_utils import build_module

    from regla_megatron.config import ReGLAConfig
    from regla_megatron.context_parallel import get_batch_cp_slice
    from regla_megatron.specs import get_regla_layer_spec
    from tests.support.distributed import init_parallel

    init_parallel(tp=tp, cp=cp)
    config = ReGLAConfig(
        num_layers=1, hidden_size=32, num_attention_heads=2, regla_head_dim_k=16, regla_head_dim_v=16,
        use_cpu_initialization=True, regla_backend="triton", regla_cp_layout="zigzag",
        context_parallel_size=cp, tensor_model_parallel_size=tp,
    )
    whole_config = copy.deepcopy(config)
    whole_config.context_parallel_size = 1
    spec = get_regla_layer_spec("local").submodules.self_attention
    mixer = build_module(spec, config=config, layer_number=1)
    whole = build_module(spec, config=whole_config, layer_number=1)
    shard_gen = torch.Generator().manual_seed(40 + parallel_state.get_tensor_model_parallel_rank())  # same on every CP rank
    with torch.no_grad():
        for p, twin in zip(mixer.parameters(), whole.parameters()):
            p.add_(0.2 * torch.randn(p.shape, generator=shard_gen))
            twin.copy_(p)
    gen = torch.Generator().manual_seed(41)
    hidden, weight = torch.randn(64, 2, 32, generator=gen), torch.randn(64, 2, 32, generator=gen)
    cp_rank, cp_group = parallel_state.get_context_parallel_rank(), parallel_state.get_context_parallel_group()
    cut = functools.partial(get_batch_cp_slice, cp_rank=cp_rank, cp_size=cp, layout="zigzag", seq_dim=0)
    whole_hidden, local_hidden = hidden.clone().requires_grad_(True), cut(hidden).requires_grad_(True)
    ref, _ = whole(whole_hidden, attention_mask=None)
    (ref * weight).sum().backward()
    out, _ = mixer(local_hidden, attention_mask=None)
    (out * cut(weight)).sum().backward()
    errors = {"o": relative_error(out, cut(ref.detach())), "dhidden": relative_error(local_hidden.grad, cut(whole_hidden.grad))}
    for (name, p), twin in zip(mixer.named_parameters(), whole.parameters()):
        if p.grad is None and twin.grad is None:  # a bias returned unapplied
            continue
        grad = p.grad.clone()
        torch.distributed.all_reduce(grad, group=cp_group)
        errors[name] = relative_error(grad, twin.grad)
    return errors


def _assert_within(per_rank, bound=BOUND):
    for errors in per_rank:
        bad = {name: e for name, e in errors.items() if not e < bound}
        assert not bad, bad


@pytest.mark.parametrize(
    "cp_size, layout, overlap_forward",
    [
        (2, "zigzag", False),
        pytest.param(2, "contiguous", False, marks=pytest.mark.slow),
        pytest.param(4, "zigzag", True, marks=pytest.mark.slow),
    ],
)
def test_context_parallel_triton_path_matches_one_process(cp_size, layout, overlap_forward):
    """The Triton segments path through context_parallel_regla with gloo: exact at CP > 1, with the
    forward's one all-gather or its per-slot all-gathers (overlap_forward)."""
    _assert_within(run_distributed(cp_errors, cp_size, layout, layout, overlap_forward))


@pytest.mark.slow
def test_context_parallel_triton_path_detects_a_wrong_layout():
    """Negative control: zigzag-sliced tokens run as contiguous must not match."""
    errors = run_distributed(cp_errors, 2, "zigzag", "contiguous")[0]
    assert errors["o"] > 1e-2, errors


@pytest.mark.slow
def test_packed_sequences_under_cp_on_the_triton_kernels():
    """Packed sequences under CP = 2 (zigzag per sequence) with the Triton kernels for the local
    passes (gloo): output and every gradient against one process."""
    _assert_within(run_distributed(packed_cp_errors, 2, [16, 40, 8]))


@pytest.mark.slow
def test_mixer_tp2_cp2_on_the_triton_kernels_matches_cp1():
    """ReGLAMixer with regla_backend='triton' at TP = 2 x CP = 2 (4 gloo processes) against the same
    weights at CP = 1: output, input gradient and every parameter gradient."""
    _assert_within(run_distributed(mixer_cp_errors, 4, 2, 2, timeout=400))
