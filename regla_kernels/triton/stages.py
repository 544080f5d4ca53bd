"""The device functions (@triton.jit helpers) of the chunked ReGLA kernels, shared by forward and
backward, by the stage kernels (chunk_kernels.py) and the whole-chunk product kernels (fast.py).

Conventions (REGLA_SPEC sections 1 and 3). Tokens are numbered 0..T_total - 1 (batch rows
one after another, or the packed sequences); sequence n covers tokens [cu[n], cu[n+1]) and is
cut into chunks of C tokens, each chunk into C // S sub-chunks of S tokens. The inputs q, k
(strides S_T, S_N, S_H), v (V_T, V_N, V_H) and z, u (Z_T, Z_N, Z_H) may be strided views
(Megatron's [s, b] activations, `input_rows`); everything the kernels allocate (b, o, the
gradients, the query max) is a contiguous [T_total, H, D] tensor addressed by
rows = `token_rows` (token * H + head, or Megatron's [s, b] order). Inside a chunk, b is the
cumulative log gate from the chunk start (stored, fp32, by `chunk_kernels.chunk_gates_kernel`:
the only stage that evaluates the gate
from its logits, besides the chain rule at the end of the backward) and bw = b minus b at
the end of the previous sub-chunk. Every gate factor is exp of a difference that is <= 0:
  - sub-chunk i against earlier tokens of the chunk: (q * exp(bw)) . (k * exp(b[iS-1] - b)),
  - diagonal sub-chunk blocks: elementwise exp(b_t - b_s), s <= t, one key row of k and b
    read from memory per step,
  - chunk against its start state: q * exp(b); state update: k * exp(b_C - b), exp(b_C).
Padding rows past a sequence end are masked to phi = 0 and log F = 0 (no state change).

The gates kernel also writes one flag per chunk and head: 1 where the whole-chunk product
kernels (fast.py) take the chunk, 0 where the sub-chunk kernels (chunk_kernels.py) do.
"""

import triton
import triton.language as tl

LOG_TWO = tl.constexpr(0.6931471805599453)
# The dq/dk kernel's key block (`settings.LAUNCH["fast_dqk_block_k"]`) that b's row layout follows
# (`gate_slots`).
GATE_BLOCK = tl.constexpr(64)


@triton.jit
def _log1p_unit(x):
    """log(1 + x) for x in [0, 1], accurate for tiny x."""
    return tl.where(x < 1e-4, x * (1.0 - 0.5 * x), tl.log(1.0 + x))


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0) - _log1p_unit(tl.exp(-tl.abs(x)))


@triton.jit
def _gate_parts(z, u):
    """log g, log(1 - g), log r and log w with F = g * w, w = g + 2 r (1 - g) (gating.py)."""
    log_g = _logsigmoid(z)
    log_not_g = log_g - z
    log_r = _logsigmoid(u)
    other = LOG_TWO + log_r + log_not_g
    hi = tl.maximum(log_g, other)
    lo = tl.minimum(log_g, other)
    log_w = hi + _log1p_unit(tl.exp(lo - hi))
    return log_g, log_not_g, log_r, log_w


@triton.jit
def refined_log_gate_tl(z, u):
    """log F (fp32, <= 0): the in-kernel twin of gating.refined_log_gate."""
    log_g, log_not_g, log_r, log_w = _gate_parts(z, u)
    return tl.minimum(log_g + log_w, 0.0)


@triton.jit
def refined_log_gate_grad_tl(z, u):
    """(d log F / dz, d log F / du) (fp32) in 7 special-function calls, every term positive.

    With ng = 1 - g, nr = 1 - r and x = 2 r (1 - g) / g = 2 exp(log r - z) (the refine term
    of w = g + 2 r (1 - g) over g), ratio = g / w = 1 / (1 + x) and
        d log F / dz = (1 - g) + g (1 - g) (1 - 2 r) / w = ng * ratio * (x + 2 nr),
        d log F / du = 2 r (1 - r) (1 - g) / w            = nr * ratio * x.
    The exponent of x is capped at 80 (ratio ~ e^-80 there, its true value smaller still)."""
    e_z = tl.exp(-tl.abs(z))
    e_u = tl.exp(-tl.abs(u))
    not_g = tl.where(z >= 0, e_z, 1.0) / (1.0 + e_z)
    not_r = tl.where(u >= 0, e_u, 1.0) / (1.0 + e_u)
    log_r = tl.minimum(u, 0.0) - _log1p_unit(e_u)
    x = tl.exp(tl.minimum(LOG_TWO + log_r - z, 80.0))
    ratio = 1.0 / (1.0 + x)
    return not_g * ratio * (x + 2.0 * not_r), not_r * ratio * x


