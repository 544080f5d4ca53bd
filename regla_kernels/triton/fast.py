"""Whole-chunk product path of the chunked ReGLA kernels (the common case).

Inside a chunk, the gate factor of a score is exp(b_t - b_s) (b: cumulative log gate from
the chunk start). With a reference row r (r = C/2 - 1) it is exp(b_t - b_r) * exp(b_r - b_s),
so the intra-chunk scores are ONE masked product (phi_q exp(b - b_r)) (phi_k exp(b_r - b))^T,
and the state term is phi_q exp(b_t) h = (phi_q exp(b_t - b_r)) (exp(b_r) h). Every factor
lies in [e^-L, e^L] (L = LAUNCH["fast_limit"], 60) when, for every key feature of the chunk,

    b_r >= -L and b_end - b_r >= -L,

which is all that bf16/fp32 products need (their range is e^+-88). `chunk_gates_kernel`
decides this once per chunk and head and stores a flag; chunks without it (total log decay
of some feature below about -2 L: gates near 0) take the sub-chunk kernels of
stages.py with fp32 (tf32) products. All score terms are positive, so rounding the
two factors to the product dtype costs a relative 2^-8 (bf16) per score, as in any bf16
product, with no cancellation.

Backward, gate gradient: with the rounded factors Qr, Kr (the values the products used),
    d log F_t = sum_{t' >= t} Qr dQ~ (= dq) - sum_{s >= t} Kr dK~      (score terms)
              + sum_{s < t} k_end_s * (v_s dh^T) + exp(b_end) * rowsum(h * dh),
the score terms cancel exactly for the pairs that do not straddle t (both routes use the
same rounded factors) and the state terms are direct sums, so bf16 gate gradients keep
bf16 accuracy.
"""

import triton
import triton.language as tl

from regla_kernels.triton.stages import (
    chunk_rows,
    input_rows,
    load_chunk_gates,
    load_gate_row,
    load_key_features,
    load_query_features,
    load_query_features_cols,
    load_state,
    load_value_rows,
    state_offsets,
    state_tile,
    store_gate_grads,
)

# A carried state (or state gradient) reaches a chunk through exp(decay + a gate exponent <= 0);
# where the decay is below CARRY_REACH for every key feature that factor is 0 in fp32
# (e^-105 < 2^-151), so the chunk skips the carried product with the same result. Bits of the
# per-chunk reach flags (`segments.segment_chunk_decays`):
CARRY_REACH = tl.constexpr(-105.0)
REACHED_FROM_START = tl.constexpr(1)  # the state entering at the segment start (output kernel)
REACHED_FROM_END = tl.constexpr(2)  # the state gradient entering at the segment end (dv kernel)


@triton.jit
def carry_launch_takes(reach_ptr, ic, head, H, BIT: tl.constexpr, CARRY: tl.constexpr):
    """Whether this launch takes chunk ic: CARRY 0 (no carried state) always; with a carried
    state the chunks are split over two launches by their reach flag bit BIT, CARRY 1 (without the
    carried product) taking those it does not reach, CARRY 2 (with it) those it does."""
    takes = True
    if CARRY != 0:  # (a constexpr branch: without a carried state reach_ptr may be any placeholder)
        bit = tl.load(reach_ptr + ic.to(tl.int64) * H + head).to(tl.int32) & BIT
        if CARRY == 2:
            takes = bit != 0
        else:
            takes = bit == 0
    return takes


