"""How long `make grade STEP=N` takes, wall clock, on a solved copy and on an untouched one.

    python -m bench.grading            # every step with tasks, 3 runs each; writes docs/bench/grading.md
    python -m bench.grading --smoke    # step 1, one run (run by `make test`)

A solved copy is the reference step itself (what `make check` grades); an untouched copy is
a fresh `make exercise`, every task still a TODO. Both are graded by the same command as
`make grade` (grading.exercises.grading_command), in a fresh process each time, as a learner
runs it: the time includes Python's start-up and pytest's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from grading.exercises import ROOT, STEPS, grading_command, tasks_of, write_exercise

OUT = ROOT / "docs" / "bench"


def seconds_to_grade(step: int, code: str) -> float:
    began = time.perf_counter()
    subprocess.run(grading_command(step, code), cwd=ROOT, capture_output=True, timeout=300)
    return time.perf_counter() - began


def measure(steps: list[int], runs: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-grading-") as folder:
        for step in steps:
            write_exercise(step, Path(folder))
            solved = [seconds_to_grade(step, "reference") for _ in range(runs)]
            untouched = [seconds_to_grade(step, folder) for _ in range(runs)]
            rows.append({"step": step, "solved_s": solved, "untouched_s": untouched})
            print(
                f"step {step}: solved {statistics.median(solved):.1f} s, untouched {statistics.median(untouched):.1f} s"
            )
    return rows


def write_report(rows: list[dict], out: Path) -> None:
    lines = [
        "# How long grading takes",
        "",
        "`make grade STEP=N`'s command, wall clock in a fresh process, median of "
        f"{len(rows[0]['solved_s'])} runs (`python -m bench.grading`). Goal: 5 s.",
        "",
        "| step | solved | untouched (every task a TODO) |",
        "|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['step']} | {statistics.median(row['solved_s']):.1f} s | {statistics.median(row['untouched_s']):.1f} s |"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "grading.md").write_text("\n".join(lines) + "\n")
    (out / "grading.json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="step 1, one run")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    steps = [1] if args.smoke else [step for step in STEPS if tasks_of(step)]
    write_report(measure(steps, 1 if args.smoke else 3), args.out)


if __name__ == "__main__":
    main()
