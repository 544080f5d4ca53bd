"""The kernels of the chunked ReGLA stages that `launch.py` launches, but for the whole-chunk
products (fast.py): the gates, the sequential state and state-gradient passes, the sub-chunk
work list, and the sub-chunk output and gradient kernels for chunks of fast-decaying gates.

The conventions (token rows, b, the gate factors) and the device functions these kernels share
with fast.py are in stages.py.
"""

import triton
import triton.language as tl

from regla_kernels.triton.stages import (
    chunk_fast_flag,
    chunk_location,
    chunk_rows,
    gate_slots,
    input_rows,
    last_row,
    load_chunk_gates,
    load_gate_row,
    load_key_features,
    load_logit_bias,
    load_query_features_cols,
    load_state,
    load_value_rows,
    refined_log_gate_tl,
    state_offsets,
    state_tile,
    store_gate_grads,
    sub_chunk_scores,
    token_rows,
)


@triton.jit
def chunk_gates_kernel(
    z_ptr, u_ptr, k_ptr, b_ptr, bend_ptr, flag_ptr, kmax_ptr, work_ptr, table_ptr, cu_ptr, bias_ptr,
    H, R_T, R_N, S_T, S_N, S_H, Z_T, Z_N, Z_H, DK: tl.constexpr, C: tl.constexpr, LIMIT: tl.constexpr,
    KEY_MAX: tl.constexpr, STAGES: tl.constexpr, WORK: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """One chunk, one head, token by token: b = cumulative log F from the chunk start (fp32,
    valid rows), the chunk's total log decay b_end (fp32 [DK]) and the flag of
    `chunk_fast_flag` (int8). With KEY_MAX also the key max: the chunk's max of k joins its
    sequence's entry of kmax (fp32 [N, H], -inf before) by an atomic max. HAS_BIAS: the logits'
    bias added first (`load_logit_bias`). With WORK a flag-0
    chunk joins the sub-chunk kernels' work list (`slow_chunks_kernel`'s layout, count 0 before),
    which then needs no launch of its own.

    The program walks the chunk's rows (one contiguous row of z, u and k per step, STAGES
    loads in flight) and keeps b as a running sum in registers: no scan across threads. On
    the H200 this took the gates from 1.07 ms ([C, 16] tiles with tl.cumsum, issue-bound) to
    0.61 ms at 64K tokens (docs/kernels.md). Two heads or four per program, or a chunk's rows as
    2-8 groups walked side by side (a shorter walk), were not faster."""
    ic = tl.program_id(0)
    head = tl.program_id(1)
    n, c, start, eos = chunk_location(table_ptr, cu_ptr, ic, C)
    rk = tl.arange(0, DK)
    b = tl.zeros([DK], dtype=tl.float32)
    b_ref = tl.zeros([DK], dtype=tl.float32)
    k_max = tl.full([DK], float("-inf"), tl.float32)
    if HAS_BIAS:
        z_bias, u_bias = load_logit_bias(bias_ptr, head, rk, DK)
    for t in tl.range(0, tl.minimum(eos - start, C), num_stages=STAGES):
        tok = start + t
        zcols = input_rows(tok, n, head, Z_T, Z_N, Z_H) + rk
        z = tl.load(z_ptr + zcols).to(tl.float32)
        u = tl.load(u_ptr + zcols).to(tl.float32)
        if HAS_BIAS:
            z += z_bias
            u += u_bias
        b += refined_log_gate_tl(z, u)
        tl.store(b_ptr + token_rows(tok, n, head, R_T, R_N) * DK + gate_slots(rk, DK), b)
        b_ref = tl.where(t < C // 2, b, b_ref)  # b at row C/2 - 1, or at the last row of a shorter chunk
        if KEY_MAX:
            k_max = tl.maximum(k_max, tl.load(k_ptr + input_rows(tok, n, head, S_T, S_N, S_H) + rk).to(tl.float32))
    tl.store(bend_ptr + (ic.to(tl.int64) * H + head) * DK + rk, b)
    flag = chunk_fast_flag(b_ref, b, LIMIT)
    tl.store(flag_ptr + ic.to(tl.int64) * H + head, flag.to(tl.int8))
    if WORK:
        if flag == 0:
            slot = tl.atomic_add(work_ptr, 1)
            tl.store(work_ptr + 1 + slot, (ic * H + head).to(tl.int32))
    if KEY_MAX:
        tl.atomic_max(kmax_ptr + n * H + head, tl.max(k_max, axis=0))


@triton.jit
def slow_chunks_kernel(flag_ptr, work_ptr, N, BLOCK: tl.constexpr):
    """The work list of the sub-chunk kernels: every (chunk, head) item ic * H + head whose flag
    (int8 [chunks * H]) is 0 goes to work[1 + slot] (int32), work[0] counting them (0 before).
    One atomic per block of BLOCK flags reserves its slots; the list order is immaterial (each
    item is one program's own output)."""
    items = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    slow = (tl.load(flag_ptr + items, mask=items < N, other=1) == 0).to(tl.int32)
    first = tl.atomic_add(work_ptr, tl.sum(slow, axis=0))
    tl.store(work_ptr + first + tl.cumsum(slow, axis=0), items, mask=slow != 0)


@triton.jit
def work_item(work_ptr, w, H):
    """(chunk, head) of entry w of a `slow_chunks_kernel` work list."""
    item = tl.load(work_ptr + 1 + w)
    return item // H, item % H


@triton.jit
def chunk_fwd_states_kernel(
    k_ptr, v_ptr, b_ptr, kmax_ptr, h0_ptr, h_ptr, ht_ptr, starts_ptr, cu_ptr, choff_ptr, every, N, spill,
    H, R_T, R_N, S_T, S_N, S_H, V_T, V_N, V_H, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, DT: tl.constexpr, STARTS: tl.constexpr, IN_GRADS: tl.constexpr,
):
    """Sequential over chunks, one (BK x BV) block of the state: h[chunk] = state at the chunk
    start; with STORE_HT the final state ht (fp32). With STARTS also a second copy of the state at
    every `every`-th chunk of each sequence but its first, starts[j - 1, n] (h's dtype,
    [windows - 1, N, H, dk, dv]) at chunk j * every: the low-memory backward's window starts.
    h where `state_offsets` puts it (spill, IN_GRADS)."""
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
        h_at = state_offsets(first + c, n, head, H, rk, rv, bos + c * C, eos, R_T, R_N, spill, DK, DV, C, BV, IN_GRADS)
        tl.store(h_ptr + h_at, state.to(h_ptr.dtype.element_ty))
        if STARTS:
            if (c > 0) & (c % every == 0):
                tl.store(starts_ptr + ((c // every - 1) * N * H + nh) * DK * DV + tile, state.to(starts_ptr.dtype.element_ty))
        tok = bos + c * C + rc
        mask = tok < eos
        rows = token_rows(tok, n, head, R_T, R_N)
        krows = input_rows(tok, n, head, S_T, S_N, S_H)
        b = load_chunk_gates(b_ptr, rows, mask, rk, DK)
        b_end = load_gate_row(b_ptr, bos + c * C, eos, C - 1, n, head, R_T, R_N, rk, DK)
        k_end = load_key_features(k_ptr, krows, mask, key_max, rk, b_end[None, :] - b)
        v = tl.load(v_ptr + input_rows(tok, n, head, V_T, V_N, V_H)[:, None] + rv[None, :], mask=mask[:, None], other=0.0)
        state = state * tl.exp(b_end)[:, None] + tl.dot(tl.trans(k_end.to(DT)), v.to(DT))
    if STORE_HT:
        tl.store(ht_ptr + nh.to(tl.int64) * DK * DV + tile, state)


@triton.jit
def chunk_fwd_output_kernel(
    q_ptr, k_ptr, v_ptr, b_ptr, flag_ptr, kmax_ptr, h_ptr, hadd_ptr, hdecay_ptr, o_ptr, qmax_ptr, table_ptr, cu_ptr, work_ptr,
    scale, spill, H, R_T, R_N, S_T, S_N, S_H, V_T, V_N, V_H, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, S: tl.constexpr,
    BV: tl.constexpr, DT: tl.constexpr, HAS_HADD: tl.constexpr, IN_GRADS: tl.constexpr,
):
    """o = scale * (A v + (phi_q * exp(b)) h_start) for the chunks of the work list (flag 0,
    `slow_chunks_kernel`), BV value columns, the programs taking its entries in turn; rowmax q
    into qmax (fp32 [T, H]) for the backward."""
    for w in range(tl.program_id(1), tl.load(work_ptr), tl.num_programs(1)):
        ic, head = work_item(work_ptr, w, H)
        n, start, eos, mask, rows, fast = chunk_rows(table_ptr, cu_ptr, flag_ptr, ic, head, H, R_T, R_N, C)
        rk = tl.arange(0, DK)
        rv = tl.program_id(0) * BV + tl.arange(0, BV)
        qrows = input_rows(start + tl.arange(0, C), n, head, S_T, S_N, S_H)
        phi_q, phi_k, bw, b, b_end, key_max, A, q_max = sub_chunk_scores(
            q_ptr, k_ptr, b_ptr, kmax_ptr, n, head, H, R_T, R_N, rows, qrows, mask, start, eos, S_T, S_N, S_H, C, S, DK, DT
        )
        if tl.program_id(0) == 0:
            tl.store(qmax_ptr + rows, q_max, mask=mask)
        vrows = input_rows(start + tl.arange(0, C), n, head, V_T, V_N, V_H)
        v = tl.load(v_ptr + vrows[:, None] + rv[None, :], mask=mask[:, None], other=0.0).to(DT)
        h_at = state_offsets(ic, n, head, H, rk, rv, start, eos, R_T, R_N, spill, DK, DV, C, BV, IN_GRADS)
        h = load_state(h_ptr, h_at, ic, n, head, H, rk, rv, DK, DV, hadd_ptr, hdecay_ptr, HAS_HADD).to(DT)
        o = tl.dot(A.to(DT), v) + tl.dot((phi_q * tl.exp(b)).to(DT), h)
        tl.store(o_ptr + rows[:, None] * DV + rv[None, :], (o * scale).to(o_ptr.dtype.element_ty), mask=mask[:, None])


@triton.jit
def chunk_bwd_dstates_kernel(
    q_ptr, qmax_ptr, b_ptr, do_ptr, dht_ptr, dh_ptr, dh0_ptr, cu_ptr, choff_ptr, scale,
    H, R_T, R_N, S_T, S_N, S_H, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
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
        rows = token_rows(tok, n, head, R_T, R_N)
        b = load_chunk_gates(b_ptr, rows, mask, rk, DK)
        b_end = load_gate_row(b_ptr, bos + c * C, eos, C - 1, n, head, R_T, R_N, rk, DK)
        qrows = input_rows(tok, n, head, S_T, S_N, S_H)
        q_start = load_query_features_cols(q_ptr, qmax_ptr, qrows, rows, mask, rk, b) * scale
        do = tl.load(do_ptr + rows[:, None] * DV + rv[None, :], mask=mask[:, None], other=0.0)
        dstate = dstate * tl.exp(b_end)[:, None] + tl.dot(tl.trans(q_start.to(DT)), do.to(DT))
    tl.store(dh0_ptr + nh.to(tl.int64) * DK * DV + tile, dstate)


@triton.jit
def chunk_bwd_main_kernel(
    q_ptr, k_ptr, v_ptr, z_ptr, u_ptr, b_ptr, flag_ptr, kmax_ptr, h_ptr, hadd_ptr, hdecay_ptr,
    dh_ptr, dhadd_ptr, dhdecay_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, dz_ptr, du_ptr, table_ptr, cu_ptr, work_ptr, scale, spill,
    bias_ptr, H, R_T, R_N, S_T, S_N, S_H, V_T, V_N, V_H, Z_T, Z_N, Z_H, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
    S: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, HAS_HADD: tl.constexpr,
    HAS_DHADD: tl.constexpr, GS: tl.constexpr, QS: tl.constexpr, IN_GRADS: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """All input gradients of the chunks of the work list (flag 0, `slow_chunks_kernel`), one
    (chunk, head) at a time per program, from h (state at the chunk start, `state_offsets`) and dh
    (gradient at the chunk end). The gate gradient uses the reverse-cumsum identity
    dlogF_t = sum_{t' >= t in chunk} (phi_q dQ - phi_k dK_scores)_{t'}
              + sum_{s < t} k_end_s * (v_s dh^T) + exp(b_end) * rowsum(h * dh).
    QS: the row stride of dq and dk in rows of DK, 1 or 2 (the gradient arena, IN_GRADS: h is
    read in the first pass only, before dq and dk are written over it)."""
    NS: tl.constexpr = C // S
    for w in range(tl.program_id(0), tl.load(work_ptr), tl.num_programs(0)):
        ic, head = work_item(work_ptr, w, H)
        n, start, eos, mask, rows, fast = chunk_rows(table_ptr, cu_ptr, flag_ptr, ic, head, H, R_T, R_N, C)
        rc = tl.arange(0, C)
        rk = tl.arange(0, DK)
        cols = rk[None, :]
        blk = rc // S
        within = rc % S
        qrows = input_rows(start + rc, n, head, S_T, S_N, S_H)
        vrows = input_rows(start + rc, n, head, V_T, V_N, V_H)
        phi_q, phi_k, bw, b, b_end, key_max, A, _ = sub_chunk_scores(
            q_ptr, k_ptr, b_ptr, kmax_ptr, n, head, H, R_T, R_N, rows, qrows, mask, start, eos, S_T, S_N, S_H, C, S, DK, DT
        )
        At = tl.trans((A * scale).to(DT))

        # pass 1 over value blocks: dA, the state part of dQ, dv, rowsum(h * dh) for the gate gradient
        dA = tl.zeros([C, C], dtype=tl.float32)
        dq_state = tl.zeros([C, DK], dtype=tl.float32)
        g_h = tl.zeros([DK], dtype=tl.float32)
        for iv in range(DV // BV):
            rv = iv * BV + tl.arange(0, BV)
            v, do = load_value_rows(v_ptr, do_ptr, vrows, rows, mask, rv, DV, DT)
            h_at = state_offsets(ic, n, head, H, rk, rv, start, eos, R_T, R_N, spill, DK, DV, C, BV, IN_GRADS)
            h32 = load_state(h_ptr, h_at, ic, n, head, H, rk, rv, DK, DV, hadd_ptr, hdecay_ptr, HAS_HADD)
            dh32 = load_state(dh_ptr, state_tile(ic, head, H, rk, rv, DK, DV), ic, n, head, H, rk, rv, DK, DV, dhadd_ptr, dhdecay_ptr,
                HAS_DHADD)
            g_h += tl.sum(h32 * dh32, axis=1)
            h = h32.to(DT)
            dh = dh32.to(DT)
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
        for jd in range(S):
            col = rc - within + jd
            src = start + col
            smask = (src < eos) & (within >= jd)
            krow = input_rows(src, n, head, S_T, S_N, S_H)
            kj = tl.load(k_ptr + krow[:, None] + cols, mask=smask[:, None], other=0.0).to(tl.float32)
            bj = tl.load(b_ptr + token_rows(src, n, head, R_T, R_N)[:, None] * DK + gate_slots(rk, DK)[None, :], mask=smask[:,
                None], other=0.0)
            dAj = tl.sum(tl.where(rc[None, :] == col[:, None], dA, 0.0), axis=1)
            dQ += tl.where(smask[:, None], dAj[:, None] * tl.exp(kj - key_max + tl.minimum(b - bj, 0.0)), 0.0)
        if IN_GRADS:
            tl.debug_barrier()  # every thread's reads of h before dq and dk overwrite it
        tl.store(dq_ptr + rows[:, None] * (QS * DK) + cols, (dQ * phi_q).to(dq_ptr.dtype.element_ty), mask=mask[:, None])
        D = phi_q * dQ

        # pass 2 over value blocks: the state part of dK
        dk_state = tl.zeros([C, DK], dtype=tl.float32)
        for iv in range(DV // BV):
            rv = iv * BV + tl.arange(0, BV)
            v = tl.load(v_ptr + vrows[:, None] + rv[None, :], mask=mask[:, None], other=0.0).to(DT)
            dh = load_state(dh_ptr, state_tile(ic, head, H, rk, rv, DK, DV), ic, n, head, H, rk, rv, DK, DV, dhadd_ptr, dhdecay_ptr,
                HAS_DHADD)
            dk_state += tl.dot(v, tl.trans(dh.to(DT)))
        dk_end = phi_k * tl.exp(tl.minimum(b_end[None, :] - b, 0.0)) * dk_state

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
        dK = dk_off * tl.exp(tl.minimum(sub_end - bw, 0.0))
        for jd in range(S):
            row = rc - within + jd  # query jd of this key's sub-chunk
            src = start + row
            smask = (src < eos) & (within <= jd)
            qrow = input_rows(src, n, head, S_T, S_N, S_H)
            qj = tl.load(q_ptr + qrow[:, None] + cols, mask=smask[:, None], other=0.0).to(tl.float32)
            qj = qj - tl.max(qj, axis=1)[:, None]
            bj = tl.load(b_ptr + token_rows(src, n, head, R_T, R_N)[:, None] * DK + gate_slots(rk, DK)[None, :], mask=smask[:,
                None], other=0.0)
            dAj = tl.sum(tl.where(rc[:, None] == row[None, :], dA, 0.0), axis=0)
            dK += tl.where(smask[:, None], dAj[:, None] * tl.exp(qj + tl.minimum(bj - b, 0.0)), 0.0)
        dK = dK * phi_k
        tl.store(dk_ptr + rows[:, None] * (QS * DK) + cols, (dK + dk_end).to(dk_ptr.dtype.element_ty), mask=mask[:, None])
        D -= dK

        zrows = input_rows(start + rc, n, head, Z_T, Z_N, Z_H)
        store_gate_grads(D, dk_end, g_h, b_end, z_ptr, u_ptr, dz_ptr, du_ptr, zrows, rows, mask, rk, DK, GS, bias_ptr, head, HAS_BIAS)
