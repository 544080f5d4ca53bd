"""The Python launchers of the Triton ReGLA kernels, one per stage (REGLA_SPEC section 3).

Forward : `gates` (parallel over chunks, token by token: the cumulative log gate b per chunk
          from the logits, one flag per chunk: whole-chunk products or sub-chunk kernels, and
          the key max), `fwd_states` (sequential over chunks: the state at every chunk start,
          the final state), `fwd_output` (parallel over chunks, by flag: the whole-chunk kernel
          over the grid, the sub-chunk kernel over a work list of its chunks, `slow_chunks`;
          both also keep each token's query max for the backward).
Backward: `bwd_dstates` (reverse over chunks: the state gradients, the initial state's) and
          `bwd_main` (parallel, by flag: dv and the score gradient, then dq, dk and both
          gate-logit gradients).
Arguments common to the launchers: cu, offsets, table, total (`layout.chunk_tables`);
`order`, the row order of the per-token tensors (`layout.row_order`; sequences one after
another by default); `bias`, the logits' bias as the kernels read it (`kernel_bias`) or None.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from regla_kernels.triton.buffers import empty, pair_stride, state_args
from regla_kernels.triton.chunk_kernels import (
    chunk_bwd_dstates_kernel,
    chunk_bwd_main_kernel,
    chunk_fwd_output_kernel,
    chunk_fwd_states_kernel,
    chunk_gates_kernel,
    slow_chunks_kernel,
)
from regla_kernels.triton.fast import chunk_bwd_dqk_fast_kernel, chunk_bwd_dv_fast_kernel, chunk_fwd_output_fast_kernel
from regla_kernels.triton.layout import dims, input_strides
from regla_kernels.triton.settings import CHUNK_SIZE, LAUNCH, dot_dtype, fast_limit, multiprocessors, register_cap, state_dtype
from regla_kernels.triton.stages import GATE_BLOCK


def output_block_v(dv: int) -> int:
    """Value block of the sub-chunk output kernel for value head dim dv (LAUNCH["block_v"])."""
    return min(dv, LAUNCH["block_v"])


def state_programs(dk: int, dv: int, sequences_heads: int) -> int:
    """Programs of a state pass over `sequences_heads` (sequence, head) pairs with the LAUNCH key
    and value blocks."""
    return sequences_heads * (dk // min(dk, LAUNCH["states_block_k"])) * (dv // min(dv, LAUNCH["states_block_v"]))


def state_blocks(dk: int, dv: int, sequences_heads: int) -> Tuple[int, int]:
    """(key block, value block) of the sequential state passes over `sequences_heads` (sequence,
    head) pairs: key block 32 where the usual one would leave some of the GPU's multiprocessors
    idle (few long sequences)."""
    bk, bv = min(dk, LAUNCH["states_block_k"]), min(dv, LAUNCH["states_block_v"])
    if bk > 32 and state_programs(dk, dv, sequences_heads) < multiprocessors():
        bk = 32
    check_key_block(bk, dk, "states_block_k")
    return bk, bv


def check_key_block(block: int, dk: int, setting: str, over_b: bool = False) -> None:
    """Raise ValueError unless `block` (LAUNCH[setting]) suits b's rows at key head dim dk. A key
    block of b's readers must cover whole runs of `stages.gate_slots` (GATE_BLOCK / 2 features
    from multiples of it) where b's rows are permuted (dk > GATE_BLOCK): the kernels tell Triton
    so for vector loads. The dq/dk kernel writing the gate gradients over b (over_b) must take
    exactly the key blocks b's rows are laid out for."""
    if over_b and block != min(dk, GATE_BLOCK.value):
        raise ValueError(
            f"LAUNCH['{setting}'] = {block}: with the gate gradients over b (16-bit inputs) the dq/dk "
            f"kernel's key block must be {GATE_BLOCK.value} (stages.GATE_BLOCK, b's row layout)"
        )
    if dk > GATE_BLOCK.value and block < GATE_BLOCK.value // 2:
        raise ValueError(f"LAUNCH['{setting}'] = {block}: key blocks must be at least {GATE_BLOCK.value // 2} at dk = {dk}")


