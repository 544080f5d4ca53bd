"""Summarize the Megatron-LM pretrain_gpt.py logs that `benchmarks/gpu_megatron_lm.sh` writes.

    python benchmarks/megatron_lm_summary.py LOG [LOG ...] [--out summary.md] [--header TEXT]

Each LOG holds one form's runs, each run started by a line `=== run NAME: ...` (the script
writes them): a first run of N iterations that saves, and a resumed run to 2N. Read from
Megatron-LM's own lines: `iteration I/T | ... elapsed time per iteration (ms): X | ... lm loss: Y`,
`validation loss at iteration I | lm loss value: Y`, and `successfully loaded checkpoint ... at
iteration I`. Prints (and writes with --out) a markdown table per form and the losses around
the resume; a resume is continuous when it loaded iteration N and the first loss after it is
within `CONTINUITY` of the mean of the last three before it.
"""

from __future__ import annotations

import argparse
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

RUN = re.compile(r"^=== run (\S+): (.*)$")
ITERATION = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*?elapsed time per iteration \(ms\): ([\d.]+).*?"
                       r"lm loss: ([\d.E+-]+)")
VALIDATION = re.compile(r"validation loss at iteration (\d+).*?lm loss value: ([\d.E+-]+)")
LOADED = re.compile(r"successfully loaded checkpoint .* at iteration\s+(\d+)")
VERSION = re.compile(r"> (PyTorch|Megatron-Core|Transformer Engine) version \.+ (\S+)")
CONTINUITY = 0.35  # nats: the step-to-step spread of a byte-level loss at this batch size


@dataclass
class Run:
    """One pretrain_gpt.py launch: its losses and step times by iteration."""

    name: str
    note: str
    losses: dict = field(default_factory=dict)
    ms: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    loaded: int | None = None


def read_runs(path: Path) -> tuple[list[Run], dict]:
    """The runs in one log, and the versions Megatron-LM printed."""
    runs, versions = [], {}
    for line in path.read_text(errors="replace").splitlines():
        if match := RUN.match(line):
            runs.append(Run(match[1], match[2]))
        elif not runs:
            continue
        elif match := ITERATION.search(line):
            runs[-1].losses[int(match[1])] = float(match[4])
            runs[-1].ms[int(match[1])] = float(match[3])
        elif match := VALIDATION.search(line):
            runs[-1].validation[int(match[1])] = float(match[2])
        elif match := LOADED.search(line):
            runs[-1].loaded = int(match[1])
        if match := VERSION.search(line):
            versions[match[1]] = match[2]
    return runs, versions


def steady_ms(run: Run) -> float | None:
    """Median step time, leaving out the first three steps of the launch (compilation, warm-up)."""
    steps = sorted(run.ms)[3:]
    return statistics.median(run.ms[i] for i in steps) if steps else None


def _fmt(value, spec=".3f") -> str:
    return "-" if value is None else format(value, spec)


def continuity(first: Run, second: Run) -> tuple[str, list[str]]:
    """('yes'/'no: why', lines of the losses around the resume) for a saved and a resumed run."""
    if not first.losses or not second.losses:
        return "no: a run logged no iterations", []
    end = max(first.losses)
    around = [f"  iteration {i}: {first.losses[i]:.4f} (run {first.name})" for i in sorted(first.losses)[-3:]]
    around += [f"  iteration {i}: {second.losses[i]:.4f} (run {second.name})" for i in sorted(second.losses)[:3]]
    if second.loaded != end:
        return f"no: the resumed run loaded iteration {second.loaded}, not {end}", around
    before = statistics.mean(first.losses[i] for i in sorted(first.losses)[-3:])
    after = second.losses[min(second.losses)]
    if min(second.losses) != end + 1 or abs(after - before) > CONTINUITY:
        return f"no: loss {after:.3f} at iteration {min(second.losses)} after {before:.3f}", around
    return "yes", around


def summarize(paths: list[Path]) -> str:
    lines, versions = [], {}
    for path in paths:
        runs, found = read_runs(path)
        versions.update(found)
        lines += [f"### {path.stem}", "",
                  "| run | what | iterations | ms/iter | iter/s | loss first / last | validation loss |",
                  "|---|---|---|---|---|---|---|"]
        for run in runs:
            ms = steady_ms(run)
            its = sorted(run.losses)
            span = f"{its[0]}-{its[-1]}" if its else "none"
            losses = f"{run.losses[its[0]]:.3f} / {run.losses[its[-1]]:.3f}" if its else "-"
            valid = ", ".join(f"{v:.3f} @{i}" for i, v in sorted(run.validation.items())) or "-"
            lines.append(f"| {run.name} | {run.note} | {span} | {_fmt(ms, '.1f')} | "
                         f"{_fmt(1000 / ms if ms else None, '.2f')} | {losses} | {valid} |")
        pairs = [(a, b) for a, b in zip(runs, runs[1:]) if b.name.endswith("resume")]
        for first, second in pairs:
            verdict, around = continuity(first, second)
            lines += ["", f"Resume {first.name} -> {second.name}: continuous: {verdict}", *around]
        lines.append("")
    head = ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
    return (f"Megatron-LM printed: {head}\n\n" if head else "") + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--header", default="")
    args = parser.parse_args()
    text = (args.header + "\n\n" if args.header else "") + summarize([p for p in args.logs if p.is_file()])
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
