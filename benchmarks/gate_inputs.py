"""Inputs for the kernel benchmark by gate distribution: random, adversarial, or a model's own.

- `randn`: z ~ N(2, 1), u ~ N(0, 1) (every chunk takes the whole-chunk product kernels).
- `adversarial`: per-feature constant gates F log-uniform in [1e-4, 0.9999] (`constant`),
  saturated logits +-30 (`saturated`), a different one of these per head (`mixed`), and every
  gate near 1 (`long`: F = 0.9999, long memory).
- `model`: the q, k, v and logits (gate biases folded in) that each ReGLA layer of a GPTModel
  built from this plugin's specs hands `chunk_regla`, captured from one forward pass.

Every generator returns a list of input sets `(name, [q, k, v, z, u])`, tensors `[B, T, H, d]`.
"""

from typing import Callable, List, Optional, Tuple

import torch

ADVERSARIAL = ("constant", "saturated", "mixed", "long")
InputSet = Tuple[str, List[torch.Tensor]]


def logits_for_gate(forget: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits (z, u) whose refined gate is `forget` (fp32, in (0, 1)): with u = 0 (r = 1/2),
    F = g^2 + g (1 - g) = g, so z = logit(F)."""
    return torch.logit(forget.double()).float(), torch.zeros_like(forget, dtype=torch.float32)


def adversarial_logits(kind: str, batch: int, length: int, heads: int, d: int, gen: torch.Generator,
                       device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gate and refine logits [B, T, H, d] (fp32) of one adversarial kind (see ADVERSARIAL)."""
    shape = (batch, length, heads, d)
    if kind == "constant":  # one gate per (head, feature), constant over time, log-uniform
        log_f = torch.empty(heads, d, device=device).uniform_(torch.log(torch.tensor(1e-4)).item(),
                                                              torch.log(torch.tensor(0.9999)).item(), generator=gen)
        z, u = logits_for_gate(log_f.exp())
        return z.expand(shape).contiguous(), u.expand(shape).contiguous()
    if kind == "saturated":
        sign = lambda: torch.where(torch.rand(shape, device=device, generator=gen) < 0.5, -30.0, 30.0)
        return sign(), sign()
    if kind == "long":
        z, u = logits_for_gate(torch.full((heads, d), 0.9999, device=device))
        return z.expand(shape).contiguous(), u.expand(shape).contiguous()
    if kind == "mixed":  # head h takes kind h mod 3 of constant, saturated, long
        parts = [adversarial_logits(("constant", "saturated", "long")[h % 3], batch, length, 1, d, gen, device)
                 for h in range(heads)]
        return torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)
    raise ValueError(f"unknown adversarial gate kind {kind!r}; choose one of {ADVERSARIAL}")


def random_inputs(batch: int, length: int, heads: int, d: int, dtype, device, gates: str, seed: int = 0,
                  gate_mean: float = 2.0, gate_std: float = 1.0) -> List[InputSet]:
    """Input sets for `gates` 'randn' (one set) or 'adversarial' (one set per kind)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    draw = lambda: torch.randn(batch, length, heads, d, generator=gen, device=device)
    q, k, v = draw(), draw(), draw()
    if gates == "randn":
        sets = [("randn", (gate_std * draw() + gate_mean, draw()))]
    elif gates == "adversarial":
        sets = [(kind, adversarial_logits(kind, batch, length, heads, d, gen, device)) for kind in ADVERSARIAL]
    else:
        raise ValueError(f"random_inputs: gates must be 'randn' or 'adversarial', got {gates!r}")
    return [(name, [x.to(dtype) for x in (q, k, v, z, u)]) for name, (z, u) in sets]


def capture_model_inputs(build: Callable, tokens: torch.Tensor, outputs: Optional[list] = None) -> List[InputSet]:
    """The inputs every ReGLA layer of a model hands `chunk_regla` in one forward pass.

    build: () -> a Megatron GPTModel (any wrapper) built from this plugin's specs.
    tokens: [B, T] int64 on the model's device.
    outputs: if given, the model's output of that pass is appended to it.
    Returns one set per ReGLA layer, in layer order, named 'layer N' (1-based, counting ReGLA
    layers only), the gate biases added to the logits, detached copies in the inputs' dtype.
    """
    import regla_megatron.mixer as mixer
    from regla_kernels.gating import add_gate_bias

    captured = []
    original = mixer.chunk_regla

    def recording(q, k, v, z, u, *args, gate_bias=None, **kwargs):
        if gate_bias is not None:
            z, u = (x.to(z.dtype) for x in add_gate_bias(z, u, gate_bias))
        captured.append([x.detach().contiguous().clone() for x in (q, k, v, z, u)])
        return original(q, k, v, z, u, *args, **kwargs)

    model = build()
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    mixer.chunk_regla = recording
    try:
        with torch.no_grad():
            output = model(tokens, positions, None)
    finally:
        mixer.chunk_regla = original
    if outputs is not None:
        outputs.append(output)
    del model
    return [(f"layer {i + 1}", inputs) for i, inputs in enumerate(captured)]


def slow_chunk_share(z: torch.Tensor, u: torch.Tensor, chunk: int = 64, limit: float = -120.0) -> float:
    """Share of (chunk, head) pairs where some key feature's log decay over the chunk is below
    `limit` (z, u [B, T, H, d]): the chunks the kernels' sub-chunk path takes."""
    from regla_kernels import refined_log_gate

    log_f = refined_log_gate(z.float(), u.float())
    batch, length, heads, d = log_f.shape
    pad = (-length) % chunk
    if pad:
        log_f = torch.nn.functional.pad(log_f, (0, 0, 0, 0, 0, pad))
    decay = log_f.reshape(batch, -1, chunk, heads, d).sum(dim=2)  # [B, chunks, H, d]
    return (decay.amin(dim=-1) < limit).float().mean().item()
