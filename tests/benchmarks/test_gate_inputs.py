"""benchmarks/gate_inputs.py: the adversarial gates are what they claim, and a model's inputs are
captured as its ReGLA layers hand them to chunk_regla (gate biases folded in)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks"))

from gate_inputs import ADVERSARIAL, capture_model_inputs, random_inputs, slow_chunk_share  # noqa: E402

from regla_kernels import refined_log_gate  # noqa: E402


def _sets(kind_set="adversarial", heads=3, length=130):
    return dict(random_inputs(2, length, heads, 16, torch.float32, "cpu", kind_set, seed=torch.seed() % 2**31))


def test_adversarial_gates_are_the_documented_distributions():
    sets = _sets()
    assert sorted(sets) == sorted(ADVERSARIAL)
    for kind, (q, _, _, z, u) in sets.items():
        assert z.shape == u.shape == q.shape == (2, 130, 3, 16) and torch.isfinite(z).all(), kind
    log_f = refined_log_gate(*sets["constant"][3:5])
    assert torch.equal(log_f, log_f[:1, :1].expand_as(log_f))  # constant over batch and time
    forget = log_f.exp()
    assert forget.min() >= 1e-4 * 0.999 and forget.max() <= 0.9999 * 1.0001
    torch.testing.assert_close(refined_log_gate(*sets["long"][3:5]).exp(), torch.full_like(forget, 0.9999))
    assert set(sets["saturated"][3].unique().tolist()) == {-30.0, 30.0}
    mixed_z = sets["mixed"][3]  # head 1 saturated, heads 0 and 2 constant over time
    assert set(mixed_z[:, :, 1].unique().tolist()) <= {-30.0, 30.0}
    assert torch.equal(mixed_z[:, :, 0], mixed_z[:1, :1, 0].expand_as(mixed_z[:, :, 0]))


def test_slow_chunk_share_counts_chunks_that_decay_below_the_limit():
    sets = _sets(length=192)
    assert slow_chunk_share(*sets["long"][3:5]) == 0.0
    z = torch.full((1, 192, 2, 16), -9.0)  # gate ~1.2e-4 (log -9) per token: -576 per chunk
    assert slow_chunk_share(z, torch.zeros_like(z)) == 1.0
    assert slow_chunk_share(*_sets("randn", length=192)["randn"][3:5]) == 0.0


def test_model_inputs_are_captured_with_the_gate_biases(megatron_single_process):
    """The captured logits carry the biases (the kernels then get none) and the pass computes what
    the model computes without the capture; a capture that dropped the biases would change it."""
    from megatron.core.models.gpt import GPTModel

    import regla_megatron.mixer as mixer
    from regla_megatron.config import ReGLAConfig
    from regla_megatron.specs import get_hybrid_block_spec
    from tests.support.distributed import tiny_config

    def build():
        torch.manual_seed(0)
        config = tiny_config(ReGLAConfig, num_layers=4, regla_pattern="R*R*", regla_backend="torch")
        model = GPTModel(config, get_hybrid_block_spec(config, backend="local"), vocab_size=64, max_sequence_length=32,
                         position_embedding_type="rope")
        for module in model.modules():
            if isinstance(module, mixer.ReGLAMixer):
                torch.nn.init.normal_(module.gate_bias, mean=2.0, std=2.0)
        return model

    tokens = torch.randint(0, 64, (2, 32))
    with torch.no_grad():
        plain = build()(tokens, torch.arange(32).expand(2, 32), None)
    outputs = []
    sets = capture_model_inputs(build, tokens, outputs)
    assert [name for name, _ in sets] == ["layer 1", "layer 2"]  # the two ReGLA layers of R*R*
    assert mixer.chunk_regla.__name__ == "chunk_regla"  # restored
    assert all(x.shape[:3] == (2, 32, 4) for _, inputs in sets for x in inputs)
    torch.testing.assert_close(outputs[0], plain, rtol=1e-6, atol=1e-6)
    without_bias = build()
    for module in without_bias.modules():
        if isinstance(module, mixer.ReGLAMixer):
            torch.nn.init.zeros_(module.gate_bias)
    with torch.no_grad():
        assert not torch.allclose(without_bias(tokens, torch.arange(32).expand(2, 32), None), plain, atol=1e-3)


@pytest.mark.parametrize("kind", ["nonsense"])
def test_unknown_gate_kind_is_an_error(kind):
    with pytest.raises(ValueError, match="gates must be"):
        random_inputs(1, 8, 1, 16, torch.float32, "cpu", kind)