def bwd_block_v(dv: int) -> int:
    """Value block of the sub-chunk backward stage for value head dim dv (fp32 product operands):
    32 keeps it in shared memory."""
    return min(dv, 32)


def gates(z, u, k, cu, table, total, key_max=None, out=None, need_key_max=True, order=None, work=None, b=None, bias=None):
    """The gates stage. z, u, k: [T, H, dk] or [B, T, H, dk] (any float dtype of the kernels; z
    and u share one `layout.input_strides`, k has q's).

    Returns b (the cumulative log gate from each chunk start, fp32 [T, H, dk]), each chunk's
    total log decay (fp32 [chunks, H, dk]), the fast-path flags (int8 [chunks, H]) and the key
    max (fp32 [N, H]: `key_max` when given, else computed here from k, unless need_key_max is
    False: then None). `out`: the first three preallocated (contiguous views of larger buffers);
    `b`: only b preallocated (`buffers.gate_arena`). `work`: a zeroed `work_list` the flag-0
    chunks are appended to (as `slow_chunks` makes it)."""
    tokens, heads, dk = dims(z)
    order = (heads, 0) if order is None else order
    if out is None:
        out = (
            empty(tokens, heads, dk, device=z.device, dtype=torch.float32) if b is None else b,
            empty(total, heads, dk, device=z.device, dtype=torch.float32),
            torch.empty(total, heads, device=z.device, dtype=torch.int8),
        )
    b, chunk_decay, flags = out
    compute_max = key_max is None and need_key_max
    if compute_max:
        key_max = torch.full((cu.numel() - 1, heads), float("-inf"), device=z.device, dtype=torch.float32)
    chunk_gates_kernel[(total, heads)](
        z, u, k, b, chunk_decay, flags, key_max if key_max is not None else b, work if work is not None else flags, table, cu,
        b if bias is None else bias,
        heads, *order, *input_strides(k), *input_strides(z), DK=dk, C=CHUNK_SIZE, LIMIT=fast_limit(), KEY_MAX=compute_max,
        STAGES=LAUNCH["gates_stages"], WORK=work is not None, HAS_BIAS=bias is not None, num_warps=LAUNCH["gates_warps"],
        **register_cap("gates"),
    )
    return b, chunk_decay, flags, key_max


