"""Context parallelism by state passing: the communication-free math (REGLA_SPEC section 4).

A sequence cut into segments 0..S-1 is processed segment by segment with a zero initial
state (and the sequence-wide key max). Each segment j is summarized by its local final
state S_loc(j) and its total log decay Lambda_j. The state entering segment i is

    S_in(i) = Diag(exp(Lambda_{i-1})) S_in(i-1) + S_loc(i-1),   S_in(0) = initial state (or 0)
            = sum_{j<i} Diag(exp(Lambda_{j+1} + ... + Lambda_{i-1})) S_loc(j) [+ decayed S_in(0)],

and segment i's exact output is its local output plus
scale * (phi_q(q_t) * exp(b_t)) S_in(i), b_t the cumulative log gate from the segment
start through t. Everything here is plain differentiable torch; the collectives live in
`regla_megatron.context_parallel.regla`.
"""

from typing import Optional, Tuple

import torch

from regla_kernels.gating import query_feature_map, refined_log_gate


def segment_log_decay(gate_logits: torch.Tensor, refine_logits: torch.Tensor) -> torch.Tensor:
    """Lambda: the total log decay of a segment, sum over its tokens of log F.

    Args:
        gate_logits, refine_logits: [B, T, H, dk], any float dtype.
    Returns:
        [B, H, dk] float32 (float64 for float64 input), every element <= 0.
    """
    return refined_log_gate(gate_logits, refine_logits).sum(dim=1)


def cp_state_scan(
    local_states: torch.Tensor,
    log_decays: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The state entering each segment, from the segment summaries in sequence order.

    Args:
        local_states: S_loc, [S, B, H, dk, dv], segment j's final state from a zero start.
        log_decays: Lambda, [S, B, H, dk], segment j's total log decay.
        initial_state: [B, H, dk, dv] state before segment 0, or None (zeros).
    Returns:
        S_in, [S, B, H, dk, dv] in float32 (float64 if the summaries are float64);
        S_in(0) is the initial state (or zeros).
    """
    if local_states.dim() != 5 or log_decays.shape != local_states.shape[:4]:
        raise ValueError(
            f"cp_state_scan: local_states must be [S, B, H, dk, dv] and log_decays [S, B, H, dk], "
            f"got {tuple(local_states.shape)} and {tuple(log_decays.shape)}"
        )
    if initial_state is not None and initial_state.shape != local_states.shape[1:]:
        raise ValueError(
            f"cp_state_scan: initial_state must be {tuple(local_states.shape[1:])}, got {tuple(initial_state.shape)}"
        )
    dtype = torch.float64 if local_states.dtype == torch.float64 else torch.float32
    states, decays = local_states.to(dtype), torch.exp(log_decays.to(dtype)).unsqueeze(-1)
    state = torch.zeros_like(states[0])
    if initial_state is not None:
        state = state + initial_state.to(dtype)
    incoming = []
    for j in range(states.shape[0]):
        incoming.append(state)
        # exp(Lambda) <= 1: the recursion only ever shrinks carried state, so it is stable.
        state = decays[j] * state + states[j]
    return torch.stack(incoming, dim=0)


def cp_state_grad_scan(incoming_grads: torch.Tensor, log_decays: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The backward of `cp_state_scan` as a reverse scan over the segments, for kernels that
    take the state gradients explicitly.

    With G_i the gradient w.r.t. S_in(i) through segment i's own outputs, the total gradient is
    D(i) = G_i + Diag(exp(Lambda_i)) D(i + 1), D(S) = 0 (segment i's final state is S_in(i + 1)).

    Args:
        incoming_grads: G, [S, B, H, dk, dv].
        log_decays: Lambda, [S, B, H, dk].
    Returns:
        (D(i + 1) for every segment i, the gradient at its end: [S, B, H, dk, dv];
         D(0), the initial state's gradient: [B, H, dk, dv]), float32 (float64 for float64).
    """
    if incoming_grads.dim() != 5 or log_decays.shape != incoming_grads.shape[:4]:
        raise ValueError(
            f"cp_state_grad_scan: incoming_grads must be [S, B, H, dk, dv] and log_decays [S, B, H, dk], "
            f"got {tuple(incoming_grads.shape)} and {tuple(log_decays.shape)}"
        )
    dtype = torch.float64 if incoming_grads.dtype == torch.float64 else torch.float32
    grads, decays = incoming_grads.to(dtype), torch.exp(log_decays.to(dtype)).unsqueeze(-1)
    total = torch.zeros_like(grads[0])
    at_end = []
    for i in reversed(range(grads.shape[0])):
        at_end.append(total)
        total = grads[i] + decays[i] * total
    return torch.stack(at_end[::-1], dim=0), total


def inter_segment_output(
    q: torch.Tensor,
    gate_logits: torch.Tensor,
    refine_logits: torch.Tensor,
    incoming_state: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The contribution of the state entering a segment to its outputs.

    o_t = scale * (phi_q(q_t) * exp(b_t)) S_in, b_t = sum of log F from the segment's
    first token through t (b_t <= 0, so exp never overflows).

    Args:
        q, gate_logits, refine_logits: [B, T, H, dk], any float dtype.
        incoming_state: S_in, [B, H, dk, dv].
        scale: the score factor used by the local pass.
    Returns:
        [B, T, H, dv] float32 (float64 for float64 q).
    """
    if incoming_state.dim() != 4 or incoming_state.shape[:3] != (q.shape[0], q.shape[2], q.shape[3]):
        raise ValueError(
            f"inter_segment_output: incoming_state must be [B, H, dk, dv] = [{q.shape[0]}, {q.shape[2]}, "
            f"{q.shape[3]}, dv], got {tuple(incoming_state.shape)}"
        )
    phi_q = query_feature_map(q)
    from_start = torch.cumsum(refined_log_gate(gate_logits, refine_logits), dim=1)
    queries = phi_q * torch.exp(from_start.to(phi_q.dtype))
    return scale * torch.einsum("bthk,bhkv->bthv", queries, incoming_state.to(phi_q.dtype))
