"""One-token decode steps against the chunked forward (REGLA_SPEC section 5).

The decode state is kept relative to a running key max m_t, the chunked forward uses the
sequence max M, so o_t differs by the positive factor exp(M - m_t) per (token, head):
compare outputs normalized per (token, head), and the final states once m_T = M.
"""

import pytest
import torch

from regla_kernels import chunk_regla, default_scale, regla_step


def _inputs(batch, length, heads, dk, dv, seed, logit_scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    draw = lambda d, s=1.0: s * torch.randn(batch, length, heads, d, generator=gen, dtype=torch.float64)
    # keys that rise over time, so the running max grows and the rescaling is exercised
    ramp = torch.linspace(-2.0, 2.0, length, dtype=torch.float64)[None, :, None, None]
    return draw(dk), draw(dk) + ramp, draw(dv), draw(dk, logit_scale) + 1.0, draw(dk, logit_scale)


def _decode(q, k, v, z, u, scale=None):
    state, running_max, outputs = None, None, []
    for t in range(q.shape[1]):
        o, state, running_max = regla_step(q[:, t], k[:, t], v[:, t], z[:, t], u[:, t], state, running_max, scale=scale)
        outputs.append(o)
    return torch.stack(outputs, dim=1), state, running_max


def _normalized(x):
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("shape", [(2, 37, 3, 8, 5), (1, 70, 2, 16, 16)])
def test_decode_matches_chunked_forward_up_to_output_norm(shape):
    q, k, v, z, u = _inputs(*shape, seed=sum(shape))
    o_dec, state_dec, running_max = _decode(q, k, v, z, u)
    o_ref, state_ref = chunk_regla(q, k, v, z, u, output_final_state=True, backend="torch")
    assert torch.allclose(_normalized(o_dec), _normalized(o_ref), rtol=1e-9, atol=1e-10)
    assert torch.equal(running_max, k.amax(dim=(1, 3)))
    assert torch.allclose(state_dec, state_ref, rtol=1e-9, atol=1e-12)


def test_decode_step_rescales_state_when_key_max_grows():
    q, k, v, z, u = _inputs(1, 2, 1, 4, 3, seed=5)
    k[:, 1] = k[:, 0] + 3.0  # the second key raises the max by 3
    _, state0, max0 = regla_step(q[:, 0], k[:, 0], v[:, 0], z[:, 0], u[:, 0], None, None)
    _, state1, max1 = regla_step(q[:, 1], k[:, 1], v[:, 1], z[:, 1], u[:, 1], state0, max0)
    assert torch.allclose(max1, max0 + 3.0)
    ref_o, ref_state = chunk_regla(q, k, v, z, u, key_max=max1, output_final_state=True, backend="naive")
    assert torch.allclose(state1, ref_state, rtol=1e-12)


def test_decode_dtypes_and_default_scale():
    q, k, v, z, u = (x.float() for x in _inputs(2, 1, 2, 8, 4, seed=6))
    o, state, running_max = regla_step(q[:, 0], k[:, 0], v[:, 0], z[:, 0], u[:, 0], None, None)
    o2, _, _ = regla_step(q[:, 0], k[:, 0], v[:, 0], z[:, 0], u[:, 0], None, None, scale=default_scale(8))
    assert o.dtype == torch.float32 and state.dtype == torch.float32 and running_max.shape == (2, 2)
    assert torch.equal(o, o2)
    with pytest.raises(ValueError, match=r"\[B, H, dk\]"):
        regla_step(q, k, v[:, 0], z, u, None, None)
