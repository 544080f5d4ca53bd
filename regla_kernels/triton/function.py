"""The one-pass autograd Function of the Triton ReGLA kernels, and the forward stages and kept
buffers that the other Functions (`windows.py`, `segments.py`) share.

The forward runs the gates, the state pass and the output (`forward_stages`) and keeps b in the
gate gradients' buffer (`buffers.gate_arena`) and, where it fits, h in the dq/dk gradient arena
(`buffers.GradArena`); the backward then needs only the state-gradient pass and the gradient
stages. A second backward through the same graph (retain_graph) finds b and h overwritten by
the first and computes them again (`kept_arena`, `kept_states`).
"""

import torch

from regla_kernels.triton.buffers import (
    buffer_of,
    empty,
    gate_arena,
    grad_arena_of,
    grad_rows,
    output_grad,
    states_arena,
)
from regla_kernels.triton.launch import bias_grad, bwd_dstates, bwd_main, fwd_output, fwd_states, gates, kernel_bias, work_list
from regla_kernels.triton.layout import dims, from_rows, row_order


def forward_stages(q, k, v, z, u, scale, key_max, h0, cu, offsets, table, total, minor, starts=None, into=None, bias=None):
    """The forward stages of the one-pass and windowed Functions on q, k, z, u [B, T, H, dk] and
    v [B, T, H, dv] (one `layout.input_strides` each for q and k, for z and u), the chunk tables
    (`layout.chunk_tables`) and `minor` (`layout.batch_minor`).

    Returns o ([B * T, H, dv] in `layout.row_order`, q's dtype), the final states (fp32 [N, H,
    dk, dv]) and what a backward may keep or derive from: the gate arena (b, dz, du:
    `buffers.gate_arena`), the flags, the key max, h, the query max and the sub-chunk work list.
    `starts`, `into`: as in `launch.fwd_states`; `bias`: as in `launch.gates`."""
    order = row_order(q.shape[0], q.shape[1], q.shape[2], minor)
    work = work_list(chunks=total, heads=q.shape[2], device=q.device)
    arena = gate_arena(*dims(z), z.dtype, z.device)
    b, _, flags, key_max = gates(z, u, k, cu, table, total, key_max, order=order, work=work, b=arena[0], bias=bias)
    h, ht = fwd_states(k, v, b, key_max, h0, cu, offsets, total, True, order=order, starts=starts, into=into)
    o, q_max = fwd_output(q, k, v, b, flags, key_max, h, table, cu, scale, total, order=order, work=work)
    return o, ht, arena, flags, key_max, h, q_max, work


def kept_arena(ctx, arena, z, u, k, key_max, cu, table, total, order=None, bias=None):
    """The gate arena (b, dz, du: `buffers.gate_arena`) a backward writes its gate gradients into:
    `arena`, the one the forward kept, whose b the first backward overwrites; a second backward
    through the same graph (retain_graph; ctx remembers the first) gets a new one with b computed
    again from z, u, k (as `launch.gates` takes them)."""
    if not getattr(ctx, "arena_spent", False):
        ctx.arena_spent = True
        return arena
    fresh = gate_arena(*dims(z), z.dtype, z.device)
    gates(z, u, k, cu, table, total, key_max, order=order, b=fresh[0], bias=bias)
    return fresh


def kept_states(ctx, buffer, q, k, v, b, key_max, h0, cu, offsets, total, order):
    """(h, dq, dk) of a backward: h in the `buffers.GradArena` the forward kept (`buffer`), whose h the
    first backward overwrites; a second backward through the same graph (retain_graph) gets a new
    arena with h computed again. Without a kept arena: h in a buffer of its own, computed here,
    and fresh dq, dk."""
    tokens, heads, dk = dims(q)
    if buffer is not None and not getattr(ctx, "states_spent", False):
        ctx.states_spent = True
        return grad_arena_of(buffer, tokens, heads, dk)
    if buffer is None:
        h, _ = fwd_states(k, v, b, key_max, h0, cu, offsets, total, False, order=order)
        return h, grad_rows(q), grad_rows(k)
    into, dq, dk_ = grad_arena_of(empty(buffer.numel(), device=buffer.device, dtype=buffer.dtype), tokens, heads, dk)
    fwd_states(k, v, b, key_max, h0, cu, offsets, total, False, order=order, into=into)
    return into, dq, dk_


class ChunkReGLATriton(torch.autograd.Function):
    """The one-pass Function: q, k, v, z, u [B, T, H, D]; o as [B * T, H, dv] in
    `layout.row_order` (Megatron's [s, b] order when `minor`), the input gradients as [B, T, H,
    D] views of that order. The forward keeps b (`buffers.gate_arena`) and, where it fits one, h
    (`buffers.GradArena`; `spilled`: `buffers.arena_spilled`) for the backward, which then needs
    no state pass but the state gradients' (else it computes h again first)."""

    @staticmethod
    def forward(ctx, q, k, v, z, u, scale, key_max, h0, cu, offsets, table, total, minor, spilled, gate_bias):
        into, _, _ = states_arena(q, v, spilled)
        bias = kernel_bias(gate_bias)
        o, ht, arena, flags, key_max, h, q_max, work = forward_stages(
            q, k, v, z, u, scale, key_max, h0, cu, offsets, table, total, minor, into=into, bias=bias,
        )
        del h  # kept in the gradient arena (`into`), else recomputed in the backward
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(
            q, k, v, z, u, *arena, flags, key_max, q_max, h0, cu, offsets, table, work, *buffer_of(into), bias, gate_bias,
        )
        ctx.scale, ctx.total, ctx.minor = scale, total, minor
        ctx.h0_dtype = None if h0 is None else h0.dtype
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, z, u, b, dz, du, flags, key_max, q_max, h0, cu, offsets, table, work, states, bias, gate_bias = ctx.saved_tensors
        scale, total = ctx.scale, ctx.total
        order = row_order(q.shape[0], q.shape[1], q.shape[2], ctx.minor)
        b, dz, du = kept_arena(ctx, (b, dz, du), z, u, k, key_max, cu, table, total, order, bias)
        do = output_grad(do, q.shape[0] * q.shape[1], v)
        dht = None if dht is None else dht.float().contiguous()
        h, dq, dk = kept_states(ctx, states, q, k, v, b, key_max, h0, cu, offsets, total, order)
        dh, dh0 = bwd_dstates(q, q_max, b, do, dht, cu, offsets, scale, total, v.shape[-1], order=order)
        grads = bwd_main(
            q, k, v, z, u, b, flags, key_max, q_max, h, dh, do, table, cu, scale, total, order=order, work=work,
            out=(dq, dk, grad_rows(v), dz, du), bias=bias,
        )
        dbias = bias_grad(grads[3], grads[4], gate_bias)
        grads = [from_rows(g, q.shape[0], q.shape[1], ctx.minor) for g in grads]
        dinit = None if h0 is None else dh0.to(ctx.h0_dtype)
        return (*grads, None, None, dinit, None, None, None, None, None, None, dbias)

