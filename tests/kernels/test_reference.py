"""The torch implementations behind `chunk_regla` against the fp64 spec recurrence."""

import pytest
import torch

import regla_kernels
from regla_kernels import chunk_regla
from tests.support.spec_oracle import spec_forget_gate, spec_regla

TORCH_BACKENDS = ["naive", "torch"]


def random_inputs(batch, length, heads, dk, dv, dtype=torch.float64, logit_scale=1.0, qk_scale=1.0, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    draw = lambda d, s: (s * torch.randn(batch, length, heads, d, generator=gen, dtype=torch.float64)).to(dtype)
    q, k = draw(dk, qk_scale), draw(dk, qk_scale)
    v = draw(dv, 1.0)
    z, u = draw(dk, logit_scale), draw(dk, logit_scale)
    state = torch.randn(batch, heads, dk, dv, generator=gen, dtype=torch.float64).to(dtype)
    return [q, k, v, z, u, state]


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-300)).item()


def grads_of(function, inputs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out, state = function(*leaves)
    gen = torch.Generator().manual_seed(7)
    weight_o = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    weight_s = torch.randn(state.shape, generator=gen, dtype=torch.float64)
    loss = (out.double() * weight_o).sum() + (state.double() * weight_s).sum()
    loss.backward()
    return out.detach(), state.detach(), [x.grad for x in leaves]


def backend_call(backend):
    return lambda q, k, v, z, u, s: chunk_regla(q, k, v, z, u, initial_state=s, output_final_state=True, backend=backend)


NAMES = ["q", "k", "v", "gate_logits", "refine_logits", "initial_state"]


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 37, 3, 8, 5), (1, 70, 2, 16, 16), (3, 1, 1, 4, 6)])
def test_matches_spec_fp64_forward_and_grads(backend, shape):
    inputs = random_inputs(*shape, logit_scale=2.0, qk_scale=2.0)
    out, state, grads = grads_of(backend_call(backend), inputs)
    ref_out, ref_state, ref_grads = grads_of(spec_regla, inputs)
    assert relative_error(out, ref_out) < 1e-12
    assert relative_error(state, ref_state) < 1e-12
    for name, grad, ref in zip(NAMES, grads, ref_grads):
        assert relative_error(grad, ref) < 1e-10, name


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_fp32_inputs_within_fp32_rounding(backend):
    inputs = random_inputs(2, 45, 2, 16, 8, logit_scale=2.0)
    out, state, grads = grads_of(backend_call(backend), [x.float() for x in inputs])
    ref_out, ref_state, ref_grads = grads_of(spec_regla, inputs)
    assert out.dtype == torch.float32 and state.dtype == torch.float32
    # fp32 accumulation over <= 45 steps: a few hundred ulps at most.
    assert relative_error(out, ref_out) < 1e-5
    assert relative_error(state, ref_state) < 1e-5
    for name, grad, ref in zip(NAMES, grads, ref_grads):
        assert relative_error(grad, ref) < 1e-4, name


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("qk_scale", [1.0, 50.0])
def test_saturated_gates_and_large_qk_stay_finite(backend, dtype, qk_scale):
    inputs = random_inputs(1, 53, 2, 8, 8, dtype=dtype, qk_scale=qk_scale)
    signs = torch.where(torch.rand(inputs[3].shape) < 0.5, -30.0, 30.0).to(dtype)
    inputs[3] = signs
    inputs[4] = -signs.flip(1)
    out, state, grads = grads_of(backend_call(backend), inputs)
    ref_out, ref_state, ref_grads = grads_of(spec_regla, [x.double() for x in inputs])
    for tensor in [out, state, *grads]:
        assert torch.isfinite(tensor).all()
    # exp(x) has condition number |x|: fp32 feature maps of |q|, |k| ~ 3 * qk_scale carry
    # relative error ~ 3 * qk_scale * 6e-8 before any accumulation.
    tol = 1e-12 if dtype == torch.float64 else 1e-5 * qk_scale
    assert relative_error(out, ref_out) < tol
    assert relative_error(state, ref_state) < tol
    # Saturated logits have gradients of 1e-13 and below, which a chunked form obtains as
    # differences of O(1) terms: judge every gradient against the largest gradient entry
    # (the scale an optimizer sees), i.e. rounding of the whole gradient, not per tensor.
    gradient_scale = max(ref.abs().max() for ref in ref_grads)
    for name, grad, ref in zip(NAMES, grads, ref_grads):
        assert ((grad.double() - ref).abs().max() / gradient_scale).item() < tol, name


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_split_sequence_with_carried_state_equals_whole(backend):
    q, k, v, z, u, s0 = random_inputs(2, 61, 2, 8, 4)
    key_max = k.amax(dim=(1, 3))
    whole, whole_state = chunk_regla(q, k, v, z, u, key_max=key_max, initial_state=s0, output_final_state=True, backend=backend)
    cut = 29
    first, mid_state = chunk_regla(*(x[:, :cut] for x in (q, k, v, z, u)), key_max=key_max, initial_state=s0,
                                   output_final_state=True, backend=backend)
    second, end_state = chunk_regla(*(x[:, cut:] for x in (q, k, v, z, u)), key_max=key_max, initial_state=mid_state,
                                    output_final_state=True, backend=backend)
    assert relative_error(torch.cat([first, second], dim=1), whole) < 1e-12
    assert relative_error(end_state, whole_state) < 1e-12


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_packed_sequences_equal_separate_calls(backend):
    lengths = [5, 33, 12]
    parts = [random_inputs(1, n, 2, 8, 4) for n in lengths]
    packed = [torch.cat([p[i] for p in parts], dim=1) for i in range(5)]
    states = torch.cat([p[5] for p in parts], dim=0)
    cu_seqlens = torch.tensor([0, 5, 38, 50], dtype=torch.int32)
    out, final = chunk_regla(*packed, initial_state=states, output_final_state=True, cu_seqlens=cu_seqlens, backend=backend)
    for n, part in enumerate(parts):
        ref_out, ref_state = spec_regla(*part[:5], initial_state=part[5])
        sl = slice(cu_seqlens[n].item(), cu_seqlens[n + 1].item())
        assert relative_error(out[:, sl], ref_out) < 1e-12
        assert relative_error(final[n : n + 1], ref_state) < 1e-12


