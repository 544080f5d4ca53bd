"""ReGLAMixer against REGLA_SPEC section 1 computed by hand in float64, and a hybrid GPTModel on CPU.

The reference below reads the module's weights but none of its code: its own head-major
unpacking, feature maps, probability-space gate, token loop, norms and output projection.
"""

import math

import pytest
import torch

from regla_megatron.config import ReGLAConfig

HIDDEN, HEADS, DK, DV = 32, 2, 16, 8
SEQ, BATCH = 12, 2


def mixer_config(**overrides):
    fields = dict(
        num_layers=2,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        regla_head_dim_k=DK,
        regla_head_dim_v=DV,
        params_dtype=torch.float64,
        use_cpu_initialization=True,
        regla_backend="torch",
    )
    fields.update(overrides)
    return ReGLAConfig(**fields)


def build_mixer(config):
    from megatron.core.transformer.spec_utils import build_module

    from regla_megatron.specs import get_regla_layer_spec

    mixer_spec = get_regla_layer_spec("local").submodules.self_attention
    mixer = build_module(mixer_spec, config=config, layer_number=1)
    with torch.no_grad():  # move every parameter off its trivial init so layouts matter
        mixer.gate_bias.copy_(torch.randn_like(mixer.gate_bias))
        mixer.out_norm.weight.copy_(1 + 0.5 * torch.randn_like(mixer.out_norm.weight))
        if mixer.out_norm.bias is not None:
            mixer.out_norm.bias.copy_(0.5 * torch.randn_like(mixer.out_norm.bias))
        if mixer.out_proj.bias is not None:
            mixer.out_proj.bias.copy_(torch.randn_like(mixer.out_proj.bias))
    return mixer


def reference(mixer, config, x, segments=None):
    """REGLA_SPEC 1 by hand. x [s, b, h] float64 -> [s, b, h] (out_proj bias excluded)."""
    seq, batch, _ = x.shape
    rank = config.regla_gate_rank
    widths = [DK, DK, DV] + ([DK, DK] if rank == 0 else []) + ([DV] if config.regla_output_gate else [])
    w_in = mixer.in_proj.weight.detach().double().view(HEADS, sum(widths), HIDDEN)
    bias = mixer.gate_bias.detach().double().view(HEADS, 2, DK)
    if rank:
        low = x @ mixer.gate_down_weight.detach().double().T
        w_up = mixer.gate_up.weight.detach().double().view(HEADS, 2 * DK, rank)
    norm_w = mixer.out_norm.weight.detach().double()
    norm_b = None if mixer.out_norm.bias is None else mixer.out_norm.bias.detach().double()
    alpha = 1.0 / (math.e * math.sqrt(DK * (math.e**2 - 1.0)))
    segments = segments or [(0, seq)]
    heads_out = []
    for head in range(HEADS):
        proj = torch.einsum("sbh,wh->sbw", x, w_in[head])
        parts = dict(zip(["q", "k", "v", "z", "u", "og"][: len(widths)] if rank == 0 else ["q", "k", "v", "og"],
                         proj.split(widths, dim=-1)))
        if rank:
            zu = torch.einsum("sbr,wr->sbw", low, w_up[head])
            parts["z"], parts["u"] = zu[..., :DK], zu[..., DK:]
        z, u = parts["z"] + bias[head, 0], parts["u"] + bias[head, 1]
        g, r = torch.sigmoid(z), torch.sigmoid(u)
        forget = (1 - r) * g**2 + r * (1 - (1 - g) ** 2)
        q, k, v = parts["q"], parts["k"], parts["v"]
        out = torch.zeros(seq, batch, DV, dtype=torch.float64)
        for start, end in segments:
            key_max = k[start:end].detach().amax(dim=(0, 2))  # [b]: positions and features; a constant
            state = torch.zeros(batch, DK, DV, dtype=torch.float64)
            for t in range(start, end):
                phi_q = torch.exp(q[t] - q[t].detach().amax(dim=-1, keepdim=True))
                phi_k = torch.exp(k[t] - key_max[:, None])
                state = forget[t][:, :, None] * state + phi_k[:, :, None] * v[t][:, None, :]
                out[t] = alpha * torch.einsum("bk,bkv->bv", phi_q, state)
        if config.regla_norm == "rmsnorm":
            out = out / torch.sqrt(out.pow(2).mean(-1, keepdim=True) + config.regla_norm_eps) * norm_w[head]
        else:
            mean, var = out.mean(-1, keepdim=True), out.var(-1, unbiased=False, keepdim=True)
            out = (out - mean) / torch.sqrt(var + config.regla_norm_eps) * norm_w[head] + norm_b[head]
        if config.regla_output_gate:
            out = out * parts["og"] * torch.sigmoid(parts["og"])
        heads_out.append(out)
    return torch.cat(heads_out, dim=-1) @ mixer.out_proj.weight.detach().double().T


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(regla_norm="layernorm"),
        dict(regla_output_gate=True),
        dict(regla_gate_rank=4),
        dict(regla_gate_rank=4, regla_norm="layernorm", regla_output_gate=True, regla_gate_bias_init=1.5),
    ],
    ids=["rmsnorm", "layernorm", "output_gate", "low_rank", "all_options"],
)
def test_mixer_matches_spec(megatron_single_process, overrides):
    config = mixer_config(**overrides)
    mixer = build_mixer(config)
    x = torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64)
    out, bias = mixer(x)
    assert out.shape == (SEQ, BATCH, HIDDEN) and out.dtype == torch.float64
    assert torch.equal(bias, mixer.out_proj.bias)
    torch.testing.assert_close(out, reference(mixer, config, x), rtol=1e-9, atol=1e-10)


