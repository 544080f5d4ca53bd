"""`regla_megatron.cpu_shim`: scoped, idempotent, correct, and loud when Megatron changes."""

import importlib

import pytest
import torch

from regla_megatron.cpu_shim import CUDA_CALLING_MODULES, apply_cpu_shim, megatron_version, patch_megatron_for_cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is a no-op with CUDA")


@pytest.fixture(scope="module", autouse=True)
def shim():
    assert apply_cpu_shim()


def megatron_torch():
    """What the patched Megatron modules see as `torch` (the shim's proxy)."""
    from megatron.core import utils

    return utils.torch


def test_idempotent_and_scoped_to_megatron():
    proxy = megatron_torch()
    assert apply_cpu_shim()
    patch_megatron_for_cpu()  # a second pass leaves the patched modules as they are
    assert proxy is not torch and megatron_torch() is proxy
    for name in CUDA_CALLING_MODULES:
        assert importlib.import_module(name).torch is proxy
    # torch itself is untouched: a CPU build asserts, a CUDA build with no visible GPU raises.
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()


def test_proxy_puts_cuda_requests_on_cpu():
    proxy = megatron_torch()
    assert proxy.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert proxy.empty(3, device=proxy.cuda.current_device()).device.type == "cpu"
    assert proxy.tensor([1, 2], device="cuda", pin_memory=True).tolist() == [1, 2]
    proxy.cuda.synchronize()
    proxy.cuda.current_stream().wait_stream(proxy.cuda.default_stream())
    assert proxy.float32 is torch.float32 and proxy.nn is torch.nn


def test_rng_tracker_forks_cpu_generator():
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
    tracker = mrandom.get_cuda_rng_tracker()
    torch.manual_seed(0)
    outer = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    with tracker.fork():
        second = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outer)  # caller's stream untouched
    assert not torch.equal(first, second)  # the tracked stream advances
    expected = torch.Generator().manual_seed(123 + 2718)  # Megatron's TP-rank-0 seed
    assert torch.equal(first, torch.rand(4, generator=expected))


class _Group:
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def test_rope_under_cp_keeps_chunks_r_and_2cp_minus_1_minus_r():
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding

    replaced = rope_utils.get_pos_emb_on_this_cp_rank
    assert replaced.__module__ == "regla_megatron.cpu_shim"
    assert rotary_pos_embedding.get_pos_emb_on_this_cp_rank is replaced  # every importer sees it
    emb = torch.arange(8.0).view(8, 1, 1, 1)
    got = [replaced(emb, 0, _Group(r, 2)).flatten().tolist() for r in (0, 1)]
    assert got == [[0, 1, 6, 7], [2, 3, 4, 5]]


@pytest.mark.parametrize(
    "module, attribute, value, message",
    [
        ("megatron.core.models.common.embeddings.rope_utils", "get_pos_emb_on_this_cp_rank", lambda emb: emb,
         "get_pos_emb_on_this_cp_rank"),
        ("megatron.core.transformer.utils", "torch", object(), "transformer.utils"),
        ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker", object, "CudaRNGStatesTracker"),
    ],
)
def test_fails_loudly_when_megatron_changes(monkeypatch, module, attribute, value, message):
    monkeypatch.setattr(importlib.import_module(module), attribute, value)
    with pytest.raises(RuntimeError, match=f"{message}.*{megatron_version()}"):
        patch_megatron_for_cpu()
