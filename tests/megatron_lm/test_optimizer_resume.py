"""Resuming the distributed optimizer from a torch_dist checkpoint without TE/apex.

With neither TransformerEngine nor apex installed, megatron-core (0.16.1 here, the same code
in 0.19.2 at `distrib_optimizer.py:839`) runs `torch.optim.Adam`, and
`DistributedOptimizer.state_dict()` reads one common step from the Adam state:
`assert len(steps) == 1`. Loading builds the sharded state dict first
(`sharded_state_dict(is_loading=True)` calls `state_dict()`), when the freshly built
optimizer has no state yet: no steps, the assertion fails, whatever the model. The
distributed optimizer itself needs CUDA (it checks for CUDA tensor types), so these tests
call its `state_dict` on a stand-in holding a real Adam: that is the whole of the code
that fails.

The plugin's part is ruled out separately: every parameter of the ReGLA hybrid is in the
DDP buffers with the params dtype and gets a gradient, so Adam steps all of them alike;
and the plain Megatron optimizer (the example's setting without TE/apex) builds its
loading state dict from a fresh state.
"""

import types

import pytest
import torch

from tests.support.distributed import (
    build_gpt,
    init_parallel,
    make_batches,
    run_distributed,
    tiny_hybrid_config,
    train_step,
    wrap_ddp,
)


def _distributed_state_dict(adam):
    """Megatron's DistributedOptimizer.state_dict() on a stand-in around `adam`."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return DistributedOptimizer.state_dict(types.SimpleNamespace(optimizer=adam, grad_scaler=None))


def _native_adam_only():
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        pytest.skip("TransformerEngine or apex is installed: Megatron uses their Adam, not this path")


def test_fresh_distributed_optimizer_state_dict_fails_without_the_plugin():
    _native_adam_only()
    layer = torch.nn.Linear(4, 4)
    adam = torch.optim.Adam(layer.parameters(), lr=1e-3)
    with pytest.raises(AssertionError):  # what resuming hits: no step in a fresh state
        _distributed_state_dict(adam)
    layer(torch.randn(2, 4)).sum().backward()
    adam.step()
    assert _distributed_state_dict(adam)["optimizer"]["param_groups"][0]["step"] == 1


def _hybrid_worker(rank, world_size):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    init_parallel()
    config = tiny_hybrid_config("R*R*")
    model = wrap_ddp(build_gpt(config, _spec(config), seed=3), config)
    train_step(model, config, make_batches(1))
    params = dict(model.module.named_parameters())
    report = {
        "not_trained": sorted(n for n, p in params.items() if not p.requires_grad),
        "not_in_buffers": sorted(n for n, p in params.items() if p not in model.param_to_bucket_group),
        "other_dtype": sorted(n for n, p in params.items() if p.dtype != config.params_dtype),
        "no_grad": sorted(n for n, p in params.items() if not bool(p.main_grad.abs().sum() > 0)),
    }
    for p in params.values():
        p.grad = p.main_grad.clone()
    adam = torch.optim.Adam(params.values(), lr=1e-3)
    adam.step()
    report["steps"] = sorted({float(s["step"]) for s in adam.state.values()})
    report["tracked"] = len(adam.state) == len(params)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=0.0, params_dtype=config.params_dtype,
                        use_distributed_optimizer=False), [model])
    state = optimizer.sharded_state_dict(model.module.sharded_state_dict(), is_loading=True)
    report["plain_loading_state"] = sorted(state)
    return report


def _spec(config):
    from regla_megatron.specs import get_hybrid_block_spec

    return get_hybrid_block_spec(config, backend="local")


def test_regla_hybrid_steps_every_parameter_alike():
    _native_adam_only()
    (report,) = run_distributed(_hybrid_worker, 1)
    assert report["not_trained"] == [] and report["not_in_buffers"] == [], report
    assert report["other_dtype"] == [] and report["no_grad"] == [], report
    assert report["tracked"] and report["steps"] == [1.0], report
    assert "state" in report["plain_loading_state"], report