def test_gate_bias_starts_at_configured_value(megatron_single_process):
    from megatron.core.transformer.spec_utils import build_module

    from regla_megatron.specs import get_regla_layer_spec

    mixer = build_module(get_regla_layer_spec("local").submodules.self_attention,
                         config=mixer_config(regla_gate_bias_init=2.0), layer_number=1)
    assert torch.all(mixer.gate_bias == 2.0) and mixer.gate_bias.shape == (HEADS, 2 * DK)
    assert mixer.gate_bias.tensor_model_parallel and mixer.out_norm.weight.partition_dim == 0


def test_input_gradient_matches_spec(megatron_single_process):
    config = mixer_config(regla_output_gate=True)
    mixer = build_mixer(config)
    x = torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64, requires_grad=True)
    cotangent = torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64)
    (got,) = torch.autograd.grad(mixer(x)[0], x, cotangent)
    (want,) = torch.autograd.grad(reference(mixer, config, x), x, cotangent)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("overrides", [dict(regla_output_gate=True), dict(regla_gate_rank=4)], ids=["full_rank", "low_rank"])
def test_projection_gradients_arrive_in_the_projection_layout(megatron_single_process, overrides):
    """The gradients of the in_proj (and gate_up) outputs come back as contiguous [s, b, ...]
    tensors: the pieces are split before they are transposed to [b, s], so the backward
    concatenates straight into the projection's layout and its linear layer copies nothing."""
    mixer = build_mixer(mixer_config(**overrides))
    seen = {}

    def watch(name):
        def hook(module, args, output):
            output[0].register_hook(lambda grad: seen.__setitem__(name, (grad.is_contiguous(), grad.shape)))

        return hook

    mixer.in_proj.register_forward_hook(watch("in_proj"))
    if overrides.get("regla_gate_rank"):
        mixer.gate_up.register_forward_hook(watch("gate_up"))
    x = torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64, requires_grad=True)
    mixer(x)[0].square().sum().backward()
    assert set(seen) == ({"in_proj", "gate_up"} if overrides.get("regla_gate_rank") else {"in_proj"})
    for name, (contiguous, shape) in seen.items():
        assert contiguous and shape[:2] == (SEQ, BATCH), (name, shape)


