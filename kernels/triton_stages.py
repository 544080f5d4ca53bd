"""Triton stages of the chunked ReGLA kernels, shared by forward and backward.

Conventions (REGLA_SPEC sections 1 and 3). Every tensor is a packed [T_total, H, D] view;
sequence n covers tokens [cu[n], cu[n+1]) and is cut into chunks of C tokens, each chunk
into C // S sub-chunks of S tokens. Inside a chunk, b is the cumulative log gate from the
chunk start and bw the cumulative log gate from the sub-chunk start. Every gate factor is
exp of a difference that is <= 0:
  - sub-chunk i against earlier tokens of the chunk: (q * exp(bw)) . (k * exp(b[iS-1] - b)),
  - diagonal sub-chunk blocks: elementwise exp(bw_t - bw_s), s <= t,
  - chunk against its start state: q * exp(b); state update: k * exp(b_C - b), exp(b_C).
Padding rows past a sequence end are masked to phi = 0 and log F = 0 (no state change).

The state pass (chunk_fwd_states) is the only stage that evaluates the gate from its
logits in the forward; it also writes bw (fp32, [T, H, dk]) so that the parallel stages
read the cumulative gates instead of recomputing them, and read single rows of them
(with k or q) straight from memory for the elementwise diagonal blocks.
"""

import triton
import triton.language as tl

LOG_TWO = tl.constexpr(0.6931471805599453)


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
    """(d log F / dz, d log F / du), each factor formed so no exponent is positive."""
    log_g, log_not_g, log_r, log_w = _gate_parts(z, u)
    dz = tl.exp(log_not_g) * (1.0 + (1.0 - 2.0 * tl.exp(log_r)) * tl.exp(tl.minimum(log_g - log_w, 0.0)))
    du = tl.exp(log_r - u) * tl.exp(tl.minimum(LOG_TWO + log_r + log_not_g - log_w, 0.0))
    return dz, du


