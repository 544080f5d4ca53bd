"""The Triton decode-step kernel in the interpreter against the torch step in fp64."""

import pytest
import torch

from regla_kernels import regla_step
from tests.kernels.triton.cases import relative_error

pytestmark = pytest.mark.interpreter


@pytest.mark.parametrize("dk, dv", [(16, 16), (32, 128)])
def test_decode_step_kernel_matches_torch_step(dk, dv):
    """Three steps of the Triton decode kernel (the running key max grows on the third) against
    the torch step in fp64."""
    gen = torch.Generator().manual_seed(dk + dv)
    draw = lambda d, shift=0.0: torch.randn(2, 3, d, generator=gen) + shift
    states = {"triton": (None, None), "torch": (None, None)}
    for step, shift in enumerate([0.0, -1.0, 2.0]):
        q, k, v, z, u = draw(dk), draw(dk, shift), draw(dv), draw(dk, 1.0), draw(dk)
        out = {}
        for backend in ("triton", "torch"):
            cast = (lambda x: x.double()) if backend == "torch" else (lambda x: x)
            state, running_max = states[backend]
            o, state, running_max = regla_step(*(cast(x) for x in (q, k, v, z, u)), state, running_max, backend=backend)
            states[backend] = (state, running_max)
            out[backend] = (o, state, running_max)
        for got, ref in zip(out["triton"], out["torch"]):
            error = relative_error(got, ref)
            assert error < 1e-5, (step, error)


def test_decode_step_errors_name_the_problem():
    x = torch.randn(1, 2, 24)
    with pytest.raises(ValueError, match=r"dk=24 unsupported"):
        regla_step(x, x, x, x, x, None, None, backend="triton")
    with pytest.raises(ValueError, match="both state and running_key_max"):
        regla_step(x, x, x, x, x, torch.zeros(1, 2, 24, 24), None, backend="torch")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        regla_step(x, x, x, x, x, None, None, backend="cuda")
