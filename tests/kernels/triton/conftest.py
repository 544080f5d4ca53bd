"""Fixtures of the interpreter tests."""

import pytest


@pytest.fixture
def launch():
    """`regla_kernels.triton.settings.LAUNCH`, for a test to change; restored afterwards."""
    from regla_kernels.triton.settings import LAUNCH

    saved = dict(LAUNCH)
    yield LAUNCH
    LAUNCH.clear()
    LAUNCH.update(saved)
