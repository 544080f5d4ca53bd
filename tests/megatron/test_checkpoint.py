"""Megatron distributed checkpoints of the ReGLA/softmax hybrid reshard across TP sizes.

A model saved with `dist_checkpointing.save(model.sharded_state_dict(), dir)` at TP=1
and loaded into a differently initialized model at TP=2 gives the same logits (and
the reverse, TP=2 -> TP=1). The pattern 'R*R*' mixes layer types, which needs
non-homogeneous layers in the sharded state dict (MEGATRON_NOTES, checkpoint traps).
"""

import torch

from tests.support.distributed import (
    build_gpt,
    init_parallel,
    make_batches,
    run_distributed,
    tiny_hybrid_config,
)

PATTERN = "R*R*"
RTOL = 1e-5


def _model(seed):
    from regla_megatron.specs import get_hybrid_block_spec

    config = tiny_hybrid_config(PATTERN)
    model = build_gpt(config, get_hybrid_block_spec(config, backend="local"), seed=seed)
    return model.eval()


def _full_logits(model):
    """Logits [b, s, vocab] on a fixed batch, gathered over the TP-split vocab."""
    from megatron.core import parallel_state

    batch = make_batches(1, seed=7)[0]
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], attention_mask=None)
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(group.size())]
    torch.distributed.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _worker(rank, world_size, tp, load_dir, save_dir):
    """Load `load_dir` (if any) into a fresh model, then save a new model to `save_dir`.

    Returns (logits after loading or None, logits of the saved model or None, whether
    loading changed the logits, the saved checkpoint keys) for rank 0.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    init_parallel(tp=tp)
    loaded = changed = saved = keys = None
    if load_dir:
        model = _model(seed=11)
        before = _full_logits(model)
        state = dist_checkpointing.load(model.sharded_state_dict(), load_dir)
        model.load_state_dict(state)
        loaded = _full_logits(model)
        changed = not torch.allclose(before, loaded)
    if save_dir:
        model = _model(seed=22)
        saved = _full_logits(model)
        sharded = model.sharded_state_dict()
        keys = sorted({v.key for v in nested_values(sharded) if hasattr(v, "key")})
        dist_checkpointing.save(sharded, save_dir)
    return (loaded, saved, changed, keys) if rank == 0 else None


def _assert_same(got, ref):
    err = (got - ref).abs().max().item()
    assert err <= RTOL * ref.abs().max().item(), f"logits differ after reload: max err {err}"


def test_tp1_to_tp2_and_back(tmp_path):
    tp1_dir, tp2_dir = tmp_path / "saved_at_tp1", tmp_path / "saved_at_tp2"
    tp1_dir.mkdir()
    tp2_dir.mkdir()

    _, saved_tp1, _, keys = run_distributed(_worker, 1, 1, None, str(tp1_dir))[0]
    # Non-homogeneous layers: each layer saved under its own global index, not stacked.
    for layer in range(len(PATTERN)):
        assert any(k.startswith(f"decoder.layers.{layer}.") for k in keys), keys

    loaded_tp2, saved_tp2, changed, _ = run_distributed(_worker, 2, 2, str(tp1_dir), str(tp2_dir))[0]
    assert changed, "loading did not change the model: the check below would prove nothing"
    _assert_same(loaded_tp2, saved_tp1)

    loaded_tp1, _, changed, _ = run_distributed(_worker, 1, 1, str(tp2_dir), None)[0]
    assert changed
    _assert_same(loaded_tp1, saved_tp2)
