"""Results table of benchmarks/bench_cp.py runs: DIR/bench_cp_n*.json -> benchmarks/results/context_parallel.md.

    python benchmarks/collect_cp.py DIR [--out benchmarks/results/context_parallel.md]
"""

import argparse
import glob
import json
import os


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "context_parallel.md"))
    args = parser.parse_args()
    runs = [json.load(open(path)) for path in sorted(glob.glob(os.path.join(args.folder, "bench_cp_n*.json")))]
    if not runs:
        raise SystemExit(f"no bench_cp_n*.json in {args.folder}")
    meta = runs[0]
    lines = [
        "# Context parallelism: per-layer cost (benchmarks/bench_cp.py)",
        "",
        f"{meta['device']}, {meta['date']}; torch {meta['torch']}, triton {meta['triton']}; NCCL, one node.",
        "One ReGLA token-mixing forward+backward per rank (`context_parallel_regla`, Triton kernels), B = 1,",
        "H = 16, dk = dv = 128, bf16, zigzag layout, P tokens per GPU (sequence = CP x P tokens).",
        "Efficiency = (time of a P-token sequence on one GPU, no CP) / (CP time): 1.0 means CP costs",
        "nothing beyond the per-GPU share. Bytes: what the collectives deliver to each rank per layer",
        "(forward + backward), counted during one step; independent of P.",
        "",
        "Forward overlap: 'yes' rows ran with the forward all-gather per zigzag segment (`--overlap-forward`).",
        "",
        "| tokens per GPU | CP | forward overlap | CP fwd / fwd+bwd ms | one GPU, same share, fwd / fwd+bwd ms "
        "| efficiency fwd+bwd (fwd) | bytes per layer | peak GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for r in run["rows"]:
            r["overlap"] = "yes" if run.get("overlap_forward") else "no"
    rows = sorted((r for run in runs for r in run["rows"]), key=lambda r: (r["tokens_per_gpu"], r["cp"], r["overlap"]))
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tokens_per_gpu']} | {r['cp']} | {r['overlap']} | {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['tokens_per_gpu']} | {r['cp']} | {r['overlap']} | {r['cp_fwd_ms']:.2f} / {r['cp_fwd_bwd_ms']:.2f} | "
            f"{r['one_gpu_share_fwd_ms']:.2f} / {r['one_gpu_share_fwd_bwd_ms']:.2f} | {r['efficiency']:.3f} ({r['efficiency_fwd']:.3f}) | "
            f"{r['bytes_received_per_layer'] / 1e6:.2f} MB | {r['peak_gb']:.2f} |"
        )
    with open(args.out, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
