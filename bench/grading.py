"""How long `make grade STEP=N` takes, wall clock, on a solved copy and on an untouched one.

    python -m bench.grading            # every step with tasks, 3 runs each; writes docs/bench/grading.md
    python -m bench.grading --smoke    # step 1, one run (run by `make test`)

A solved copy is the reference step itself (what `make check` grades); an untouched copy is
a fresh `make exercise`, every task still a TODO. Both are graded by the same command as
`make grade` (grading.exercises.grading_command), in a fresh process each time, as a learner
runs it: the time includes Python's start-up and pytest's.

Beside the wall clock, each run's CPU time (user + system, of the grading process and its
children): on a machine shared with other work the wall clock swings with the load, the CPU
time much less. The load average is written with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from grading.exercises import ROOT, STEPS, grading_command, tasks_of, write_exercise

OUT = ROOT / "docs" / "bench"


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def grade(step: int, code: str, passes: bool) -> tuple[float, float]:
    """Wall clock and CPU seconds of one grading run. A run that ends otherwise than expected
    (the reference must pass, an untouched copy must fail) is not a figure: it stops the bench."""
    cpu, began = children_cpu(), time.perf_counter()
    done = subprocess.run(grading_command(step, code), cwd=ROOT, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - began
    if (done.returncode == 0) != passes:
        raise SystemExit(
            f"step {step}, {code}: exit code {done.returncode}\n{done.stdout[-3000:]}{done.stderr[-2000:]}"
        )
    return wall, children_cpu() - cpu


def measure(steps: list[int], runs: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-grading-") as folder:
        for step in steps:
            write_exercise(step, Path(folder))
            row = {"step": step, "load_before": os.getloadavg()[0]}
            for kind, code, passes in (("solved", "reference", True), ("untouched", folder, False)):
                walls, cpus = zip(*(grade(step, code, passes) for _ in range(runs)), strict=True)
                row[f"{kind}_s"], row[f"{kind}_cpu_s"] = list(walls), list(cpus)
            row["load_after"] = os.getloadavg()[0]
            rows.append(row)
            print(
                f"step {step}: solved {statistics.median(row['solved_s']):.1f} s "
                f"(CPU {statistics.median(row['solved_cpu_s']):.1f} s), untouched "
                f"{statistics.median(row['untouched_s']):.1f} s (CPU {statistics.median(row['untouched_cpu_s']):.1f} s), "
                f"load {row['load_before']:.1f} to {row['load_after']:.1f}"
            )
    return rows


def write_report(rows: list[dict], out: Path) -> None:
    lines = [
        "# How long grading takes",
        "",
        "`make grade STEP=N`'s command, wall clock in a fresh process (and its CPU time), median of "
        f"{len(rows[0]['solved_s'])} runs (`python -m bench.grading`). Goal: 5 s wall. "
        f"{os.cpu_count()} CPUs; the load average (1 min) before and after each step's runs.",
        "",
        "| step | solved | untouched (every task a TODO) | load |",
        "|---|---|---|---|",
    ]
    for row in rows:
        solved, untouched = (
            f"{statistics.median(row[f'{kind}_s']):.1f} s (CPU {statistics.median(row[f'{kind}_cpu_s']):.1f} s)"
            for kind in ("solved", "untouched")
        )
        lines.append(
            f"| {row['step']} | {solved} | {untouched} | {row['load_before']:.1f} to {row['load_after']:.1f} |"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "grading.md").write_text("\n".join(lines) + "\n")
    (out / "grading.json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="step 1, one run")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--runs", type=int, default=3, help="runs per step and kind (default 3)")
    args = parser.parse_args()
    steps = [1] if args.smoke else [step for step in STEPS if tasks_of(step)]
    write_report(measure(steps, 1 if args.smoke else args.runs), args.out)


if __name__ == "__main__":
    main()
