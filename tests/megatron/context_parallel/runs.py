"""One gloo run per CP size of every context-parallel check, shared by the test files here.

Not a test file. `cp_results(cp_size)` spawns `cp_size` ranks once per pytest process, runs
`cp_worker` (the checks of `checks` and `attention_checks`) and keeps the merged results, so
the folder's tests cost one launch per CP size whatever file asks first.
"""

from tests.megatron.context_parallel.attention_checks import attention_cp_check, self_attention_cp_check
from tests.megatron.context_parallel.checks import (
    PACKED_LENGTHS,
    bf16_strided_check,
    error_messages,
    megatron_slice_check,
    mixer_cp_check,
    packed_regla_cp_check,
    regla_cp_check,
)
from tests.support.distributed import RTOL, init_parallel, run_distributed


def cp_worker(rank, world_size):
    """Every check at CP = world_size on this rank: {check name: its result}. CP=2 runs the
    whole set; CP=4 the layouts, the layer function and the mixer next to TP=2."""
    init_parallel(cp=world_size)
    results = {"megatron_slice": megatron_slice_check(rank, world_size)}
    for layout in ("zigzag", "contiguous"):
        results[f"regla/{layout}"] = regla_cp_check(rank, world_size, layout, layout)
    results["attention/zigzag"] = attention_cp_check(rank, world_size, "zigzag")
    if world_size == 2:
        results["regla/negative_control"] = regla_cp_check(rank, world_size, "zigzag", "contiguous")
        results["attention/contiguous"] = attention_cp_check(rank, world_size, "contiguous")
        results["attention/zigzag_with_mask"] = attention_cp_check(rank, world_size, "zigzag", with_mask=True)
        results["attention/self_attention"] = self_attention_cp_check(rank, world_size)
        results["errors"] = error_messages(rank, world_size)
        results["bf16"] = bf16_strided_check(rank, world_size)
        results["mixer/zigzag"] = mixer_cp_check()
        results["mixer/packed_zigzag"] = mixer_cp_check(batch=1, length=sum(PACKED_LENGTHS), packed=True)
        results["packed/contiguous"] = packed_regla_cp_check(rank, world_size, "contiguous", "contiguous")
        results["packed/negative_control"] = packed_regla_cp_check(rank, world_size, "zigzag", "contiguous")
    results["packed/zigzag"] = packed_regla_cp_check(rank, world_size, "zigzag", "zigzag")
    if world_size == 4:  # CP over a subgroup of the world, next to TP
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        init_parallel(tp=2, cp=2)
        results["mixer/tp2_cp2_zigzag"] = mixer_cp_check()
    return results


_RUNS = {}


def cp_results(cp_size):
    """Per-check results at CP = `cp_size`, worst over the ranks: {check: {quantity: rel error}}
    (a bool for the slice check, rank 0's messages for "errors").

    One run per CP size and pytest process; a failed run is remembered and re-raised.
    """
    if cp_size not in _RUNS:
        try:
            _RUNS[cp_size] = worst_over_ranks(run_distributed(cp_worker, cp_size))
        except Exception as error:  # noqa: BLE001 - every test of this size reports it
            _RUNS[cp_size] = error
    if isinstance(_RUNS[cp_size], Exception):
        raise _RUNS[cp_size]
    return _RUNS[cp_size]


def errors_above(errors, rtol=RTOL):
    """The quantities of `errors` ({quantity: rel error}) above `rtol`: {quantity: rel error}."""
    return {q: e for q, e in errors.items() if e > rtol}


def worst_over_ranks(per_rank):
    """The ranks' `cp_worker` results merged: the largest error per quantity, `and` of bools."""
    merged = {}
    for name, value in per_rank[0].items():
        if name == "errors":
            merged[name] = value
        elif name == "bf16":
            merged[name] = {
                "dtype_ok": all(r[name]["dtype_ok"] for r in per_rank),
                "error": max(r[name]["error"] for r in per_rank),
            }
        elif isinstance(value, dict):
            merged[name] = {q: max(r[name][q] for r in per_rank) for q in value}
        else:
            merged[name] = all(r[name] for r in per_rank)
    return merged


__all__ = ["cp_results", "cp_worker", "errors_above", "worst_over_ranks"]
