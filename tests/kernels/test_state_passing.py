"""State passing (REGLA_SPEC 4) without communication: segments + scan + correction == one pass."""

import pytest
import torch

from regla_kernels import (
    chunk_regla,
    cp_state_grad_scan,
    cp_state_scan,
    default_scale,
    inter_segment_output,
    segment_log_decay,
    sequence_key_max,
)

NAMES = ["q", "k", "v", "gate_logits", "refine_logits", "initial_state"]


def make_inputs(batch, length, heads, dk, dv, seed, logit_scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    draw = lambda d, s: s * torch.randn(batch, length, heads, d, generator=gen, dtype=torch.float64)
    state = torch.randn(batch, heads, dk, dv, generator=gen, dtype=torch.float64)
    return [draw(dk, 1.5), draw(dk, 1.5), draw(dv, 1.0), draw(dk, logit_scale), draw(dk, logit_scale), state]


def whole_sequence(q, k, v, z, u, state, backend):
    return chunk_regla(q, k, v, z, u, initial_state=state, output_final_state=True, backend=backend)


def by_segments(q, k, v, z, u, state, backend, bounds):
    """Local passes from zero state with the global key max, then scan and correction."""
    scale, key_max = default_scale(q.shape[-1]), sequence_key_max(k)
    pieces = [[x[:, a:b] for x in (q, k, v, z, u)] for a, b in zip(bounds[:-1], bounds[1:])]
    local = [chunk_regla(*p, scale=scale, key_max=key_max, output_final_state=True, backend=backend) for p in pieces]
    decays = torch.stack([segment_log_decay(p[3], p[4]) for p in pieces])
    incoming = cp_state_scan(torch.stack([s for _, s in local]), decays, initial_state=state)
    outputs = [
        o + inter_segment_output(p[0], p[3], p[4], s_in, scale) for (o, _), p, s_in in zip(local, pieces, incoming)
    ]
    # The final state of the whole sequence is one more scan step.
    final = torch.exp(decays[-1]).unsqueeze(-1) * incoming[-1] + local[-1][1]
    return torch.cat(outputs, dim=1), final


def value_and_grads(function, inputs, seed=11):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out, state = function(*leaves)
    gen = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    loss = loss + (state * torch.randn(state.shape, generator=gen, dtype=state.dtype)).sum()
    loss.backward()
    return out.detach(), state.detach(), [x.grad for x in leaves]


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("backend", ["torch", "naive"])
@pytest.mark.parametrize(
    "bounds", [[0, 64], [0, 16, 32, 48, 64], [0, 5, 37, 38, 64], [0, 8, 16, 24, 32, 40, 48, 56, 64]]
)
def test_segments_match_whole_sequence_fp64(backend, bounds):
    inputs = make_inputs(2, 64, 2, 8, 6, seed=len(bounds) + 3)
    out, state, grads = value_and_grads(lambda *x: by_segments(*x, backend, bounds), inputs)
    ref_out, ref_state, ref_grads = value_and_grads(lambda *x: whole_sequence(*x, backend), inputs)
    assert rel(out, ref_out) < 1e-12
    assert rel(state, ref_state) < 1e-12
    for name, grad, ref in zip(NAMES, grads, ref_grads):
        assert rel(grad, ref) < 1e-10, name


def test_scan_closed_form():
    """S_in(i) = sum_{j<i} Diag(exp(Lambda_{j+1} + ... + Lambda_{i-1})) S_loc(j) + decayed S_in(0)."""
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(5, 2, 3, 4, 6, generator=gen, dtype=torch.float64)
    decays = -torch.rand(5, 2, 3, 4, generator=gen, dtype=torch.float64)
    initial = torch.randn(2, 3, 4, 6, generator=gen, dtype=torch.float64)
    incoming = cp_state_scan(states, decays, initial)
    for i in range(5):
        expected = torch.exp(decays[:i].sum(0)).unsqueeze(-1) * initial
        for j in range(i):
            expected = expected + torch.exp(decays[j + 1 : i].sum(0)).unsqueeze(-1) * states[j]
        assert torch.allclose(incoming[i], expected, rtol=1e-13, atol=1e-13)


def test_grad_scan_is_the_backward_of_the_scan():
    """With L = sum_i <G_i, S_in(i)>: dL/dS_loc(j) = D(j + 1) and dL/dS_in(0) = D(0)."""
    gen = torch.Generator().manual_seed(1)
    states = torch.randn(4, 2, 3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    decays = -torch.rand(4, 2, 3, 4, generator=gen, dtype=torch.float64)
    initial = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    grads = torch.randn(4, 2, 3, 4, 5, generator=gen, dtype=torch.float64)
    (cp_state_scan(states, decays, initial) * grads).sum().backward()
    at_end, initial_grad = cp_state_grad_scan(grads, decays)
    assert torch.allclose(at_end, states.grad, rtol=1e-13, atol=1e-13)
    assert torch.allclose(initial_grad, initial.grad, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="log_decays"):
        cp_state_grad_scan(grads, decays[..., :2])


def test_dtypes_and_shapes():
    states = torch.randn(3, 1, 2, 4, 5, dtype=torch.bfloat16)
    assert cp_state_scan(states, torch.zeros(3, 1, 2, 4)).dtype == torch.float32
    q = torch.randn(1, 7, 2, 4, dtype=torch.bfloat16)
    assert segment_log_decay(q, q).shape == (1, 2, 4)
    out = inter_segment_output(q, q, q, torch.zeros(1, 2, 4, 5), 1.0)
    assert out.shape == (1, 7, 2, 5) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="log_decays"):
        cp_state_scan(states, torch.zeros(3, 1, 2, 5))
    with pytest.raises(ValueError, match="incoming_state"):
        inter_segment_output(q, q, q, torch.zeros(1, 2, 5, 5), 1.0)
