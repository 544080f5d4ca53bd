"""The one public entry point: `chunk_regla`."""

from typing import Callable, Dict, Optional, Tuple, Union

import torch

from regla_kernels.gating import add_gate_bias, default_scale, sequence_key_max
from regla_kernels.reference.chunk_torch import chunk_regla_torch
from regla_kernels.reference.naive import naive_recurrent_regla

BACKENDS = ("auto", "triton", "torch", "naive")

_BACKEND_FUNCTIONS: Dict[str, Callable] = {"torch": chunk_regla_torch, "naive": naive_recurrent_regla}
_AUTO_SUPPORTS: Dict[str, Callable] = {}


def register_backend(name: str, function: Callable, *, auto: bool = True, supports: Optional[Callable] = None) -> None:
    """Plug an implementation (same signature as `chunk_regla_torch`) in behind `chunk_regla`.

    auto=False keeps a registered "triton" backend out of backend="auto" (explicit use only);
    `supports(q, v) -> bool` limits auto use to the shapes and dtypes it handles.
    """
    _BACKEND_FUNCTIONS[name] = function
    if auto:
        _AUTO_SUPPORTS[name] = supports or (lambda q, v: True)
    else:
        _AUTO_SUPPORTS.pop(name, None)


def resolve_backend(backend: str, q: torch.Tensor, v: torch.Tensor) -> str:
    """The backend `chunk_regla` runs for these inputs: "auto" is Triton for CUDA tensors of a
    shape and dtype it supports (dk, dv powers of two in [16, 128]; bf16, fp16, fp32), else torch."""
    if backend not in BACKENDS:
        raise ValueError(f"chunk_regla: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        supports = _AUTO_SUPPORTS.get("triton")
        backend = "triton" if q.device.type == "cuda" and supports is not None and supports(q, v) else "torch"
    if backend not in _BACKEND_FUNCTIONS:
        raise NotImplementedError(
            f"chunk_regla: the {backend!r} backend is not available in this build "
            f"(available: {sorted(_BACKEND_FUNCTIONS)}); use backend='torch'"
        )
    return backend


def check_inputs(q, k, v, gate_logits, refine_logits, key_max, initial_state, cu_seqlens) -> int:
    """Validate `chunk_regla`'s inputs; return the number of sequences N.

    q, k, gate_logits, refine_logits: [B, T, H, dk] floating; v: [B, T, H, dv] floating;
    key_max: [N, H] or None; initial_state: [N, H, dk, dv] or None; cu_seqlens: None, or int32 /
    int64 [N + 1] offsets rising from 0 to T (then B = 1). N is B, or the packed sequences.
    Raises ValueError (shapes, offsets) or TypeError (dtypes) naming the argument."""
    if q.dim() != 4:
        raise ValueError(f"chunk_regla: q must be [B, T, H, dk], got shape {tuple(q.shape)}")
    for name, x in (("k", k), ("gate_logits", gate_logits), ("refine_logits", refine_logits)):
        if x.shape != q.shape:
            raise ValueError(f"chunk_regla: {name} must have q's shape {tuple(q.shape)}, got {tuple(x.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"chunk_regla: v must be [B, T, H, dv] with q's B, T, H {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v), ("gate_logits", gate_logits), ("refine_logits", refine_logits)):
        if not x.is_floating_point():
            raise TypeError(f"chunk_regla: {name} must be a floating tensor, got {x.dtype}")
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    if dk <= 0 or dv <= 0 or heads <= 0:
        raise ValueError(f"chunk_regla: heads, dk and dv must be positive, got H={heads}, dk={dk}, dv={dv}")
    sequences = batch
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"chunk_regla: with cu_seqlens the batch must be 1 (packed), got B={batch}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError("chunk_regla: cu_seqlens must be a 1-D int32/int64 tensor [N + 1]")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != length or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
            raise ValueError(f"chunk_regla: cu_seqlens must rise from 0 to T={length}, got {bounds}")
        sequences = len(bounds) - 1
    if key_max is not None and tuple(key_max.shape) != (sequences, heads):
        raise ValueError(f"chunk_regla: key_max must be [{sequences}, {heads}] (one per sequence and head), got {tuple(key_max.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (sequences, heads, dk, dv):
        raise ValueError(
            f"chunk_regla: initial_state must be [{sequences}, {heads}, {dk}, {dv}], got {tuple(initial_state.shape)}"
        )
    return sequences


def common_compute_dtype(*tensors: torch.Tensor):
    """The tensors as the PyTorch backends take them: all float64 where any is float64 and not all
    are (else as given: each is read at its own precision and computed in float32)."""
    dtypes = {x.dtype for x in tensors}
    if torch.float64 in dtypes and len(dtypes) > 1:
        return tuple(x.to(torch.float64) for x in tensors)
    return tensors


def chunk_regla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_logits: torch.Tensor,
    refine_logits: torch.Tensor,
    *,
    scale: Optional[float] = None,
    key_max: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
    low_memory: Union[bool, str] = False,
    gate_bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """ReGLA token mixing (REGLA_SPEC section 1), before the output norm.

    Layout [B, T, H, D]. Computes phi_q, phi_k (with the sequence key max), the refined
    log gate and the recurrence S_t = Diag(F_t) S_{t-1} + phi_k(k_t)^T v_t,
    o_t = scale * phi_q(q_t) S_t. Differentiable w.r.t. q, k, v, both logits and
    initial_state (key_max is a detached stabilizer).

    Args:
        q, k, gate_logits, refine_logits: [B, T, H, dk], float16/bfloat16/float32/float64.
        v: [B, T, H, dv]. Mixed float dtypes are taken (cast, not an error): the Triton backend
            casts k, v and both logits to q's dtype (its kernels read one dtype); the PyTorch
            backends compute in float32, or in float64 where any input is float64. B = 0, T = 0
            and empty packed sequences are taken: empty outputs, and the initial state (or
            zeros) as the final state of an empty sequence.
            NaN / Inf inputs behave as in the token-by-token recurrence: a bad value at token t
            reaches no output before t (the key max M is taken over the finite keys, 0 where a
            sequence has none) and the outputs it reaches are not finite.
        scale: score factor; None means alpha = 1 / (e sqrt(dk (e^2 - 1))).
        key_max: [N, H] key stabilizer M (N = B, or the number of packed sequences);
            None computes it from k. Pass it when k is a shard of a longer sequence.
        initial_state: [N, H, dk, dv] state before the first token, any float dtype.
        output_final_state: also return the state after the last token.
        cu_seqlens: [N + 1] int offsets of packed sequences (B must be 1); one state
            and one key max per sequence.
        backend: "auto" (Triton for CUDA tensors it supports, see `resolve_backend`, else
            "torch"), "triton", "torch" (chunked PyTorch) or "naive" (token-by-token oracle).
        low_memory: Triton backend (the other backends ignore it). By default the forward
            keeps the cumulative gate and the chunk-start states for the backward (1.08 GB at
            64K tokens, H 16, d 128, bf16; each in a gradient's buffer, so the backward's peak
            is 2.3 GB). "backward": the backward runs over time windows (as few as keep its
            buffers within 21% of o and the input gradients), with the same saved tensors
            (with cu_seqlens the window start states instead of the states):
            peak under 2 GB for about 0.1 ms (0.47-0.48x fla's time against 0.47x). True: the
            same windows, the forward keeping neither (computed again per window): peak under
            2 GB and 1.08 GB fewer saved activations per call, for about 1.2 ms (0.56-0.58x;
            benchmarks/results/kernels.md). With cu_seqlens the windows cut across sequences.
        gate_bias: [H, 2 dk] per-head biases of the logits, [b_g | b_r] (any float dtype,
            differentiable): the gates are those of gate_logits + b_g and refine_logits + b_r.
            The Triton backend can add them inside its kernels (no biased copy of the logits is
            made or saved: 0.54 GB fewer saved activations per call at 64K tokens, H 16, dk
            128, bf16); its segments route and the other backends add them first.
    Returns:
        o: [B, T, H, dv] in q's dtype.
        final_state: [N, H, dk, dv] float32 (float64 for float64 inputs), or None.
    """
    sequences = check_inputs(q, k, v, gate_logits, refine_logits, key_max, initial_state, cu_seqlens)
    heads, dk = q.shape[2:]
    if gate_bias is not None and tuple(gate_bias.shape) != (heads, 2 * dk):
        raise ValueError(
            f"chunk_regla: gate_bias must be [H, 2 dk] = [{heads}, {2 * dk}] ([b_g | b_r] per head), got {tuple(gate_bias.shape)}"
        )
    if low_memory not in (False, True, "backward"):
        raise ValueError(f"chunk_regla: low_memory={low_memory!r}; use False, True or \"backward\"")
    out_dtype = q.dtype
    name = resolve_backend(backend, q, v)
    function = _BACKEND_FUNCTIONS[name]
    if name in ("torch", "naive"):
        q, k, v, gate_logits, refine_logits = common_compute_dtype(q, k, v, gate_logits, refine_logits)
    if scale is None:
        scale = default_scale(q.shape[-1])
    # a backend that declares it may skip the final state's work when it is not asked for
    options = {"output_final_state": output_final_state} if getattr(function, "optional_final_state", False) else {}
    if low_memory and getattr(function, "supports_low_memory", False):
        options["low_memory"] = low_memory
    packed_whole = cu_seqlens is None or getattr(function, "supports_cu_seqlens", False)  # one call, options passed
    if gate_bias is not None and getattr(function, "supports_gate_bias", False) and packed_whole:
        options["gate_bias"] = gate_bias
    elif gate_bias is not None:
        gate_logits, refine_logits = add_gate_bias(gate_logits, refine_logits, gate_bias)
    if cu_seqlens is not None and getattr(function, "supports_cu_seqlens", False):
        o, state = function(q, k, v, gate_logits, refine_logits, scale, key_max, initial_state, cu_seqlens=cu_seqlens, **options)
    else:
        o, state = _run_per_sequence(
            function, q, k, v, gate_logits, refine_logits, scale, key_max, initial_state, cu_seqlens, sequences, options
        )
    return o.to(out_dtype), (state if output_final_state else None)


def _run_per_sequence(function, q, k, v, gate_logits, refine_logits, scale, key_max, initial_state, cu_seqlens, sequences, options):
    """Run a dense implementation once per packed sequence (or once for a plain batch, with `options`)."""
    if cu_seqlens is None:
        if key_max is None and not getattr(function, "computes_key_max", False):
            key_max = sequence_key_max(k)
        return function(q, k, v, gate_logits, refine_logits, scale, key_max, initial_state, **options)
    bounds = cu_seqlens.tolist()
    outputs, states = [], []
    for n in range(sequences):
        part = slice(bounds[n], bounds[n + 1])
        pieces = [x[:, part] for x in (q, k, v, gate_logits, refine_logits)]
        seq_max = sequence_key_max(pieces[1]) if key_max is None else key_max[n : n + 1]
        seq_state = None if initial_state is None else initial_state[n : n + 1]
        o, state = function(*pieces, scale, seq_max, seq_state)
        outputs.append(o)
        states.append(state)
    return torch.cat(outputs, dim=1), torch.cat(states, dim=0)