def test_packed_sequences_restart_state_and_key_max(megatron_single_process):
    from megatron.core.packed_seq_params import PackedSeqParams

    config = mixer_config()
    mixer = build_mixer(config)
    x = torch.randn(SEQ, 1, HIDDEN, dtype=torch.float64)
    cu = torch.tensor([0, 5, SEQ], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    out, _ = mixer(x, packed_seq_params=packed)
    torch.testing.assert_close(out, reference(mixer, config, x, segments=[(0, 5), (5, SEQ)]), rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="packed sequences .* need micro-batch size 1"):
        mixer(torch.randn(SEQ, 2, HIDDEN, dtype=torch.float64), packed_seq_params=packed)


def test_inference_is_a_clear_error(megatron_single_process):
    mixer = build_mixer(mixer_config())
    with pytest.raises(NotImplementedError, match="ReGLA decoding through Megatron inference is not supported yet"):
        mixer(torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64), inference_context=object())


def hybrid_config(**overrides):
    fields = dict(
        num_layers=4,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        ffn_hidden_size=64,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        normalization="RMSNorm",
        transformer_impl="local",
        regla_pattern="R*R*",
        regla_backend="torch",
    )
    fields.update(overrides)
    return ReGLAConfig(**fields)


def test_hybrid_gpt_forward_backward(megatron_single_process):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.attention import SelfAttention

    from regla_megatron.mixer import ReGLAMixer
    from regla_megatron.norms import SequenceParallelNorm
    from regla_megatron.specs import get_hybrid_block_spec

    config = hybrid_config()
    model = GPTModel(config=config, transformer_layer_spec=get_hybrid_block_spec(config),
                     vocab_size=64, max_sequence_length=16, position_embedding_type="rope")
    kinds = [type(layer.self_attention) for layer in model.decoder.layers]
    assert kinds == [ReGLAMixer, SelfAttention, ReGLAMixer, SelfAttention]
    assert isinstance(model.decoder.final_layernorm, SequenceParallelNorm)
    tokens = torch.randint(0, 64, (2, 16))
    positions = torch.arange(16).expand(2, -1)
    loss = model(tokens, positions, None, labels=tokens)
    assert loss.shape == (2, 16) and torch.isfinite(loss).all()
    loss.mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert model.decoder.layers[0].self_attention.gate_bias.grad.abs().sum() > 0

    sharded = model.sharded_state_dict()
    gate_bias = sharded["decoder.layers.0.self_attention.gate_bias"]
    assert gate_bias.global_shape == (HEADS, 2 * (HIDDEN // HEADS))
    assert sharded["decoder.layers.0.self_attention.out_norm.weight"].global_shape == (HEADS, HIDDEN // HEADS)
    # Mixed layer types are saved per layer (no stacked PP axis).
    assert gate_bias.key == "decoder.layers.0.self_attention.gate_bias"


@pytest.mark.parametrize("pp_rank, vp_stage, want", [(0, 0, "R*"), (1, 0, "RR"), (0, 1, "**"), (1, 1, "R*")])
def test_block_spec_holds_this_stage_layers(megatron_single_process, pp_rank, vp_stage, want):
    from regla_megatron.mixer import ReGLAMixer
    from regla_megatron.specs import get_hybrid_block_spec

    config = hybrid_config(num_layers=8, regla_pattern="R*RR**R*", pipeline_model_parallel_size=2,
                           virtual_pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    block = get_hybrid_block_spec(config, vp_stage=vp_stage, pp_rank=pp_rank)
    got = "".join("R" if spec.submodules.self_attention.module is ReGLAMixer else "*" for spec in block.layer_specs)
    assert got == want


def test_static_dispatch_spec_builds_the_pattern(megatron_single_process):
    from megatron.core.models.gpt import GPTModel

    from regla_megatron.mixer import ReGLAMixer
    from regla_megatron.specs import regla_hybrid_spec

    config = hybrid_config(regla_pattern="*RR*")
    model = GPTModel(config=config, transformer_layer_spec=regla_hybrid_spec, vocab_size=64, max_sequence_length=16)
    got = "".join("R" if isinstance(layer.self_attention, ReGLAMixer) else "*" for layer in model.decoder.layers)
    assert got == "*RR*"
    assert [layer.layer_number for layer in model.decoder.layers] == [1, 2, 3, 4]


def test_plain_transformer_config_takes_regla_options_from_env(megatron_single_process, monkeypatch):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from regla_megatron.mixer import ReGLAMixer
    from regla_megatron.specs import regla_spec

    monkeypatch.setenv("REGLA_PATTERN", "*R")
    plain = TransformerConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS,
                              transformer_impl="local", use_cpu_initialization=True)
    block = regla_spec(plain)
    kinds = ["R" if spec.submodules.self_attention.module is ReGLAMixer else "*" for spec in block.layer_specs]
    assert kinds == ["*", "R"]
    assert plain.hetereogenous_dist_checkpoint  # the config the model is built with


def test_context_parallel_hands_views_and_options_to_state_passing(megatron_single_process, monkeypatch):
    import regla_megatron.mixer as mixer_module

    calls = []

    def fake_context_parallel_regla(q, k, v, gate_logits, refine_logits, *, scale, cp_group, layout, backend, cu_seqlens,
                                    overlap_forward):
        calls.append(dict(shapes=[tuple(x.shape) for x in (q, k, v, gate_logits, refine_logits)],
                          scale=scale, cp_group=cp_group, layout=layout, backend=backend, cu_seqlens=cu_seqlens,
                          overlap_forward=overlap_forward))
        return torch.zeros(*v.shape, dtype=q.dtype)

    monkeypatch.setattr(mixer_module, "context_parallel_regla", fake_context_parallel_regla)
    config = mixer_config(context_parallel_size=2, regla_cp_layout="contiguous")
    mixer = build_mixer(config)
    mixer(torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64))
    (call,) = calls
    assert call["shapes"] == [(BATCH, SEQ, HEADS, DK)] * 2 + [(BATCH, SEQ, HEADS, DV)] + [(BATCH, SEQ, HEADS, DK)] * 2
    assert call["layout"] == "contiguous" and call["backend"] == "torch" and call["cp_group"] is mixer.cp_group
    assert call["cu_seqlens"] is None and call["overlap_forward"] is False  # not packed; the default
    assert call["scale"] == pytest.approx(1.0 / (math.e * math.sqrt(DK * (math.e**2 - 1.0))))


def test_low_memory_option_reaches_the_kernels(megatron_single_process, monkeypatch):
    """regla_low_memory (--regla-low-memory) is handed to chunk_regla, as "backward" with
    regla_low_memory_keep_gates; off by default."""
    import regla_megatron.mixer as mixer_module

    seen = []
    real = mixer_module.chunk_regla

    def recording_chunk_regla(*args, **kwargs):
        seen.append(kwargs.get("low_memory"))
        return real(*args, **kwargs)

    monkeypatch.setattr(mixer_module, "chunk_regla", recording_chunk_regla)
    x = torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64)
    for options in ({}, {"regla_low_memory": True}, {"regla_low_memory": True, "regla_low_memory_keep_gates": True}):
        build_mixer(mixer_config(**options))(x)
    assert seen == [False, True, "backward"]


def test_local_softmax_layers_use_sdpa_and_cp_attention_under_context_parallelism(megatron_single_process):
    from regla_megatron.attention import SDPADotProductAttention
    from regla_megatron.context_parallel.attention import ContextParallelDotProductAttention
    from regla_megatron.specs import get_hybrid_block_spec

    def core_attentions(config):
        block = get_hybrid_block_spec(config, backend="local")
        return [spec.submodules.self_attention.submodules.core_attention for spec in block.layer_specs[1::2]]

    assert core_attentions(hybrid_config()) == [SDPADotProductAttention] * 2
    assert core_attentions(hybrid_config(context_parallel_size=2)) == [ContextParallelDotProductAttention] * 2
