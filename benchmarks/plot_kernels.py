"""Merge benchmark JSON files and draw the fwd+bwd time plot (run here, where matplotlib is).

    python benchmarks/plot_kernels.py OUT_PREFIX run1.json [run2.json ...]
Later files override earlier ones per (T, method). Writes OUT_PREFIX.json/.md/.png.
"""

import json
import sys

from bench_kernels import markdown


def merge(paths):
    rows, metas = {}, []
    for path in paths:
        data = json.load(open(path))
        metas.append(data["meta"])
        for row in data["rows"]:
            rows.setdefault(row["T"], {}).update(row)
    meta = dict(metas[-1])
    meta["fla"] = next((m["fla"] for m in metas if m["fla"] != "absent"), "absent")
    meta["date"] = ", ".join(sorted({m["date"] for m in metas}))
    return meta, [rows[t] for t in sorted(rows)]


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    lengths = [r["T"] for r in rows]
    for key, label in (("regla", "ReGLA Triton"), ("regla_lm", "ReGLA Triton, low_memory=True"),
                       ("regla_lmb", "ReGLA Triton, low_memory=\"backward\""),
                       ("fla", "fla chunk_gla"), ("sdpa", "SDPA (FlashAttention)")):
        points = [(r["T"], r[key][1]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths)
    ax.set_xticklabels([f"{t // 1024}K" for t in lengths])
    ax.set_xlabel("sequence length T (65,536 tokens per call)")
    ax.set_ylabel("forward + backward, ms")
    ax.set_title("H200, bf16, H=16, d=128")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    prefix, paths = sys.argv[1], sys.argv[2:]
    meta, rows = merge(paths)
    json.dump({"meta": meta, "rows": rows, "sources": paths}, open(prefix + ".json", "w"), indent=1)
    open(prefix + ".md", "w").write(markdown(meta, rows))
    plot(rows, prefix + ".png")
