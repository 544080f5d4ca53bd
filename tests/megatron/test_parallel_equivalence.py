"""Parallel runs of the ReGLA/softmax hybrid equal the one-process run, parameter by parameter.

Every run: a 4-layer 'R*R*' GPTModel (hidden 64, 4 heads, seq 32, vocab 128, fp32,
weights a function of the global parameter name), Megatron DDP, two micro-batches
through Megatron's pipeline schedule, `finalize_model_grads`. Compared: the loss and
every parameter and gradient, TP-gathered into full tensors, relative 1e-5.
"""

import pytest
import torch

from tests.support.distributed import (
    assert_same_run,
    build_gpt,
    collect_full,
    compare_runs,
    global_named_parameters,
    init_parallel,
    keep_on_tp0_dp0,
    make_batches,
    merge_ranks,
    rel_error,
    run_distributed,
    shard_tensor,
    tiny_hybrid_config,
    train_step,
    unshard_tensor,
    wrap_ddp,
)

PATTERN = "R*R*"
NUM_MICRO = 2
# The negative control's victim: a replicated norm that sees sequence-sharded input.
SP_VICTIM = "decoder.layers.0.input_layernorm.weight"


class _TwoRankGroup:
    """Stands in for a TP group of two: all a linear layer's CPU initialization reads of it."""

    def __init__(self, rank):
        self._rank = rank

    def rank(self):
        return self._rank

    def size(self):
        return 2


@pytest.mark.parametrize("dim, stride", [(0, 1), (1, 1), (0, 3), (1, 3)])
def test_harness_shards_like_megatron_cpu_init(megatron_single_process, dim, stride):
    """The gather/shard used for comparison is Megatron's own split (strides included): a
    column-parallel (dim 0) or row-parallel (dim 1) linear with CPU initialization, per rank."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    tp, full = 2, torch.randn(12, 6)
    config = ModelParallelConfig(use_cpu_initialization=True, perform_initialization=True, params_dtype=torch.float32)
    if dim == 0:
        linear, options = ColumnParallelLinear, dict(gather_output=False)
    else:
        linear, options = RowParallelLinear, dict(input_is_parallel=True, skip_bias_add=True)
    parts = []
    for rank in range(tp):
        layer = linear(6, 12, config=config, init_method=lambda w: w.copy_(full), bias=False, stride=stride,
                       tp_group=_TwoRankGroup(rank), **options)
        weight = layer.weight.detach()
        assert torch.equal(weight, shard_tensor(full, rank, tp, dim, stride))
        parts.append(weight)
    assert torch.equal(unshard_tensor(parts, dim, stride), full)


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("rank one says no")
    torch.distributed.barrier()  # rank 0 would wait forever: the harness must not


def test_harness_reports_the_failing_rank():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 of 2 failed.*ValueError: rank one says no"):
        run_distributed(_fail_on_rank_one, 2, timeout=60)


def _hybrid_chunks(sequence_parallel=False):
    """Config and this rank's DDP-wrapped model chunk(s) (a list under VPP)."""
    from megatron.core import parallel_state

    from regla_megatron.specs import get_hybrid_block_spec

    config = tiny_hybrid_config(PATTERN, sequence_parallel=sequence_parallel)
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    stages = [None] if vpp is None else list(range(vpp))
    chunks = []
    for stage in stages:
        spec = get_hybrid_block_spec(config, vp_stage=stage, backend="local")
        chunks.append(wrap_ddp(build_gpt(config, spec, vp_stage=stage), config))
    return config, chunks


def _train(scenario):
    """One training step for `scenario` (dict) on this rank: (loss or None, params or None)."""
    from megatron.core import parallel_state

    config, chunks = _hybrid_chunks(scenario.get("sp", False))
    for chunk in chunks:
        for name, param in global_named_parameters(chunk):
            if name == scenario.get("drop_sp_attr"):
                del param.sequence_parallel
    dp = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    batches = make_batches(NUM_MICRO)[dp::dp_size]  # each DP rank its own micro-batch(es)
    model = chunks if len(chunks) > 1 else chunks[0]
    loss = train_step(model, config, batches)
    return loss, keep_on_tp0_dp0(collect_full(model))


def _worker(rank, world_size, layout, scenarios):
    init_parallel(tp=layout.get("tp", 1), pp=layout.get("pp", 1), vpp=layout.get("vpp"))
    return [_train(s) for s in scenarios]


def _run(world_size, layout, scenarios=({},)):
    """[(mean loss, {name: (param, grad)})] per scenario, merged over ranks."""
    per_rank = run_distributed(_worker, world_size, layout, list(scenarios))
    merged = []
    for i in range(len(scenarios)):
        losses = [res[i][0] for res in per_rank if res[i][0] is not None]
        merged.append((sum(losses) / len(losses), merge_ranks(res[i][1] for res in per_rank)))
    return merged


@pytest.fixture(scope="module")
def reference():
    """The one-process run over both micro-batches."""
    return _run(1, {})[0]


def test_tensor_parallel(reference):
    (loss, params), = _run(2, {"tp": 2})
    assert_same_run(*reference, loss, params)


@pytest.fixture(scope="module")
def sequence_parallel_runs():
    """TP=2 + SP, as built and with SP_VICTIM's `sequence_parallel` tag removed."""
    return _run(2, {"tp": 2}, [{"sp": True}, {"sp": True, "drop_sp_attr": SP_VICTIM}])


def test_sequence_parallel(reference, sequence_parallel_runs):
    assert_same_run(*reference, *sequence_parallel_runs[0])


def test_negative_control_untagged_sp_norm_is_caught(reference, sequence_parallel_runs):
    """Without the tag nobody sums the norm's partial grads: the comparison must say so."""
    ref_loss, ref = reference
    loss, params = sequence_parallel_runs[1]
    assert loss == pytest.approx(ref_loss, rel=1e-5)  # the forward pass is unaffected
    assert compare_runs(ref, params) == [
        f"{SP_VICTIM}: grad rel err {rel_error(params[SP_VICTIM][1], ref[SP_VICTIM][1]):.2e}"
    ]
    assert rel_error(params[SP_VICTIM][1], ref[SP_VICTIM][1]) > 0.1  # one rank's tokens only
    with pytest.raises(AssertionError, match=SP_VICTIM):
        assert_same_run(ref_loss, ref, loss, params)


def test_pipeline_parallel_hybrid(reference):
    (loss, params), = _run(2, {"pp": 2})
    assert_same_run(*reference, loss, params)


def test_virtual_pipeline_parallel_hybrid(reference):
    (loss, params), = _run(2, {"pp": 2, "vpp": 2})
    assert_same_run(*reference, loss, params)


def test_tensor_parallel_with_data_parallel_ddp(reference):
    """4 ranks, TP=2 x DP=2: each DP rank one micro-batch; DDP averages the grads."""
    (loss, params), = _run(4, {"tp": 2})
    assert_same_run(*reference, loss, params)