@triton.jit
def load_chunk_gates(z_ptr, u_ptr, rows, mask, cols, DK: tl.constexpr):
    """log F of one chunk [C, len(cols)] in fp32, 0 on padding rows. rows: token*H + head."""
    z = tl.load(z_ptr + rows[:, None] * DK + cols[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows[:, None] * DK + cols[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    return tl.where(mask[:, None], refined_log_gate_tl(z, u), 0.0)


@triton.jit
def load_query_features(q_ptr, rows, mask, DK: tl.constexpr):
    """phi_q = exp(q - rowmax q) [C, DK] fp32, 0 on padding rows."""
    cols = tl.arange(0, DK)
    q = tl.load(q_ptr + rows[:, None] * DK + cols[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    q = q - tl.max(q, axis=1)[:, None]
    return tl.where(mask[:, None], tl.exp(q), 0.0)


@triton.jit
def load_query_features_cols(q_ptr, rows, mask, cols, DK: tl.constexpr):
    """Columns `cols` of phi_q [C, len(cols)] (the row max still over all DK features)."""
    full = tl.load(q_ptr + rows[:, None] * DK + tl.arange(0, DK)[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    q = tl.load(q_ptr + rows[:, None] * DK + cols[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    return tl.where(mask[:, None], tl.exp(q - tl.max(full, axis=1)[:, None]), 0.0)


@triton.jit
def load_key_features(k_ptr, rows, mask, key_max, cols, DK: tl.constexpr):
    """phi_k = exp(k - M) [C, len(cols)] fp32, 0 on padding rows."""
    k = tl.load(k_ptr + rows[:, None] * DK + cols[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    return tl.where(mask[:, None], tl.exp(k - key_max), 0.0)


@triton.jit
def last_row(x, C: tl.constexpr, row: tl.constexpr):
    """x[row, :] of a [C, D] register tile, as a [D] vector."""
    r = tl.arange(0, C)
    return tl.sum(tl.where(r[:, None] == row, x, 0.0), axis=0)


@triton.jit
def sub_chunk_cumsum(log_f, C: tl.constexpr, S: tl.constexpr, DK: tl.constexpr):
    """Cumulative sum of log F restarted at every sub-chunk of S tokens: [C, DK]."""
    x = tl.reshape(log_f, (C // S, S, DK))
    return tl.reshape(tl.cumsum(x, axis=1), (C, DK))


@triton.jit
def load_cumulative_gates(bw_ptr, rows, mask, cols, C: tl.constexpr, S: tl.constexpr, DK: tl.constexpr):
    """bw (sub-chunk cumulative log gate), b (chunk cumulative) [C, len(cols)] and b_end [len(cols)]."""
    blk = tl.arange(0, C) // S
    bw = tl.load(bw_ptr + rows[:, None] * DK + cols[None, :], mask=mask[:, None], other=0.0)
    b = bw
    b_end = tl.sum(tl.zeros_like(bw), axis=0)
    for i in tl.static_range(C // S):
        # bw never rises inside a sub-chunk, so its total is the min over the valid rows
        total = tl.min(tl.where(blk[:, None] == i, bw, 0.0), axis=0)
        b += tl.where(blk[:, None] > i, total[None, :], 0.0)
        b_end += total
    return bw, b, b_end


@triton.jit
def intra_chunk_scores(
    phi_q, phi_k, b, bw, k_ptr, bw_ptr, start, eos, head, H, key_max,
    C: tl.constexpr, S: tl.constexpr, DK: tl.constexpr, DT: tl.constexpr, DIAG_LIMIT: tl.constexpr,
):
    """A[t, s] = sum_i phi_q[t,i] phi_k[s,i] exp(b[t,i] - b[s,i]) for s <= t in the chunk (unscaled).

    Diagonal sub-chunk blocks: when every sub-chunk's total log gate is >= -DIAG_LIMIT (the
    common case), exp(bw_t - bw_s) = exp(bw_t) * exp(-bw_s) with both factors in
    [e^-DIAG_LIMIT, e^DIAG_LIMIT] and one masked matrix product does it; otherwise the
    elementwise loop (exponents of differences <= 0 only)."""
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
    if DIAG_LIMIT >= 0 and tl.min(tl.min(bw, axis=1), axis=0) >= -DIAG_LIMIT:
        k_f = (phi_k * tl.exp(-bw)).to(DT)
        part = tl.dot(q_w, tl.trans(k_f))
        A += tl.where((blk[:, None] == blk[None, :]) & (rc[:, None] >= rc[None, :]), part, 0.0)
    else:
        for j in range(S):
            col = rc - within + j  # column of key j of this row's sub-chunk
            src = start + col
            smask = (src < eos) & (within >= j)
            srow = src * H + head
            kj = tl.load(k_ptr + srow[:, None] * DK + cols[None, :], mask=smask[:, None], other=0.0).to(tl.float32)
            bj = tl.load(bw_ptr + srow[:, None] * DK + cols[None, :], mask=smask[:, None], other=0.0)
            w = tl.where(smask[:, None], tl.exp(kj - key_max + tl.minimum(bw - bj, 0.0)), 0.0)
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
def chunk_fwd_states_kernel(
    k_ptr, v_ptr, z_ptr, u_ptr, kmax_ptr, h0_ptr, h_ptr, ht_ptr, bw_ptr, cu_ptr, choff_ptr,
    H, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, S: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, DT: tl.constexpr,
):
    """Sequential over chunks, one (BK x BV) block of the state: h[chunk] = state at the chunk
    start, ht = final state (fp32), bw = sub-chunk cumulative log gates (first value block)."""
    ik = tl.program_id(0) // (DV // BV)
    iv = tl.program_id(0) % (DV // BV)
    nh = tl.program_id(1)
    n = nh // H
    head = nh % H
    bos = tl.load(cu_ptr + n).to(tl.int64)
    eos = tl.load(cu_ptr + n + 1).to(tl.int64)
    first = tl.load(choff_ptr + n).to(tl.int64)
    rk = ik * BK + tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    key_max = tl.load(kmax_ptr + nh).to(tl.float32)
    tile = rk[:, None] * DV + rv[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(h0_ptr + nh.to(tl.int64) * DK * DV + tile).to(tl.float32)
    for c in range(tl.cdiv(eos - bos, C)):
        tl.store(h_ptr + ((first + c) * H + head) * DK * DV + tile, state.to(h_ptr.dtype.element_ty))
        tok = bos + c * C + rc
        mask = tok < eos
        rows = tok * H + head
        log_f = load_chunk_gates(z_ptr, u_ptr, rows, mask, rk, DK)
        if iv == 0:
            bw = sub_chunk_cumsum(log_f, C, S, BK)
            tl.store(bw_ptr + rows[:, None] * DK + rk[None, :], bw, mask=mask[:, None])
        b = tl.cumsum(log_f, axis=0)
        b_end = last_row(b, C, C - 1)
        phi_k = load_key_features(k_ptr, rows, mask, key_max, rk, DK)
        k_end = phi_k * tl.exp(tl.minimum(b_end[None, :] - b, 0.0))
        v = tl.load(v_ptr + rows[:, None] * DV + rv[None, :], mask=mask[:, None], other=0.0)
        state = state * tl.exp(b_end)[:, None] + tl.dot(tl.trans(k_end.to(DT)), v.to(DT))
    if STORE_HT:
        tl.store(ht_ptr + nh.to(tl.int64) * DK * DV + tile, state)


@triton.jit
def chunk_fwd_output_kernel(
    q_ptr, k_ptr, v_ptr, bw_ptr, kmax_ptr, h_ptr, o_ptr, table_ptr, cu_ptr, scale,
    H, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, S: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
    DIAG_LIMIT: tl.constexpr,
):
    """o = scale * (A v + (phi_q * exp(b)) h_start) for one chunk, one head, BV value columns."""
    iv = tl.program_id(0)
    ic = tl.program_id(1)
    head = tl.program_id(2)
    n, c, start, eos = chunk_location(table_ptr, cu_ptr, ic, C)
    rc = tl.arange(0, C)
    rk = tl.arange(0, DK)
    rv = iv * BV + tl.arange(0, BV)
    tok = start + rc
    mask = tok < eos
    rows = tok * H + head
    key_max = tl.load(kmax_ptr + n * H + head).to(tl.float32)
    bw, b, b_end = load_cumulative_gates(bw_ptr, rows, mask, rk, C, S, DK)
    phi_q = load_query_features(q_ptr, rows, mask, DK)
    phi_k = load_key_features(k_ptr, rows, mask, key_max, rk, DK)
    A = intra_chunk_scores(phi_q, phi_k, b, bw, k_ptr, bw_ptr, start, eos, head, H, key_max, C, S, DK, DT, DIAG_LIMIT)
    v = tl.load(v_ptr + rows[:, None] * DV + rv[None, :], mask=mask[:, None], other=0.0).to(DT)
    h = tl.load(h_ptr + (ic.to(tl.int64) * H + head) * DK * DV + rk[:, None] * DV + rv[None, :]).to(DT)
    o = tl.dot(A.to(DT), v) + tl.dot((phi_q * tl.exp(b)).to(DT), h)
    tl.store(o_ptr + rows[:, None] * DV + rv[None, :], (o * scale).to(o_ptr.dtype.element_ty), mask=mask[:, None])


@triton.jit
def chunk_bwd_dstates_kernel(
    q_ptr, bw_ptr, do_ptr, dht_ptr, dh_ptr, dh0_ptr, cu_ptr, choff_ptr, scale,
    H, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, S: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DHT: tl.constexpr, DT: tl.constexpr,
):
    """Reverse over chunks, one (BK x BV) block: dh[chunk] = dL/d(state at the chunk end);
    dh0 = dL/d(initial state)."""
    ik = tl.program_id(0) // (DV // BV)
    iv = tl.program_id(0) % (DV // BV)
    nh = tl.program_id(1)
    n = nh // H
    head = nh % H
    bos = tl.load(cu_ptr + n).to(tl.int64)
    eos = tl.load(cu_ptr + n + 1).to(tl.int64)
    first = tl.load(choff_ptr + n).to(tl.int64)
    rk = ik * BK + tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    tile = rk[:, None] * DV + rv[None, :]
    dstate = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dstate += tl.load(dht_ptr + nh.to(tl.int64) * DK * DV + tile).to(tl.float32)
    count = tl.cdiv(eos - bos, C)
    for cc in range(count):
        c = count - 1 - cc
        tl.store(dh_ptr + ((first + c) * H + head) * DK * DV + tile, dstate.to(dh_ptr.dtype.element_ty))
        tok = bos + c * C + rc
        mask = tok < eos
        rows = tok * H + head
        bw, b, b_end = load_cumulative_gates(bw_ptr, rows, mask, rk, C, S, DK)
        q_start = load_query_features_cols(q_ptr, rows, mask, rk, DK) * tl.exp(b) * scale
        do = tl.load(do_ptr + rows[:, None] * DV + rv[None, :], mask=mask[:, None], other=0.0)
        dstate = dstate * tl.exp(b_end)[:, None] + tl.dot(tl.trans(q_start.to(DT)), do.to(DT))
    tl.store(dh0_ptr + nh.to(tl.int64) * DK * DV + tile, dstate)


@triton.jit
def chunk_bwd_main_kernel(
    q_ptr, k_ptr, v_ptr, z_ptr, u_ptr, bw_ptr, kmax_ptr, h_ptr, dh_ptr, do_ptr,
    dq_ptr, dk_ptr, dv_ptr, dz_ptr, du_ptr, table_ptr, cu_ptr, scale,
    H, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, S: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
    DIAG_LIMIT: tl.constexpr,
):
    """All input gradients of one chunk and head, from h (state at the chunk start) and dh
    (gradient at the chunk end). The gate gradient uses the reverse-cumsum identity
    dlogF_t = sum_{t' >= t in chunk} (phi_q dQ - phi_k dK)_{t'} + rowsum(S_end * dS_end)."""
    NS: tl.constexpr = C // S
    ic = tl.program_id(0)
    head = tl.program_id(1)
    n, c, start, eos = chunk_location(table_ptr, cu_ptr, ic, C)
    rc = tl.arange(0, C)
    rk = tl.arange(0, DK)
    cols = rk[None, :]
    blk = rc // S
    within = rc % S
    tok = start + rc
    mask = tok < eos
    rows = tok * H + head
    key_max = tl.load(kmax_ptr + n * H + head).to(tl.float32)
    bw, b, b_end = load_cumulative_gates(bw_ptr, rows, mask, rk, C, S, DK)
    phi_q = load_query_features(q_ptr, rows, mask, DK)
    phi_k = load_key_features(k_ptr, rows, mask, key_max, rk, DK)
    A = intra_chunk_scores(phi_q, phi_k, b, bw, k_ptr, bw_ptr, start, eos, head, H, key_max, C, S, DK, DT, DIAG_LIMIT)
    At = tl.trans((A * scale).to(DT))
    state_base = (ic.to(tl.int64) * H + head) * DK * DV

    # pass 1 over value blocks: dA, the state part of dQ, dv
    dA = tl.zeros([C, C], dtype=tl.float32)
    dq_state = tl.zeros([C, DK], dtype=tl.float32)
    for iv in range(DV // BV):
        rv = iv * BV + tl.arange(0, BV)
        v = tl.load(v_ptr + rows[:, None] * DV + rv[None, :], mask=mask[:, None], other=0.0).to(DT)
        do = tl.load(do_ptr + rows[:, None] * DV + rv[None, :], mask=mask[:, None], other=0.0).to(DT)
        h = tl.load(h_ptr + state_base + rk[:, None] * DV + rv[None, :]).to(DT)
        dh = tl.load(dh_ptr + state_base + rk[:, None] * DV + rv[None, :]).to(DT)
        dA += tl.dot(do, tl.trans(v))
        dq_state += tl.dot(do, tl.trans(h))
        k_end = (phi_k * tl.exp(tl.minimum(b_end[None, :] - b, 0.0))).to(DT)
        dv = tl.dot(At, do) + tl.dot(k_end, dh)
        tl.store(dv_ptr + rows[:, None] * DV + rv[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mask[:, None])
    dA = tl.where((rc[:, None] >= rc[None, :]) & mask[:, None], dA * scale, 0.0)
    dA_dt = dA.to(DT)

    # dQ (gradient w.r.t. phi_q): earlier sub-chunks by products, own sub-chunk elementwise
    dq_off = tl.zeros([C, DK], dtype=tl.float32)
    for i in tl.static_range(1, NS):
        ref = last_row(b, C, i * S - 1)
        k_w = tl.where(rc[:, None] < i * S, phi_k * tl.exp(tl.minimum(ref[None, :] - b, 0.0)), 0.0)
        part = tl.dot(dA_dt, k_w.to(DT))
        dq_off += tl.where(blk[:, None] == i, part, 0.0)
    dQ = dq_off * tl.exp(bw) + dq_state * tl.exp(b) * scale
    factorized = tl.min(tl.min(bw, axis=1), axis=0) >= -DIAG_LIMIT  # as in intra_chunk_scores
    if DIAG_LIMIT >= 0 and factorized:
        dA_diag = tl.where(blk[:, None] == blk[None, :], dA, 0.0).to(DT)
        dQ += tl.dot(dA_diag, (phi_k * tl.exp(-bw)).to(DT)) * tl.exp(bw)
    else:
        for jd in range(S):
            col = rc - within + jd
            src = start + col
            smask = (src < eos) & (within >= jd)
            srow = src * H + head
            kj = tl.load(k_ptr + srow[:, None] * DK + cols, mask=smask[:, None], other=0.0).to(tl.float32)
            bj = tl.load(bw_ptr + srow[:, None] * DK + cols, mask=smask[:, None], other=0.0)
            dAj = tl.sum(tl.where(rc[None, :] == col[:, None], dA, 0.0), axis=1)
            dQ += tl.where(smask[:, None], dAj[:, None] * tl.exp(kj - key_max + tl.minimum(bw - bj, 0.0)), 0.0)
    tl.store(dq_ptr + rows[:, None] * DK + cols, (dQ * phi_q).to(dq_ptr.dtype.element_ty), mask=mask[:, None])
    D = phi_q * dQ

    # pass 2 over value blocks: the state part of dK and the chunk-end term of the gate gradient
    dk_state = tl.zeros([C, DK], dtype=tl.float32)
    g_end = tl.zeros([DK], dtype=tl.float32)
    k_end = (phi_k * tl.exp(tl.minimum(b_end[None, :] - b, 0.0))).to(DT)
    for iv in range(DV // BV):
        rv = iv * BV + tl.arange(0, BV)
        v = tl.load(v_ptr + rows[:, None] * DV + rv[None, :], mask=mask[:, None], other=0.0).to(DT)
        h = tl.load(h_ptr + state_base + rk[:, None] * DV + rv[None, :]).to(tl.float32)
        dh = tl.load(dh_ptr + state_base + rk[:, None] * DV + rv[None, :])
        dk_state += tl.dot(v, tl.trans(dh.to(DT)))
        s_end = h * tl.exp(b_end)[:, None] + tl.dot(tl.trans(k_end), v)
        g_end += tl.sum(s_end * dh.to(tl.float32), axis=1)

    # dK (gradient w.r.t. phi_k): later sub-chunks by products, own sub-chunk elementwise
    dAt_dt = tl.trans(dA_dt)
    dk_off = tl.zeros([C, DK], dtype=tl.float32)
    for j in tl.static_range(0, NS - 1):
        ref = last_row(b, C, j * S + S - 1)
        q_w = tl.where(rc[:, None] >= (j + 1) * S, phi_q * tl.exp(tl.minimum(b - ref[None, :], 0.0)), 0.0)
        part = tl.dot(dAt_dt, q_w.to(DT))
        dk_off += tl.where(blk[:, None] == j, part, 0.0)
    sub_end = tl.zeros([C, DK], dtype=tl.float32)
    for i in tl.static_range(NS):
        total = tl.min(tl.where(blk[:, None] == i, bw, 0.0), axis=0)
        sub_end += tl.where(blk[:, None] == i, total[None, :], 0.0)
    dK = dk_off * tl.exp(tl.minimum(sub_end - bw, 0.0)) + dk_state * tl.exp(tl.minimum(b_end[None, :] - b, 0.0))
    if DIAG_LIMIT >= 0 and factorized:
        dA_diag_t = tl.trans(tl.where(blk[:, None] == blk[None, :], dA, 0.0).to(DT))
        dK += tl.dot(dA_diag_t, (phi_q * tl.exp(bw)).to(DT)) * tl.exp(-bw)
    else:
        for jd in range(S):
            row = rc - within + jd  # query jd of this key's sub-chunk
            src = start + row
            smask = (src < eos) & (within <= jd)
            srow = src * H + head
            qj = tl.load(q_ptr + srow[:, None] * DK + cols, mask=smask[:, None], other=0.0).to(tl.float32)
            qj = qj - tl.max(qj, axis=1)[:, None]
            bj = tl.load(bw_ptr + srow[:, None] * DK + cols, mask=smask[:, None], other=0.0)
            dAj = tl.sum(tl.where(rc[:, None] == row[None, :], dA, 0.0), axis=0)
            dK += tl.where(smask[:, None], dAj[:, None] * tl.exp(qj + tl.minimum(bj - bw, 0.0)), 0.0)
    tl.store(dk_ptr + rows[:, None] * DK + cols, (dK * phi_k).to(dk_ptr.dtype.element_ty), mask=mask[:, None])
    D -= phi_k * dK

    # gate gradient: reverse cumsum inside the chunk + the chunk-end state term
    d_log_f = tl.sum(D, axis=0)[None, :] - tl.cumsum(D, axis=0) + D + g_end[None, :]
    z = tl.load(z_ptr + rows[:, None] * DK + cols, mask=mask[:, None], other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows[:, None] * DK + cols, mask=mask[:, None], other=0.0).to(tl.float32)
    dz_coef, du_coef = refined_log_gate_grad_tl(z, u)
    tl.store(dz_ptr + rows[:, None] * DK + cols, (d_log_f * dz_coef).to(dz_ptr.dtype.element_ty), mask=mask[:, None])
    tl.store(du_ptr + rows[:, None] * DK + cols, (d_log_f * du_coef).to(du_ptr.dtype.element_ty), mask=mask[:, None])