@triton.jit
def input_rows(tok, n, head, S_T, S_N, S_H):
    """Element offsets of the rows (tokens tok of sequence n, one head) of a strided input:
    tok * S_T + n * S_N + head * S_H (`layout.input_strides`; rows * D when contiguous)."""
    return tok * S_T + n.to(tl.int64) * S_N + head * S_H


@triton.jit
def token_rows(tok, n, head, R_T, R_N):
    """Row index (element offset / feature count) of tokens tok of sequence n, one head, in the
    per-token tensors the kernels allocate (b, the query max, o, the gradients; do is read so):
    tok * R_T + n * R_N + head. (R_T, R_N) = (H, 0) keeps the sequences one after another,
    (B H, H - T B H) Megatron's [s, b] order (`layout.row_order`): `input_rows` with
    the rows' own strides."""
    return input_rows(tok, n, head, R_T, R_N, 1)


@triton.jit
def load_value_rows(v_ptr, do_ptr, vrows, rows, mask, rv, DV: tl.constexpr, DT: tl.constexpr):
    """v (strided input rows vrows) and do (`token_rows` rows) [C, len(rv)] of a chunk in DT, 0 on
    padding rows."""
    v = tl.load(v_ptr + vrows[:, None] + rv[None, :], mask=mask[:, None], other=0.0).to(DT)
    do = tl.load(do_ptr + rows[:, None] * DV + rv[None, :], mask=mask[:, None], other=0.0).to(DT)
    return v, do