def test_output_dtype_follows_q_and_state_is_fp32():
    q, k, v, z, u, _ = random_inputs(1, 20, 2, 8, 8, dtype=torch.bfloat16)
    out, state = chunk_regla(q, k, v, z, u, output_final_state=True, backend="torch")
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert chunk_regla(q, k, v, z, u, backend="torch")[1] is None


def test_refined_gate_is_the_spec_formula_and_bounded():
    z = torch.linspace(-40, 40, 81, dtype=torch.float64)[:, None]
    u = torch.linspace(-40, 40, 81, dtype=torch.float64)[None, :]
    g, r = torch.sigmoid(z), torch.sigmoid(u)
    assert torch.allclose(spec_forget_gate(z, u), (1 - r) * g**2 + r * (1 - (1 - g) ** 2), atol=1e-15)
    expected = spec_forget_gate(z, u)
    log_f = regla_kernels.refined_log_gate(z.expand(81, 81), u.expand(81, 81))
    assert (log_f <= 0).all() and torch.isfinite(log_f).all()
    assert torch.allclose(torch.exp(log_f), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(k=a["k"][..., :4]), "k must have q's shape"),
        (lambda a: a.update(v=a["v"][:, :3]), "v must be"),
        (lambda a: a.update(key_max=torch.zeros(3, 3)), "key_max must be"),
        (lambda a: a.update(initial_state=torch.zeros(2, 2, 8, 3)), "initial_state must be"),
        (lambda a: a.update(backend="cuda-magic"), "unknown backend"),
        (lambda a: a.update(cu_seqlens=torch.tensor([0, 3, 9])), "batch must be 1"),
        (lambda a: a.update(low_memory="yes"), "low_memory='yes'"),
        (lambda a: a.update(gate_bias=torch.zeros(2, 8)), r"gate_bias must be \[H, 2 dk\] = \[2, 16\]"),
    ],
)
def test_bad_input_names_the_problem(change, message):
    q, k, v, z, u, s = random_inputs(2, 9, 2, 8, 4)
    arguments = dict(q=q, k=k, v=v, gate_logits=z, refine_logits=u)
    change(arguments)
    with pytest.raises((ValueError, TypeError, NotImplementedError), match=message):
        chunk_regla(**arguments)


def test_split_features_gradient_equals_torch_split():
    """`split_features` gives torch.split's views and, whatever the row strides of the pieces'
    gradients (here a strided view of a pair buffer, as the Triton kernels return dq and dk) and
    with a piece left without a gradient, torch.split's gradient of the fused tensor."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 3, 2, 20, generator=gen, dtype=torch.float64)
    sizes = [8, 8, 4]
    pair = torch.randn(6, 3, 2, 2, 8, generator=gen, dtype=torch.float64)  # rows of 16: two pieces' gradients
    weight = torch.randn(6, 3, 2, 4, generator=gen, dtype=torch.float64)

    def grad_of(split):
        leaf = x.clone().requires_grad_(True)
        a, b, c = split(leaf)
        assert torch.equal(a, x[..., :8]) and torch.equal(c, x[..., 16:])
        torch.autograd.backward([a, c], [pair[..., 0, :], weight])  # b unused
        return leaf.grad

    got = grad_of(lambda t: regla_kernels.split_features(t, sizes))
    assert torch.equal(got, grad_of(lambda t: t.split(sizes, dim=-1)))
    assert torch.equal(got[..., 8:16], torch.zeros(6, 3, 2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="sum to 19"):
        regla_kernels.split_features(x, [8, 8, 3])


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_gate_bias_equals_biased_logits(backend):
    """chunk_regla(gate_bias=b) is the layer on gate_logits + b_g, refine_logits + b_r (each head's
    [b_g | b_r]), the bias's gradient that of the biased logits summed over tokens."""
    q, k, v, z, u, s = random_inputs(2, 9, 2, 8, 4)
    bias = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    o, _ = chunk_regla(q, k, v, z, u, gate_bias=bias, backend=backend)
    zb, ub = (z + bias[:, :8]).detach().requires_grad_(True), (u + bias[:, 8:]).detach().requires_grad_(True)
    want, _ = chunk_regla(q, k, v, zb, ub, backend=backend)
    weight = torch.randn(o.shape, dtype=torch.float64)
    (o * weight).sum().backward()
    (want * weight).sum().backward()
    assert torch.allclose(o, want, rtol=1e-12, atol=1e-12)
    assert torch.allclose(bias.grad, torch.cat([zb.grad.sum((0, 1)), ub.grad.sum((0, 1))], -1), rtol=1e-10, atol=1e-12)
