"""The Triton backend of `regla_kernels`: chunked ReGLA with the feature maps, the key-max
stabilizer, the refined log gate and the scale fused into the kernels (REGLA_SPEC section 3).

Layout [B, T, H, D] (or B = 1 with cu_seqlens), any strides with contiguous features (read in
place: Megatron's [s, b] activations as [b, s] views need no copy), any T (masked, no padding
copies), bf16/fp16/fp32 inputs, fp32 state and accumulation, dk and dv powers of two in
[MIN_HEAD_DIM, MAX_HEAD_DIM]. Design notes: docs/kernels.md.

Kernels (@triton.jit):
  stages.py        the conventions and the device functions the kernels share (gate math,
                   token rows, feature tiles, state offsets, gate-gradient stores)
  chunk_kernels.py the stage kernels: gates (cumulative log gate b, per-chunk flags, key max),
                   the sequential state and state-gradient passes, the sub-chunk work list,
                   and the sub-chunk output and gradient kernels (chunks of fast-decaying gates)
  fast.py          the whole-chunk product kernels (the common case): output, dv, dq/dk
  segments.py      the per-segment decays of the segments path (context parallelism), with
                   its autograd Function and `chunk_regla_segments_triton`
  decode.py        the one-token decode step
  rows.py          the row copy of `regla_kernels.rows.copy_rows`
Python around them:
  settings.py      the launch settings (`LAUNCH`), chunk sizes, NaN poisoning, what is supported
  layout.py        input strides, the row order of what the kernels allocate, chunk tables
  buffers.py       the gate arena (b under the gate-logit gradients) and the gradient arena (h
                   under dq and dk), fresh gradient buffers
  launch.py        one launcher per stage (`gates`, `fwd_states`, `fwd_output`, `bwd_dstates`,
                   `bwd_main`)
  function.py      the one-pass autograd Function and the forward stages the others share
  windows.py       the low-memory backward over time windows (equal and packed sequences)
  backend.py       `chunk_regla_triton`, the backend `chunk_regla` calls, and its routing
"""
