"""The low-memory backward of the Triton ReGLA kernels: the backward over time windows
(`chunk_regla(..., low_memory=True or "backward")`).

Only the state gradients dh and the score gradients (and h where it has no room in the gradient
arena, `buffers.GradArena`) of one window exist at a time; each window's state-gradient pass
starts from the gradient the later window handed back. `ChunkReGLATritonWindowed` cuts B equal
sequences into the same windows; `ChunkReGLATritonPackedWindowed` cuts packed sequences into
windows of equal numbers of global chunks (`PackedWindow`). How many windows:
`chunks_per_window` (LAUNCH["backward_windows"], LAUNCH["window_memory_fraction"]).
"""

import bisect

import torch

from regla_kernels.triton.buffers import buffer_of, empty, gate_arena, grad_rows, output_grad, states_arena, value_grads
from regla_kernels.triton.function import forward_stages, kept_arena, kept_states
from regla_kernels.triton.launch import bias_grad, bwd_dstates, bwd_main, fwd_states, gates, kernel_bias, slow_chunks, work_list
from regla_kernels.triton.layout import chunk_tables, dims, from_rows, regular_tables, row_order, window_order, window_rows
from regla_kernels.triton.settings import CHUNK_SIZE, LAUNCH, state_dtype


def window_bytes(
    windows: int, batch: int, chunks: int, heads: int, dk: int, dv: int, dtype: torch.dtype, in_grads: bool = False, starts: bool = True,
) -> int:
    """Bytes the low-memory backward holds beyond its outputs with `windows` windows over B
    sequences of `chunks` chunks each (H heads, inputs of `dtype`): dh, the score gradients and
    (unless `in_grads`: in the gradient arena, `buffers.GradArena`) h of one window, and with
    `starts` the start states of the later windows (b lives in the gate gradients' buffer,
    `buffers.gate_arena`, which the outputs count, as they count the gradient arena)."""
    state = torch.empty((), dtype=state_dtype(dtype)).element_size()
    per_chunk = CHUNK_SIZE * CHUNK_SIZE * state + (1 if in_grads else 2) * dk * dv * state
    return batch * heads * (-(-chunks // windows) * per_chunk + starts * (windows - 1) * dk * dv * state)


def chunks_per_window(
    batch: int, chunks: int, heads: int, dk: int, dv: int, dtype: torch.dtype, tokens: int, in_grads: bool = False, starts: bool = True,
) -> int:
    """Chunks per window (int) of the low-memory backward, arguments as in `window_bytes`:
    LAUNCH["backward_windows"] windows (at most
    one per chunk), or with 0 the fewest (up to 16) whose `window_bytes` are within
    LAUNCH["window_memory_fraction"] of the outputs (o and the five input gradients of `tokens`
    tokens in all), else the count with the fewest bytes."""
    if LAUNCH["backward_windows"] > 0:
        return -(-chunks // min(LAUNCH["backward_windows"], chunks))
    element = torch.empty((), dtype=dtype).element_size()
    outputs = tokens * heads * (4 * dk + 2 * dv) * element
    counts = range(1, min(16, chunks) + 1)
    cost = {w: window_bytes(w, batch, chunks, heads, dk, dv, dtype, in_grads, starts) for w in counts}
    within = [w for w in counts if cost[w] <= LAUNCH["window_memory_fraction"] * outputs]
    windows = within[0] if within else min(counts, key=cost.get)
    return -(-chunks // windows)


def keep_for_windows(ctx, q, k, v, z, u, arena, flags, key_max, q_max, h0, starts, keep_gates, states, biases):
    """Save in ctx what both windowed Functions keep for their backward (h in the gradient arena
    `states` where the forward kept it, else the window start states; with keep_gates the gate
    arena and flags, else neither; `biases`: the logits' bias as the kernels read it and as
    given), and the initial state's dtype for its gradient."""
    ctx.set_materialize_grads(False)
    kept = (*arena, flags) if keep_gates else (None,) * 4
    ctx.save_for_backward(q, k, v, z, u, *kept, key_max, q_max, h0, starts, *buffer_of(states), *biases)
    ctx.h0_dtype = None if h0 is None else h0.dtype


def window_arena(ctx, arena, z, u, k, key_max, cu, table, total, order=None, bias=None):
    """The gate arena (b, dz, du) of a windowed backward: the forward's (`function.kept_arena`),
    or, where the forward kept none (arena of Nones), a new one whose b each window fills for
    itself (`window_backward`)."""
    if arena[0] is None:
        return gate_arena(*dims(z), z.dtype, z.device)
    return kept_arena(ctx, arena, z, u, k, key_max, cu, table, total, order, bias)


class ChunkReGLATritonWindowed(torch.autograd.Function):
    """`function.ChunkReGLATriton` with a backward over time windows (the same window of every
    sequence, last to first), for memory: the state gradients dh and the score gradients (and h
    where it has no room in the gradient arena, `buffers.GradArena`) exist for one window at a
    time. With keep_gates the forward keeps b in the gate gradients' buffer (`buffers.gate_arena`)
    and h in the gradient arena where it fits (as the one-pass Function does); without, b and h are computed
    again per window, into that window's rows of those buffers, from each window's start state
    that the forward keeps, and the forward keeps no gate or state tensor. Each window's
    state-gradient pass starts from the gradient the later window handed back; the state passes
    keep all sequences and heads in parallel, so the cost is more launches (and the gates and
    states again)."""

    @staticmethod
    def forward(ctx, q, k, v, z, u, scale, key_max, h0, cu, offsets, table, total, minor, window_chunks, keep_gates, spilled, gate_bias):
        batch, heads, dk, dv = q.shape[0], q.shape[2], q.shape[3], v.shape[-1]
        windows = -(-(total // batch) // window_chunks)
        ctx.spilled = spilled
        kept = states_arena(q, v, spilled)[0] if keep_gates else None
        starts = None
        if kept is None:
            starts = empty(windows - 1, batch, heads, dk, dv, device=q.device, dtype=state_dtype(q.dtype))
        bias = kernel_bias(gate_bias)
        o, ht, arena, flags, key_max, h, q_max, _ = forward_stages(
            q, k, v, z, u, scale, key_max, h0, cu, offsets, table, total, minor,
            starts=None if starts is None else (starts, window_chunks), into=kept, bias=bias,
        )
        del h
        keep_for_windows(ctx, q, k, v, z, u, arena, flags, key_max, q_max, h0, starts, keep_gates, kept, (bias, gate_bias))
        ctx.scale, ctx.minor, ctx.window = scale, minor, window_chunks * CHUNK_SIZE
        ctx.tables = (cu, offsets, table, total)
        ctx.windows = windows
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, z, u, b, dz, du, flags, key_max, q_max, h0, starts, states, bias, gate_bias = ctx.saved_tensors
        batch, length, heads, dk = q.shape
        cu, offsets, table, total = ctx.tables
        order = row_order(batch, length, heads, ctx.minor)
        row_t = order[0]
        arena = window_arena(ctx, (b, dz, du), z, u, k, key_max, cu, table, total, order, bias)
        do = output_grad(do, batch * length, v)
        states_kept = states is not None
        if states_kept:  # the forward's h (or, in a second backward, h computed again whole)
            h_arena, dq, dk_ = kept_states(ctx, states, q, k, v, arena[0], key_max, h0, cu, offsets, total, order)
        elif ctx.spilled is not None:  # each window computes its h into its rows of a new arena
            h_arena, dq, dk_ = states_arena(q, v, ctx.spilled)
        else:
            h_arena, dq, dk_ = None, grad_rows(q), grad_rows(k)
        grads = [dq, dk_, grad_rows(v), *arena[1:]]
        dstate = None if dht is None else dht.float().contiguous()
        windows, window_chunks = ctx.windows, ctx.window // CHUNK_SIZE
        for index in reversed(range(windows)):
            first, window = index * ctx.window, min(ctx.window, length - index * ctx.window)
            last = first + window == length  # its dht is autograd's (or None), the others' our own buffer
            chunks = slice(index * window_chunks, index * window_chunks + -(-window // CHUNK_SIZE))
            window_flags = None if flags is None else flags.view(batch, -1, heads)[:, chunks].reshape(-1, heads).contiguous()
            dstate = window_backward(
                [x[:, first : first + window] for x in (q, k, v, z, u)],
                window_rows((do, q_max.unsqueeze(-1), arena[0], *grads), first * row_t),
                key_max, h0 if index == 0 or states_kept else starts[index - 1], dstate, ctx.scale,
                regular_tables(batch, window, q.device), window_order(batch, length, window, heads, ctx.minor), window_flags,
                dh_start=dstate if not last and dstate is not None else None,
                states=None if h_arena is None else h_arena.from_row(first * row_t, dk), states_kept=states_kept, bias=bias,
            )
        grads = [from_rows(g, batch, length, ctx.minor) for g in grads]
        dinit = None if h0 is None else dstate.to(ctx.h0_dtype)
        dbias = bias_grad(grads[3], grads[4], gate_bias)
        return (*grads, None, None, dinit, None, None, None, None, None, None, None, None, dbias)


class PackedWindow:
    """One window of the packed low-memory backward: global chunks [first_chunk, end_chunk), tokens
    [start, end), and the pieces of sequences in it (`sequences`, int64 on the device) with their
    tables relative to `start` (`layout.chunk_tables`). `continued`: the first piece starts inside its
    sequence (its state comes from the forward's saved start, its state gradient goes to the
    window before); `continues`: the last piece ends inside its sequence (its end gradient comes
    from the window after)."""

    def __init__(self, bounds, chunk_offsets, chunk_counts, first_chunk, end_chunk, device):
        pieces, sequence = [], bisect.bisect_right(chunk_offsets, first_chunk) - 1
        while sequence < len(chunk_counts) and chunk_offsets[sequence] < end_chunk:
            if chunk_counts[sequence]:
                lo = max(first_chunk, chunk_offsets[sequence]) - chunk_offsets[sequence]
                hi = min(end_chunk, chunk_offsets[sequence] + chunk_counts[sequence]) - chunk_offsets[sequence]
                begin = bounds[sequence] + lo * CHUNK_SIZE
                pieces.append((sequence, begin, min(bounds[sequence + 1], bounds[sequence] + hi * CHUNK_SIZE), lo, hi))
            sequence += 1
        self.first_chunk, self.start, self.end = first_chunk, pieces[0][1], pieces[-1][2]
        self.continued = pieces[0][3] > 0
        self.continues = pieces[-1][4] < chunk_counts[pieces[-1][0]]
        self.sequences = torch.tensor([piece[0] for piece in pieces], dtype=torch.int64, device=device)
        cu = torch.tensor([piece[1] - self.start for piece in pieces] + [self.end - self.start], dtype=torch.int32)
        offsets, table, total = chunk_tables(cu, CHUNK_SIZE)
        self.tables = (cu.to(device), offsets.to(device), table.to(device), total)


def packed_windows(cu: torch.Tensor, chunk_offsets: torch.Tensor, total: int, window_chunks: int) -> list:
    """The `PackedWindow`s of packed sequences (cu_seqlens `cu`, int32 [N + 1]; first chunk per
    sequence `chunk_offsets`, int32 [N]; `total` chunks) cut into windows of `window_chunks`
    global chunks."""
    bounds, offsets = cu.tolist(), chunk_offsets.tolist()
    counts = [(b - a + CHUNK_SIZE - 1) // CHUNK_SIZE for a, b in zip(bounds[:-1], bounds[1:])]
    return [
        PackedWindow(bounds, offsets, counts, first, min(total, first + window_chunks), cu.device)
        for first in range(0, total, window_chunks)
    ]


class ChunkReGLATritonPackedWindowed(torch.autograd.Function):
    """`ChunkReGLATritonWindowed` for packed sequences (B = 1, cu_seqlens): windows of equal
    numbers of global chunks, each holding pieces of one or more sequences (`PackedWindow`). A
    piece that starts inside its sequence starts from the state the forward kept at that chunk; a
    piece that ends inside its sequence takes the state gradient the later window handed back;
    the others take the sequence's initial state and final-state gradient, and give its
    initial-state gradient."""

    @staticmethod
    def forward(ctx, q, k, v, z, u, scale, key_max, h0, cu, offsets, table, total, minor, windows, keep_gates, gate_bias):
        bias = kernel_bias(gate_bias)
        o, ht, arena, flags, key_max, h, q_max, _ = forward_stages(
            q, k, v, z, u, scale, key_max, h0, cu, offsets, table, total, minor, bias=bias,
        )
        firsts = torch.tensor([w.first_chunk for w in windows[1:]], dtype=torch.int64, device=h.device)
        starts = h.index_select(0, firsts)  # [W - 1, H, dk, dv]: h at each later window's first chunk
        del h
        keep_for_windows(ctx, q, k, v, z, u, arena, flags, key_max, q_max, h0, starts, keep_gates, None, (bias, gate_bias))
        ctx.scale, ctx.windows, ctx.tables = scale, windows, (cu, table, total)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, z, u, b, dz, du, flags, key_max, q_max, h0, starts, _, bias, gate_bias = ctx.saved_tensors
        _, length, heads, dk = q.shape
        dv, sequences = v.shape[-1], key_max.shape[0]
        arena = window_arena(ctx, (b, dz, du), z, u, k, key_max, *ctx.tables, None, bias)
        do = output_grad(do, length, v)
        grads = [*value_grads(q, k, v), *arena[1:]]
        zeros = lambda pieces: torch.zeros(pieces, heads, dk, dv, device=q.device, dtype=torch.float32)
        dinit = None
        if h0 is not None:  # an empty sequence passes its final-state gradient to its initial state unchanged
            dinit = dht.float().clone() if dht is not None else zeros(sequences)
        handed = None  # the state gradient at the later window's first chunk
        for index in reversed(range(len(ctx.windows))):
            w = ctx.windows[index]
            pieces = w.sequences.numel()
            init = h0[w.sequences].float() if h0 is not None else (zeros(pieces) if w.continued else None)
            if w.continued:
                init[0] = starts[index - 1]
            end_grad = dht[w.sequences].float() if dht is not None else (zeros(pieces) if w.continues else None)
            if w.continues:
                end_grad[-1] = handed
            dh_start = window_backward(
                [x[:, w.start : w.end] for x in (q, k, v, z, u)],
                window_rows((do, q_max.unsqueeze(-1), arena[0], *grads), w.start * heads),
                key_max[w.sequences], init, end_grad, ctx.scale, w.tables, (heads, 0),
                None if flags is None else flags[w.first_chunk : w.first_chunk + w.tables[3]], bias=bias,
            )
            if w.continued:
                handed, dh_start = dh_start[0], dh_start[1:]
            if dinit is not None:
                dinit[w.sequences[1:] if w.continued else w.sequences] = dh_start
        dbias = bias_grad(grads[3], grads[4], gate_bias)
        grads = [g.view(1, length, *g.shape[1:]) for g in grads]
        dinit = None if dinit is None else dinit.to(ctx.h0_dtype)
        return (*grads, None, None, dinit, None, None, None, None, None, None, None, dbias)


def window_backward(
    inputs, rows, key_max, start_state, dht, scale, tables, order, flags, dh_start=None, states=None, states_kept=False, bias=None,
):
    """One window of a low-memory backward: the gradients of its tokens written into the whole
    gradient tensors. inputs: q, k, v, z, u of the window ([B, W, H, D] views); rows: do, the query
    max, b and the five gradients as flat views from the window's first row (`window_rows`);
    key_max, start_state and dht of the window's sequences (or sequence pieces); tables:
    `layout.regular_tables` or `layout.chunk_tables` of the window; order: the rows of the
    per-token tensors;
    flags: the window's chunk flags (int8 [chunks, H], the forward's), or None: then b is computed
    here, into the window's rows of b (the gate arena), and the flags with it. Returns the state gradient
    at each sequence's start in the window (fp32 [N, H, dk, dv]), written into `dh_start` when
    given (which may be dht itself: each state-pass program reads its block of dht before it
    writes that block). `bias`: as in `launch.gates`. `states`: the gradient arena (`buffers.GradArena`,
    pointers at the window's first row) whose dq and dk are the rows' and that holds the window's
    h (`states_kept`) or receives it here; None: h in a buffer of its own, computed here."""
    q, k, v, z, u = inputs
    do, q_max, b, *grads = rows
    cu, offsets, table, total = tables
    if flags is None:
        work = work_list(chunks=total, heads=q.shape[2], device=q.device)
        _, _, flags, _ = gates(z, u, k, cu, table, total, key_max, order=order, work=work, b=b, bias=bias)
    else:
        work = slow_chunks(flags)
    h = states
    if not states_kept:
        h, _ = fwd_states(k, v, b, key_max, start_state, cu, offsets, total, False, order=order, into=states)
    dh, dh_start = bwd_dstates(q, q_max, b, do, dht, cu, offsets, scale, total, v.shape[-1], order=order, dh0=dh_start)
    bwd_main(
        q, k, v, z, u, b, flags, key_max, q_max, h, dh, do, table, cu, scale, total, order=order, out=tuple(grads), work=work,
        bias=bias,
    )
    return dh_start