def fwd_states(k, v, b, key_max, h0, cu, offsets, total, store_final, out=None, order=None, starts=None, into=None):
    """The forward state pass. k [T, H, dk], v [T, H, dv] (or [B, T, ...]), b and key_max from
    `gates`, h0: fp32 [N, H, dk, dv] or None.

    Returns (h, final states): the states at every chunk start ([chunks, H, dk, dv] in
    `settings.state_dtype`) and, with store_final, the final states (fp32 [N, H, dk, dv]; else
    None). `out`: (h, final states) preallocated. `starts`: (buffer [W - 1, N, H, dk, dv] in h's dtype,
    chunks per window) to receive each later window's start state (equal sequences only).
    `into`: a `buffers.GradArena` to hold h (returned as h) instead of a buffer of its own."""
    tokens, heads, dk = dims(k)
    order = (heads, 0) if order is None else order
    dv = v.shape[-1]
    n = cu.numel() - 1
    if out is None:
        h = into if into is not None else empty(total, heads, dk, dv, device=k.device, dtype=state_dtype(k.dtype))
        ht = empty(n, heads, dk, dv, device=k.device, dtype=torch.float32) if store_final else None
    else:
        h, ht = out
    h_ptr, spill, in_grads = state_args(h)
    ht_ptr = ht if ht is not None else h_ptr
    bk, bv = state_blocks(dk, dv, n * heads)
    chunk_fwd_states_kernel[((dk // bk) * (dv // bv), n * heads)](
        k, v, b, key_max, h0 if h0 is not None else h_ptr, h_ptr, ht_ptr, h_ptr if starts is None else starts[0], cu, offsets,
        0 if starts is None else starts[1], n, spill,
        heads, *order, *input_strides(k), *input_strides(v), DK=dk, DV=dv, C=CHUNK_SIZE, BK=bk, BV=bv, HAS_H0=h0 is not None,
        STORE_HT=store_final, DT=dot_dtype(k.dtype), STARTS=starts is not None, IN_GRADS=in_grads,
        num_warps=LAUNCH["states_warps"], num_stages=LAUNCH["states_stages"],
        **register_cap("states"),
    )
    return h, (ht if store_final else None)


def work_list(chunks: int, heads: int, device: torch.device) -> torch.Tensor:
    """A zeroed sub-chunk work list (int32 [1 + chunks * heads], the layout of `slow_chunks`) for
    the gates kernel to fill (`gates(work=...)`)."""
    return torch.zeros(1 + chunks * heads, device=device, dtype=torch.int32)


def slow_chunks(flags: torch.Tensor) -> torch.Tensor:
    """Work list (int32 [1 + chunks * H]: the count, then the items ic * H + head) of the chunks
    whose flag is 0 in `flags` (int8 [chunks, H]), for the sub-chunk kernels: launched over the
    whole grid they cost about 0.16 ms at the record shape even where no chunk needs them (H200:
    programs that only read their flag, one per multiprocessor at a time at their register
    count)."""
    work = torch.empty(1 + flags.numel(), device=flags.device, dtype=torch.int32)
    work[:1].zero_()
    block = 1024
    slow_chunks_kernel[(triton.cdiv(flags.numel(), block),)](flags, work, flags.numel(), BLOCK=block, num_warps=4)
    return work


def slow_programs(total: int, heads: int) -> int:
    """Programs of a sub-chunk kernel launch over `total` chunks of `heads` heads: each takes
    work-list entries in turn."""
    return max(1, min(total * heads, LAUNCH["slow_programs_per_sm"] * multiprocessors()))


def carried(carry, like):
    """Kernel arguments (state fp32, decay, reach, flag) of an optional (state [N, H, dk, dv], decay
    [chunks, H, dk] fp32, reach int8 [chunks, H]) triple: a state entering each sequence from
    outside, added to every chunk's state with the decay from the sequence start (or end) to that
    chunk; reach flags which chunks it still reaches (`segments.segment_chunk_decays`). Without
    one (carry None) the placeholders are `like`, and the flag False."""
    if carry is None:
        return like, like, like, False  # placeholders the kernels do not read
    state, decay, reach = carry
    return state.float().contiguous(), decay.float().contiguous(), reach.contiguous(), True


def product_state(state, has_state: bool, dtype: torch.dtype):
    """A carried state (`carried`) for the fast kernels, which take it as a product operand in
    `settings.state_dtype` of the inputs' `dtype` (a placeholder stays as it is)."""
    return state.to(state_dtype(dtype)) if has_state else state


def carry_launches(has_carry: bool):
    """The CARRY values (a tuple of ints) of the fast output and dv kernels' launches
    (`fast.carry_launch_takes`): one
    launch without a carried state; with one, the chunks it no longer reaches in a launch without
    its product and the others in a launch with it (more registers: fewer programs per SM)."""
    return (1, 2) if has_carry else (0,)


def fwd_output(q, k, v, b, flags, key_max, h, table, cu, scale, total, h_carry=None, out=None, order=None, work=None):
    """The forward output stage. q, k [T, H, dk], v [T, H, dv] (or [B, T, ...]), b, flags and
    key_max from `gates`, h from `fwd_states` (a tensor or `buffers.GradArena`; plus `h_carry`,
    see `carried`).

    Returns o ([T, H, dv] in q's dtype) and each token's query max (fp32 [T, H], for the
    backward). `out`: both preallocated. `work`: the sub-chunk work list of these flags
    (`slow_chunks`), made here when not given."""
    tokens, heads, dk = dims(q)
    order = (heads, 0) if order is None else order
    dv = v.shape[-1]
    if out is None:
        out = (empty(tokens, heads, dv, device=q.device, dtype=q.dtype), empty(tokens, heads, device=q.device, dtype=torch.float32))
    o, q_max = out
    h_add, h_decay, reach, has_h_add = carried(h_carry, b)
    h, spill, in_grads = state_args(h)
    if fast_limit() >= 0:
        fast_add = product_state(h_add, has_h_add, q.dtype)
        for carry in carry_launches(has_h_add):
            block_v = LAUNCH["fast_output_block_v_carried" if carry == 2 else "fast_output_block_v"]
            chunk_fwd_output_fast_kernel[(total, heads)](
                q, k, v, b, flags, key_max, h, fast_add, h_decay, reach, o, q_max, table, cu, scale, spill,
                heads, *order, *input_strides(q), *input_strides(v), DK=dk, DV=dv, C=CHUNK_SIZE, BV=min(dv, block_v), DT=dot_dtype(q.dtype),
                CARRY=carry, IN_GRADS=in_grads, num_warps=LAUNCH["fast_output_warps"], num_stages=1, **register_cap("fast_output"),
            )
    bv = output_block_v(dv)
    work = slow_chunks(flags) if work is None else work
    chunk_fwd_output_kernel[(dv // bv, slow_programs(total, heads))](
        q, k, v, b, flags, key_max, h, h_add, h_decay, o, q_max, table, cu, work, scale, spill,
        heads, *order, *input_strides(q), *input_strides(v), DK=dk, DV=dv, C=CHUNK_SIZE, S=LAUNCH["sub_chunk"], BV=bv, DT=tl.float32,
        HAS_HADD=has_h_add, IN_GRADS=in_grads, num_warps=LAUNCH["output_warps"], num_stages=1,
    )
    return o, q_max


def bwd_dstates(q, q_max, b, do, dht, cu, offsets, scale, total, dv, order=None, dh0=None):
    """The backward state pass. q [T, H, dk], q_max and b of the forward, do: contiguous [T, H,
    dv], dht: the final states' gradient (fp32 [N, H, dk, dv]) or None.

    Returns dh (the gradient at every chunk end, [chunks, H, dk, dv] in h's dtype) and dh0 (at
    each sequence start, fp32 [N, H, dk, dv]; `dh0` preallocated, which may be dht itself)."""
    tokens, heads, dk = dims(q)
    order = (heads, 0) if order is None else order
    n = cu.numel() - 1
    dh = empty(total, heads, dk, dv, device=q.device, dtype=state_dtype(q.dtype))
    if dh0 is None:
        dh0 = empty(n, heads, dk, dv, device=q.device, dtype=torch.float32)
    bk, bv = state_blocks(dk, dv, n * heads)
    chunk_bwd_dstates_kernel[((dk // bk) * (dv // bv), n * heads)](
        q, q_max, b, do, dht if dht is not None else dh0, dh, dh0, cu, offsets, scale,
        heads, *order, *input_strides(q), DK=dk, DV=dv, C=CHUNK_SIZE, BK=bk, BV=bv, HAS_DHT=dht is not None, DT=dot_dtype(q.dtype),
        num_warps=LAUNCH["states_warps"], num_stages=LAUNCH["states_stages"], **register_cap("states"),
    )
    return dh, dh0


def bwd_main(
    q, k, v, z, u, b, flags, key_max, q_max, h, dh, do, table, cu, scale, total, h_carry=None, dh_carry=None, order=None, work=None,
    *, out, bias=None,
):
    """The backward gradient stages. Returns dq, dk, dv, dz, du ([T, H, D] each in its input's
    dtype) from h and dh (plus `h_carry`, `dh_carry`, see `carried`), written into `out` (views
    the kernels write at `order`'s rows: `buffers.value_grads` or a `buffers.GradArena`'s dq and
    dk, which must then be h's, and the gate arena's dz and du, `buffers.gate_arena`). do:
    contiguous [T, H, dv]. `work`: as in `fwd_output`."""
    _, heads, dk = dims(q)
    order = (heads, 0) if order is None else order
    dv = v.shape[-1]
    dt = dot_dtype(q.dtype)
    h_add, h_decay, _, has_h_add = carried(h_carry, b)
    dh_add, dh_decay, dh_reach, has_dh_add = carried(dh_carry, b)
    dq, dk_, dv_, dz, du = out
    bk = min(dk, LAUNCH["fast_dqk_block_k"])
    gate_stride = pair_stride(dz, du)
    grad_stride = pair_stride(dq, dk_)
    check_key_block(bk, dk, "fast_dqk_block_k", over_b=gate_stride == 2)
    h, spill, in_grads = state_args(h)
    if in_grads and (dq.data_ptr() != h.data_ptr() or grad_stride != 2 or bk != GATE_BLOCK.value):
        raise ValueError("Triton ReGLA kernels: states in a gradient arena need that arena's dq and dk, and dq/dk key blocks of GATE_BLOCK")
    if not flags.is_contiguous():  # the kernels index it as [chunks, H] rows
        raise ValueError("Triton ReGLA kernels: the chunk flags must be contiguous")
    if fast_limit() >= 0:
        score_grad = torch.empty(total, heads, CHUNK_SIZE, CHUNK_SIZE, device=q.device, dtype=state_dtype(q.dtype))
        fast_dh_add = product_state(dh_add, has_dh_add, q.dtype)
        for carry in carry_launches(has_dh_add):
            chunk_bwd_dv_fast_kernel[(total, heads)](
                q, k, v, b, flags, key_max, dh, fast_dh_add, dh_decay, dh_reach, do, dv_, score_grad, table, cu, scale,
                heads, *order, *input_strides(q), *input_strides(v), DK=dk, DV=dv, C=CHUNK_SIZE,
                BV=min(dv, LAUNCH["fast_dv_block_v"]), DT=dt, CARRY=carry, num_warps=LAUNCH["fast_dv_warps"],
                num_stages=LAUNCH["fast_dv_stages"], **register_cap("fast_dv"),
            )
        chunk_bwd_dqk_fast_kernel[(dk // bk, total, heads)](
            q, k, v, z, u, b, flags, key_max, q_max, score_grad, h, h_add, h_decay, dh, dh_add, dh_decay, do,
            dq, dk_, dz, du, table, cu, scale, spill, b if bias is None else bias,
            heads, *order, *input_strides(q), *input_strides(v), *input_strides(z), DK=dk, DV=dv, C=CHUNK_SIZE, BK=bk,
            BV=min(dv, LAUNCH["fast_dqk_block_v"]), DT=dt, HAS_HADD=has_h_add, HAS_DHADD=has_dh_add, GS=gate_stride, QS=grad_stride,
            IN_GRADS=in_grads, HAS_BIAS=bias is not None,
            num_warps=LAUNCH["fast_dqk_warps"], num_stages=LAUNCH["fast_dqk_stages"],
            **register_cap("fast_dqk"),
        )
        del score_grad
    chunk_bwd_main_kernel[(slow_programs(total, heads),)](
        q, k, v, z, u, b, flags, key_max, h, h_add, h_decay, dh, dh_add, dh_decay, do, dq, dk_, dv_, dz, du, table, cu,
        slow_chunks(flags) if work is None else work, scale, spill, b if bias is None else bias,
        heads, *order, *input_strides(q), *input_strides(v), *input_strides(z), DK=dk, DV=dv, C=CHUNK_SIZE, S=LAUNCH["sub_chunk"],
        BV=bwd_block_v(dv), DT=tl.float32, HAS_HADD=has_h_add, HAS_DHADD=has_dh_add, GS=gate_stride,
        QS=grad_stride, IN_GRADS=in_grads, HAS_BIAS=bias is not None,
        num_warps=LAUNCH["bwd_warps"],
        num_stages=1,
    )
    return dq, dk_, dv_, dz, du


def kernel_bias(gate_bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The logits' bias as the kernels read it (fp32 [H, 2 dk], contiguous), or None."""
    return None if gate_bias is None else gate_bias.detach().float().contiguous()


def bias_grad(dz: torch.Tensor, du: torch.Tensor, gate_bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The gradient of the logits' bias [H, 2 dk] (in its dtype): dz and du ([T, H, dk], any row
    order) summed over the tokens in fp32; None without a bias."""
    if gate_bias is None:
        return None
    return torch.cat([dz.sum(0, dtype=torch.float32), du.sum(0, dtype=torch.float32)], dim=-1).to(gate_bias.dtype)