@triton.jit
def load_query_features(q_ptr, qrows, mask, DK: tl.constexpr, log_decay):
    """(phi_q * exp(log_decay) = exp(q - rowmax q + log_decay) [C, DK] fp32, 0 on padding rows;
    rowmax q [C] fp32). log_decay: a gate exponent broadcast to [C, DK] (0.0 for none), folded
    into the one exponential."""
    cols = tl.arange(0, DK)
    q = tl.load(q_ptr + qrows[:, None] + cols[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    q_max = tl.max(q, axis=1)
    return tl.where(mask[:, None], tl.exp(q - q_max[:, None] + log_decay), 0.0), q_max


@triton.jit
def load_query_features_cols(q_ptr, qmax_ptr, qrows, rows, mask, cols, log_decay):
    """Columns `cols` of phi_q * exp(log_decay) [C, len(cols)], the row max over all features
    read from qmax (fp32 [T, H] at rows, stored by the forward output kernels)."""
    q = tl.load(q_ptr + qrows[:, None] + cols[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    q_max = tl.load(qmax_ptr + rows, mask=mask, other=0.0)
    return tl.where(mask[:, None], tl.exp(q - q_max[:, None] + log_decay), 0.0)


@triton.jit
def load_key_features(k_ptr, krows, mask, key_max, cols, log_decay):
    """phi_k * exp(log_decay) = exp(k - M + log_decay) [C, len(cols)] fp32, 0 on padding rows
    (log_decay: a gate exponent broadcast to [C, len(cols)], 0.0 for none)."""
    k = tl.load(k_ptr + krows[:, None] + cols[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    return tl.where(mask[:, None], tl.exp(k - key_max + log_decay), 0.0)


@triton.jit
def last_row(x, C: tl.constexpr, row: tl.constexpr):
    """x[row, :] of a [C, D] register tile, as a [D] vector."""
    r = tl.arange(0, C)
    return tl.sum(tl.where(r[:, None] == row, x, 0.0), axis=0)


@triton.jit
def gate_slots(cols, DK: tl.constexpr):
    """Where a row of b keeps key features `cols` (element offsets in the row). Each block of
    GATE_BLOCK features has its first half in the row's first half and its second half in the
    second: in a 16-bit gate arena (`buffers.gate_arena`, a row of b is the row of dz, then
    the row of du) the block's b then lies in the bytes of its own dz and du, so the dq/dk program
    of a key block writes over no b but what it read. Rows of at most one block keep their order.
    cols: runs of GATE_BLOCK / 2 features from multiples of it (every caller's key blocks), which
    the slots keep as runs: the hint gives back the vector loads Triton's analysis cannot see
    through // and % (without it the fast output and dv kernels took 0.74 -> 1.25 and 0.83 ->
    1.42 ms, H200, 8K)."""
    if DK <= GATE_BLOCK:
        slots = cols
    else:
        HALF: tl.constexpr = GATE_BLOCK // 2
        slots = (cols % GATE_BLOCK) // HALF * (DK // 2) + cols // GATE_BLOCK * HALF + cols % HALF
        slots = tl.max_contiguous(tl.multiple_of(slots, HALF), HALF)
    return slots


@triton.jit
def load_chunk_gates(b_ptr, rows, mask, cols, DK: tl.constexpr):
    """b (chunk cumulative log gate) [C, len(cols)] fp32, 0 on padding rows."""
    return tl.load(b_ptr + rows[:, None] * DK + gate_slots(cols, DK)[None, :], mask=mask[:, None], other=0.0)


@triton.jit
def load_gate_row(b_ptr, start, eos, row: tl.constexpr, n, head, R_T, R_N, cols, DK: tl.constexpr):
    """b [len(cols)] at row `row` of the chunk that starts at token `start` (at its last row when
    the sequence ends before): one row read, where a min over the chunk's rows would need a
    reduction across warps."""
    tok = start + tl.minimum(row, eos - start - 1)
    return tl.load(b_ptr + token_rows(tok, n, head, R_T, R_N) * DK + gate_slots(cols, DK))


@triton.jit
def load_cumulative_gates(b_ptr, rows, mask, cols, C: tl.constexpr, S: tl.constexpr, DK: tl.constexpr):
    """bw (cumulative log gate from the sub-chunk start), b (from the chunk start) [C, len(cols)]
    and b_end [len(cols)]."""
    rc = tl.arange(0, C)
    b = load_chunk_gates(b_ptr, rows, mask, cols, DK)
    b_end = tl.min(b, axis=0)  # b never rises along the chunk (a sum of terms <= 0)
    bw = b
    for i in tl.static_range(1, C // S):
        before = tl.min(tl.where(rc[:, None] < i * S, b, 0.0), axis=0)
        bw -= tl.where(rc[:, None] // S == i, before[None, :], 0.0)
    return tl.where(mask[:, None], bw, 0.0), b, b_end


@triton.jit
def chunk_fast_flag(b_ref, b_end, LIMIT: tl.constexpr):
    """Whether a chunk takes the whole-chunk product kernels (fast.py): LIMIT >= 0 and
    every factor exp(b_t - b_r), exp(b_r - b_s) of the chunk lies in [e^-LIMIT, e^LIMIT], from
    b_r [DK] (the cumulative gate at the reference row r = C/2 - 1, or at the last row of a
    shorter chunk) and b_end [DK] (at the last row)."""
    return (tl.min(b_ref, axis=0) >= -LIMIT) & (tl.min(b_end - b_ref, axis=0) >= -LIMIT) & (LIMIT >= 0)


@triton.jit
def intra_chunk_scores(
    phi_q, phi_k, b, bw, k_ptr, b_ptr, start, eos, n, head, R_T, R_N, key_max, S_T, S_N, S_H,
    C: tl.constexpr, S: tl.constexpr, DK: tl.constexpr, DT: tl.constexpr,
):
    """A[t, s] = sum_i phi_q[t,i] phi_k[s,i] exp(b[t,i] - b[s,i]) for s <= t in the chunk (unscaled).

    Blocks below the diagonal of sub-chunks: products with the reference at the start of the
    query's sub-chunk (every factor <= 1). Diagonal sub-chunk blocks: an elementwise loop
    (exponents of differences <= 0 only)."""
    NS: tl.constexpr = C // S
    rc = tl.arange(0, C)
    cols = tl.arange(0, DK)
    blk = rc // S
    within = rc % S
    A = tl.zeros([C, C], dtype=tl.float32)
    q_w = (phi_q * tl.exp(bw)).to(DT)
    for i in tl.static_range(1, NS):
        ref = last_row(b, C, i * S - 1)
        k_w = tl.where(rc[:, None] < i * S, phi_k * tl.exp(tl.minimum(ref[None, :] - b, 0.0)), 0.0)
        part = tl.dot(q_w, tl.trans(k_w.to(DT)))
        A += tl.where(blk[:, None] == i, part, 0.0)
    for j in range(S):
        col = rc - within + j  # column of key j of this row's sub-chunk
        src = start + col
        smask = (src < eos) & (within >= j)
        krow = input_rows(src, n, head, S_T, S_N, S_H)
        kj = tl.load(k_ptr + krow[:, None] + cols[None, :], mask=smask[:, None], other=0.0).to(tl.float32)
        bj = tl.load(b_ptr + token_rows(src, n, head, R_T, R_N)[:, None] * DK + gate_slots(cols, DK)[None, :], mask=smask[:, None],
            other=0.0)
        w = tl.where(smask[:, None], tl.exp(kj - key_max + tl.minimum(b - bj, 0.0)), 0.0)
        val = tl.sum(phi_q * w, axis=1)
        A += tl.where(rc[None, :] == col[:, None], val[:, None], 0.0)
    return A


@triton.jit
def chunk_location(table_ptr, cu_ptr, ic, C: tl.constexpr):
    """(sequence, chunk in sequence, first token, end of sequence) of global chunk ic."""
    n = tl.load(table_ptr + 2 * ic).to(tl.int64)
    c = tl.load(table_ptr + 2 * ic + 1).to(tl.int64)
    bos = tl.load(cu_ptr + n).to(tl.int64)
    eos = tl.load(cu_ptr + n + 1).to(tl.int64)
    return n, c, bos + c * C, eos


@triton.jit
def state_tile(ic, head, H, rk, rv, DK: tl.constexpr, DV: tl.constexpr):
    """Element offsets [len(rk), len(rv)] of block (rk, rv) of chunk ic's state in a buffer of its
    own ([chunks, H, DK, DV]: the state gradients, and the states where `state_offsets` says so)."""
    return (ic.to(tl.int64) * H + head) * DK * DV + rk[:, None] * DV + rv[None, :]


@triton.jit
def state_offsets(
    ic, n, head, H, rk, rv, start, eos, R_T, R_N, spill, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
    BV: tl.constexpr, IN_GRADS: tl.constexpr,
):
    """Element offsets [len(rk), len(rv)] of block (rk, rv) of chunk ic's start state h (chunk of
    sequence n from token `start`; BV = len(rv), a run of whole multiples of it). Without IN_GRADS
    h has a buffer of its own (`state_tile`). With IN_GRADS h lies in the gradient arena of dq and
    dk (`buffers.GradArena`: a row of 2 DK per token and head, dq's then dk's): the
    GATE_BLOCK key rows ik of a whole chunk's h take the bytes of that chunk's dq and dk columns of
    key block ik (2 GATE_BLOCK per token: one h row per token at DV = 2 GATE_BLOCK, two at DV =
    GATE_BLOCK), so the dq/dk program of key block ik writes over no h but what it read. The
    last, shorter chunk of a sequence has too few rows: its h lies at `spill` + its sequence's
    [H, DK, DV] block instead."""
    if IN_GRADS:
        PER_TOKEN: tl.constexpr = 2 * GATE_BLOCK // DV
        local = rk % GATE_BLOCK
        row0 = token_rows(start, n, head, R_T, R_N)
        rpart = (row0 + (local // PER_TOKEN) * R_T) * (2 * DK) + (local % PER_TOKEN) * DK + rk // GATE_BLOCK * GATE_BLOCK
        cpart = rv // GATE_BLOCK * DK + rv % GATE_BLOCK
        if BV < GATE_BLOCK:
            cpart = tl.max_contiguous(tl.multiple_of(cpart, BV), BV)
        else:
            cpart = tl.max_contiguous(tl.multiple_of(cpart, GATE_BLOCK), GATE_BLOCK)
        spilled = spill + (n.to(tl.int64) * H + head) * DK * DV + rk[:, None] * DV + rv[None, :]
        offsets = tl.where(start + C <= eos, rpart[:, None] + cpart[None, :], spilled)
    else:
        offsets = state_tile(ic, head, H, rk, rv, DK, DV)
    return offsets


@triton.jit
def load_state(
    ptr, offsets, ic, n, head, H, rk, rv, DK: tl.constexpr, DV: tl.constexpr, add_ptr, decay_ptr, HAS_ADD: tl.constexpr,
):
    """Block [len(rk), len(rv)] (fp32) of chunk ic's stored state (or state gradient) at `offsets`
    (`state_offsets`, `state_tile`); with HAS_ADD plus exp(decay[ic, head, rk]) * add[n, head, rk, rv]:
    a state entering sequence n from outside, carried to this chunk (context parallelism: the
    sequence is one segment)."""
    x = tl.load(ptr + offsets).to(tl.float32)
    if HAS_ADD:
        decay = tl.load(decay_ptr + (ic.to(tl.int64) * H + head) * DK + rk)
        x += tl.exp(decay)[:, None] * tl.load(add_ptr + (n * H + head) * DK * DV + rk[:, None] * DV + rv[None, :])
    return x


@triton.jit
def load_logit_bias(bias_ptr, head, cols, DK: tl.constexpr):
    """(gate-logit bias, refine-logit bias) [len(cols)] fp32 of one head (bias: fp32 [H, 2 DK],
    each head's [b_g | b_r], `chunk_regla(gate_bias=...)`)."""
    return tl.load(bias_ptr + head * 2 * DK + cols), tl.load(bias_ptr + head * 2 * DK + DK + cols)


@triton.jit
def store_gate_grads(
    score_terms, dk_end, g_h, b_end, z_ptr, u_ptr, dz_ptr, du_ptr, zrows, rows, mask, cols, DK: tl.constexpr,
    GS: tl.constexpr, bias_ptr, head, HAS_BIAS: tl.constexpr,
):
    """dz, du of one chunk ([C, len(cols)] each, stored) from d log F_t =
        sum_{t' >= t} score_terms_{t'}      (phi_q dQ - phi_k dK of the intra-chunk scores),
      + sum_{s < t} dk_end_s                (keys before t, through the chunk-end state),
      + exp(b_end) g_h                      (the start state: g_h = rowsum(h * dh)),
    both running sums in one scan. GS: the row stride of dz and du in rows of DK, 1 (each
    contiguous) or 2 (a 16-bit gate arena over b, `buffers.gate_arena`: du_ptr = dz_ptr +
    DK). The program writes over no b but what it read (`gate_slots`), after a barrier. HAS_BIAS:
    the logits' bias added first (`load_logit_bias`)."""
    step = score_terms - dk_end  # one scan for both sums
    d_log_f = (tl.sum(score_terms, axis=0) + tl.exp(b_end) * g_h)[None, :] + step - tl.cumsum(step, axis=0)
    z = tl.load(z_ptr + zrows[:, None] + cols[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    u = tl.load(u_ptr + zrows[:, None] + cols[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    if HAS_BIAS:
        z_bias, u_bias = load_logit_bias(bias_ptr, head, cols, DK)
        z += z_bias[None, :]
        u += u_bias[None, :]
    dz_coef, du_coef = refined_log_gate_grad_tl(z, u)
    dz = (d_log_f * dz_coef).to(dz_ptr.dtype.element_ty)
    du = (d_log_f * du_coef).to(du_ptr.dtype.element_ty)
    offsets = rows[:, None] * (GS * DK) + cols[None, :]
    if GS == 2:
        # The stores below overwrite b of other features of this program's rows, read by other
        # threads: all of the program's reads of b before any of them (the products and
        # reductions above imply such a barrier already; this one does not rely on it).
        tl.debug_barrier()
    tl.store(dz_ptr + offsets, dz, mask=mask[:, None])
    tl.store(du_ptr + offsets, du, mask=mask[:, None])


@triton.jit
def sub_chunk_scores(
    q_ptr, k_ptr, b_ptr, kmax_ptr, n, head, H, R_T, R_N, rows, qrows, mask, start, eos, S_T, S_N, S_H,
    C: tl.constexpr, S: tl.constexpr, DK: tl.constexpr, DT: tl.constexpr,
):
    """Of a chunk for the sub-chunk kernels: phi_q, phi_k, bw, b [C, DK], b_end [DK], the key max,
    the unscaled intra-chunk scores A [C, C] (`intra_chunk_scores`) and rowmax q [C]."""
    rk = tl.arange(0, DK)
    key_max = tl.load(kmax_ptr + n * H + head).to(tl.float32)
    bw, b, b_end = load_cumulative_gates(b_ptr, rows, mask, rk, C, S, DK)
    phi_q, q_max = load_query_features(q_ptr, qrows, mask, DK, 0.0)
    phi_k = load_key_features(k_ptr, qrows, mask, key_max, rk, 0.0)
    A = intra_chunk_scores(
        phi_q, phi_k, b, bw, k_ptr, b_ptr, start, eos, n, head, R_T, R_N, key_max, S_T, S_N, S_H, C, S, DK, DT
    )
    return phi_q, phi_k, bw, b, b_end, key_max, A, q_max


@triton.jit
def chunk_rows(table_ptr, cu_ptr, flag_ptr, ic, head, H, R_T, R_N, C: tl.constexpr):
    """(sequence, first token, end of sequence, row mask [C], rows [C] (`token_rows`), flag)
    of global chunk ic for one head; flag 1 = the whole-chunk product kernels take it."""
    n, c, start, eos = chunk_location(table_ptr, cu_ptr, ic, C)
    tok = start + tl.arange(0, C)
    flag = tl.load(flag_ptr + ic.to(tl.int64) * H + head)
    return n, start, eos, tok < eos, token_rows(tok, n, head, R_T, R_N), flag
