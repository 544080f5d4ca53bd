"""An fp64 ReGLA recurrence written straight from REGLA_SPEC section 1, for tests only.

Deliberately independent of `regla_kernels.gating`: sigmoids in probability space,
maxima taken inline, alpha from its formula.
"""

import math

import torch


def spec_forget_gate(z, u):
    """F = g^2 + 2 r g (1 - g) (REGLA_SPEC 1), with 1 - g taken as sigmoid(-z): a sum of
    positive terms, so F keeps full relative precision for saturated logits."""
    g, r = torch.sigmoid(z), torch.sigmoid(u)
    return g * g + 2 * r * g * torch.sigmoid(-z)


def spec_regla(q, k, v, z, u, initial_state=None, key_max=None, scale=None):
    """Inputs [B, T, H, d] (float64 recommended); returns (o [B, T, H, dv], state [B, H, dk, dv])."""
    batch, length, heads, dk = q.shape
    q, k, v, z, u = (x.double() for x in (q, k, v, z, u))
    if scale is None:
        scale = 1.0 / (math.e * math.sqrt(dk * (math.e**2 - 1.0)))
    if key_max is None:
        key_max = k.detach().amax(dim=(1, 3))
    phi_q = torch.exp(q - q.detach().amax(dim=-1, keepdim=True))
    phi_k = torch.exp(k - key_max.detach().double()[:, None, :, None])
    forget = spec_forget_gate(z, u)
    state = torch.zeros(batch, heads, dk, v.shape[-1], dtype=torch.float64)
    if initial_state is not None:
        state = state + initial_state.double()
    outputs = []
    for t in range(length):
        state = forget[:, t, :, :, None] * state + phi_k[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append(scale * (phi_q[:, t, :, :, None] * state).sum(dim=2))
    return torch.stack(outputs, dim=1), state