@triton.jit
def key_side(k_ptr, kmax_ptr, b_ptr, n, head, H, R_T, R_N, start, eos, rows, krows, mask, rk, DK: tl.constexpr, C: tl.constexpr):
    """Of a fast chunk, key features rk: b [C, len(rk)], b_end, b_r (b at the reference row
    r = C/2 - 1, or b_end when the chunk is shorter) and the fp32 key factor
    K~ = phi_k * exp(b_r - b) [C, len(rk)] (one exponential per element)."""
    b = load_chunk_gates(b_ptr, rows, mask, rk, DK)
    b_end = load_gate_row(b_ptr, start, eos, C - 1, n, head, R_T, R_N, rk, DK)
    b_ref = load_gate_row(b_ptr, start, eos, C // 2 - 1, n, head, R_T, R_N, rk, DK)
    key_max = tl.load(kmax_ptr + n * H + head).to(tl.float32)
    return b, b_end, b_ref, load_key_features(k_ptr, krows, mask, key_max, rk, b_ref[None, :] - b)


@triton.jit
def carried_factor(x, log_scale, decay_ptr, ic, head, H, rk, DK: tl.constexpr, DT: tl.constexpr):
    """x * exp(log_scale + decay[ic, head, rk]) [C, DK] in DT: the product operand that carries a
    state entering the sequence from outside (`load_state`'s add, decay from the sequence start
    or end to chunk ic) as a product of its own, so the state tile itself is never formed in fp32."""
    decay = tl.load(decay_ptr + (ic.to(tl.int64) * H + head) * DK + rk)
    return (x * tl.exp(log_scale + decay)[None, :]).to(DT)


@triton.jit
def load_carried_state(add_ptr, n, head, H, rk, rv, DK: tl.constexpr, DV: tl.constexpr):
    """Block [len(rk), len(rv)] of the state entering sequence n from outside (its stored dtype)."""
    return tl.load(add_ptr + (n * H + head) * DK * DV + rk[:, None] * DV + rv[None, :])


@triton.jit
def chunk_fwd_output_fast_kernel(
    q_ptr, k_ptr, v_ptr, b_ptr, flag_ptr, kmax_ptr, h_ptr, hadd_ptr, hdecay_ptr, reach_ptr, o_ptr, qmax_ptr, table_ptr, cu_ptr,
    scale, spill, H, R_T, R_N, S_T, S_N, S_H, V_T, V_N, V_H, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
    DT: tl.constexpr, CARRY: tl.constexpr, IN_GRADS: tl.constexpr,
):
    """o = scale * (tril(Q~ K~^T) v + Q~ (exp(b_r) h)) for one safe chunk, one head, BV value
    columns at a time (CARRY: see `carry_launch_takes`; 2 adds the carried state's product);
    rowmax q into qmax (fp32 [T, H]) for the backward."""
    HAS_HADD: tl.constexpr = CARRY == 2
    ic = tl.program_id(0)
    head = tl.program_id(1)
    n, start, eos, mask, rows, fast = chunk_rows(table_ptr, cu_ptr, flag_ptr, ic, head, H, R_T, R_N, C)
    rc = tl.arange(0, C)
    rk = tl.arange(0, DK)
    if fast != 0 and carry_launch_takes(reach_ptr, ic, head, H, REACHED_FROM_START, CARRY):
        qrows = input_rows(start + rc, n, head, S_T, S_N, S_H)
        vrows = input_rows(start + rc, n, head, V_T, V_N, V_H)
        b, b_end, b_ref, k_t = key_side(k_ptr, kmax_ptr, b_ptr, n, head, H, R_T, R_N, start, eos, rows, qrows, mask, rk, DK, C)
        q_t32, q_max = load_query_features(q_ptr, qrows, mask, DK, b - b_ref[None, :])
        tl.store(qmax_ptr + rows, q_max, mask=mask)
        q_t = q_t32.to(DT)
        k_t = k_t.to(DT)
        A = tl.where(rc[:, None] >= rc[None, :], tl.dot(q_t, tl.trans(k_t)), 0.0).to(DT)
        decay_ref = tl.exp(b_ref)
        if HAS_HADD:
            q_carry = carried_factor(q_t32, b_ref, hdecay_ptr, ic, head, H, rk, DK, DT)
        for iv in range(DV // BV):
            rv = iv * BV + tl.arange(0, BV)
            v = tl.load(v_ptr + vrows[:, None] + rv[None, :], mask=mask[:, None], other=0.0).to(DT)
            h_at = state_offsets(ic, n, head, H, rk, rv, start, eos, R_T, R_N, spill, DK, DV, C, BV, IN_GRADS)
            h = load_state(h_ptr, h_at, ic, n, head, H, rk, rv, DK, DV, hadd_ptr, hdecay_ptr, False)
            o = tl.dot(A, v) + tl.dot(q_t, (h * decay_ref[:, None]).to(DT))
            if HAS_HADD:
                o += tl.dot(q_carry, load_carried_state(hadd_ptr, n, head, H, rk, rv, DK, DV).to(DT))
            tl.store(o_ptr + rows[:, None] * DV + rv[None, :], (o * scale).to(o_ptr.dtype.element_ty), mask=mask[:, None])


@triton.jit
def chunk_bwd_dv_fast_kernel(
    q_ptr, k_ptr, v_ptr, b_ptr, flag_ptr, kmax_ptr, dh_ptr, dhadd_ptr, dhdecay_ptr, reach_ptr, do_ptr, dv_ptr, da_ptr,
    table_ptr, cu_ptr, scale,
    H, R_T, R_N, S_T, S_N, S_H, V_T, V_N, V_H, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
    DT: tl.constexpr, CARRY: tl.constexpr,
):
    """dv = (scale tril(Q~ K~^T))^T do + k_end dh for one safe chunk and head (BV value columns
    at a time; CARRY: see `carry_launch_takes`, 2 adds the carried state gradient's product), and
    the score gradient dA = scale tril(do v^T) (DT [C, C] into da, for `chunk_bwd_dqk_fast_kernel`)."""
    HAS_DHADD: tl.constexpr = CARRY == 2
    ic = tl.program_id(0)
    head = tl.program_id(1)
    n, start, eos, mask, rows, fast = chunk_rows(table_ptr, cu_ptr, flag_ptr, ic, head, H, R_T, R_N, C)
    rc = tl.arange(0, C)
    rk = tl.arange(0, DK)
    if fast != 0 and carry_launch_takes(reach_ptr, ic, head, H, REACHED_FROM_END, CARRY):
        qrows = input_rows(start + rc, n, head, S_T, S_N, S_H)
        vrows = input_rows(start + rc, n, head, V_T, V_N, V_H)
        b, b_end, b_ref, k_t = key_side(k_ptr, kmax_ptr, b_ptr, n, head, H, R_T, R_N, start, eos, rows, qrows, mask, rk, DK, C)
        if HAS_DHADD:
            k_carry = carried_factor(k_t, b_end - b_ref, dhdecay_ptr, ic, head, H, rk, DK, DT)
        k_end = (k_t * tl.exp(b_end - b_ref)[None, :]).to(DT)  # phi_k exp(b_end - b)
        k_t = k_t.to(DT)
        q_t, _ = load_query_features(q_ptr, qrows, mask, DK, b - b_ref[None, :])
        q_t = q_t.to(DT)
        # A^T directly: K~ Q~^T, kept where s <= t (row s, column t)
        At = (tl.where(rc[:, None] <= rc[None, :], tl.dot(k_t, tl.trans(q_t)), 0.0) * scale).to(DT)
        dA = tl.zeros([C, C], dtype=tl.float32)
        for iv in range(DV // BV):
            rv = iv * BV + tl.arange(0, BV)
            v, do = load_value_rows(v_ptr, do_ptr, vrows, rows, mask, rv, DV, DT)
            dh = load_state(dh_ptr, state_tile(ic, head, H, rk, rv, DK, DV), ic, n, head, H, rk, rv, DK, DV, dhadd_ptr, dhdecay_ptr,
                False).to(DT)
            dv = tl.dot(At, do) + tl.dot(k_end, dh)
            if HAS_DHADD:
                dv += tl.dot(k_carry, load_carried_state(dhadd_ptr, n, head, H, rk, rv, DK, DV).to(DT))
            tl.store(dv_ptr + rows[:, None] * DV + rv[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mask[:, None])
            dA += tl.dot(do, tl.trans(v))
        dA = tl.where(rc[:, None] >= rc[None, :], dA * scale, 0.0)
        tl.store(da_ptr + (ic.to(tl.int64) * H + head) * C * C + rc[:, None] * C + rc[None, :], dA.to(da_ptr.dtype.element_ty))


@triton.jit
def chunk_bwd_dqk_fast_kernel(
    q_ptr, k_ptr, v_ptr, z_ptr, u_ptr, b_ptr, flag_ptr, kmax_ptr, qmax_ptr, da_ptr, h_ptr, hadd_ptr, hdecay_ptr,
    dh_ptr, dhadd_ptr, dhdecay_ptr, do_ptr, dq_ptr, dk_ptr, dz_ptr, du_ptr, table_ptr, cu_ptr, scale, spill, bias_ptr,
    H, R_T, R_N, S_T, S_N, S_H, V_T, V_N, V_H, Z_T, Z_N, Z_H, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, HAS_HADD: tl.constexpr, HAS_DHADD: tl.constexpr,
    GS: tl.constexpr, QS: tl.constexpr, IN_GRADS: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """dq, dk and both gate-logit gradients of one safe chunk, one head, BK key features
    (every one of them is separable over the key features once dA is known: it is read from
    `chunk_bwd_dv_fast_kernel`'s output). QS: the row stride of dq and dk in rows of DK, 1 or 2
    (the gradient arena; with IN_GRADS h lies in it, `state_offsets`, and BK must be GATE_BLOCK:
    the program then writes over no h but what it read)."""
    ik = tl.program_id(0)
    ic = tl.program_id(1)
    head = tl.program_id(2)
    n, start, eos, mask, rows, fast = chunk_rows(table_ptr, cu_ptr, flag_ptr, ic, head, H, R_T, R_N, C)
    rc = tl.arange(0, C)
    rk = ik * BK + tl.arange(0, BK)
    cols = rk[None, :]
    if fast != 0:
        qrows = input_rows(start + rc, n, head, S_T, S_N, S_H)
        vrows = input_rows(start + rc, n, head, V_T, V_N, V_H)
        dq_state = tl.zeros([C, BK], dtype=tl.float32)
        dk_state = tl.zeros([C, BK], dtype=tl.float32)
        g_h = tl.zeros([BK], dtype=tl.float32)
        # Without carried states, the state products come first, on h and dh as stored (exp(b_r)
        # scales dq's columns after), b and the feature tiles loaded after them: fewer registers
        # live across the loop (H200, 8K: 5.66 -> 5.59 ms). With carried states (segments,
        # context parallelism) that order costs 0.35 ms (32K as segments: 6.45 against 6.10 ms),
        # so there b comes first and the state tiles (stored plus carried, fp32) are scaled
        # before the product.
        CARRIED: tl.constexpr = HAS_HADD or HAS_DHADD
        if CARRIED:
            b, b_end, b_ref, k_t32 = key_side(k_ptr, kmax_ptr, b_ptr, n, head, H, R_T, R_N, start, eos, rows, qrows, mask, rk, DK, C)
            decay_ref = tl.exp(b_ref)
        for iv in range(DV // BV):
            rv = iv * BV + tl.arange(0, BV)
            v, do = load_value_rows(v_ptr, do_ptr, vrows, rows, mask, rv, DV, DT)
            h_at = state_offsets(ic, n, head, H, rk, rv, start, eos, R_T, R_N, spill, DK, DV, C, BV, IN_GRADS)
            h = load_state(h_ptr, h_at, ic, n, head, H, rk, rv, DK, DV, hadd_ptr, hdecay_ptr, HAS_HADD)
            dh = load_state(dh_ptr, state_tile(ic, head, H, rk, rv, DK, DV), ic, n, head, H, rk, rv, DK, DV, dhadd_ptr, dhdecay_ptr,
                HAS_DHADD)
            if CARRIED:
                dq_state += tl.dot(do, tl.trans((h * decay_ref[:, None]).to(DT)))
                dk_state += tl.dot(v, tl.trans(dh.to(DT)))
                g_h += tl.sum(h * dh, axis=1)
            else:
                h = h.to(DT)
                dh = dh.to(DT)
                dq_state += tl.dot(do, tl.trans(h))
                dk_state += tl.dot(v, tl.trans(dh))
                g_h += tl.sum(h.to(tl.float32) * dh.to(tl.float32), axis=1)
        dA = tl.load(da_ptr + (ic.to(tl.int64) * H + head) * C * C + rc[:, None] * C + rc[None, :])
        if not CARRIED:
            b, b_end, b_ref, k_t32 = key_side(k_ptr, kmax_ptr, b_ptr, n, head, H, R_T, R_N, start, eos, rows, qrows, mask, rk, DK, C)
        k_t = k_t32.to(DT)
        q_t = load_query_features_cols(q_ptr, qmax_ptr, qrows, rows, mask, rk, b - b_ref[None, :]).to(DT)
        if CARRIED:
            dq = q_t.to(tl.float32) * (dq_state * scale + tl.dot(dA, k_t))
        else:
            dq = q_t.to(tl.float32) * tl.dot(dA, k_t, dq_state * (tl.exp(b_ref) * scale)[None, :])
        if IN_GRADS:
            tl.debug_barrier()  # every thread's reads of h before dq and dk overwrite it
        tl.store(dq_ptr + rows[:, None] * (QS * DK) + cols, dq.to(dq_ptr.dtype.element_ty), mask=mask[:, None])
        dk_scores = k_t.to(tl.float32) * tl.dot(tl.trans(dA), q_t)
        dk_end = k_t32 * tl.exp(b_end - b_ref)[None, :] * dk_state  # phi_k exp(b_end - b) dk_state
        tl.store(dk_ptr + rows[:, None] * (QS * DK) + cols, (dk_scores + dk_end).to(dk_ptr.dtype.element_ty), mask=mask[:, None])

        zrows = input_rows(start + rc, n, head, Z_T, Z_N, Z_H)
        store_gate_grads(
            dq - dk_scores, dk_end, g_h, b_end, z_ptr, u_ptr, dz_ptr, du_ptr, zrows, rows, mask, rk, DK, GS, bias_ptr, head, HAS_BIAS,
        )
