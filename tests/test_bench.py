"""Tiny runs of the benchmark harnesses (`make bench` runs the full ones)."""

import json
import subprocess
import sys

import pytest

from harness.support import ROOT

pytestmark = pytest.mark.slow


def smoke_run(module: str, out, results_file: str) -> dict:
    """`python -m <module> --smoke --out <out>`; its results, once it exits cleanly."""
    done = subprocess.run(
        [sys.executable, "-m", module, "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / results_file).read_text())


def test_the_benchmark_harness_runs_and_writes_its_table_and_plot(tmp_path):
    results = smoke_run("bench.relay", tmp_path, "results.json")
    runs = results["runs"]
    assert {r["variant"] for r in runs} == {"step05", "step04", "step02", "naive"}
    store = results["store_on_off"]
    for name in ("on", "off"):
        assert [r["failures"] for r in store["rounds"][name]] == [0]
        assert store[f"first_chunk_ms_p50_{name}"] >= results["schedule"]["delay_ms"]
    for run in runs + results["capacity"]:
        assert run["failures"] == 0, run
        # Every chunk is timed, and no chunk can arrive before the fake sent it.
        assert 0 < run["chunk_latency_ms"]["p50"] <= run["chunk_latency_ms"]["max"], run
        assert run["first_chunk_ms"]["p50"] >= results["schedule"]["delay_ms"], run
        assert run["cpu_us_per_chunk"] > 0
    assert results["memory"]["idle_kib_per_connection"] > 0
    assert "| step05 | 4 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "overhead.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.browser
def test_the_render_benchmark_runs_and_writes_its_table(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench.render", "--sizes", "3000", "--nested", "2", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line for line in (tmp_path / "render.md").read_text().splitlines() if line.startswith("| 3,000"))
    assert row.count(" ms") == 2, row


def test_the_store_benchmark_runs_both_stores_and_writes_its_table(tmp_path):
    results = smoke_run("bench.store", tmp_path, "store.json")
    assert set(results) == {"sqlite", "redis"}
    for figures in results.values():
        assert 0 < figures["one_at_a_time_ms"]["p50"] <= figures["one_at_a_time_ms"]["p99"]
        assert 0 < figures["at_once_ms"]["p50"] <= figures["at_once_ms"]["p99"]
    table = (tmp_path / "store.md").read_text()
    assert "| sqlite | 20 |" in table and "| redis | 20 |" in table


def test_the_grading_benchmark_times_a_solved_and_an_untouched_copy(tmp_path):
    rows = smoke_run("bench.grading", tmp_path, "grading.json")
    assert [row["step"] for row in rows] == [1]
    assert all(0 < seconds < 60 for seconds in rows[0]["solved_s"] + rows[0]["untouched_s"])
    assert "| 1 |" in (tmp_path / "grading.md").read_text()


def test_the_upstream_flood_benchmark_cuts_both_floods_short(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench.upstream_flood", "--mb", "20"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    chunks, one_line = json.loads(done.stdout)
    assert chunks["last_frame"]["type"] == "end" and chunks["last_frame"].get("truncated") is True, chunks
    assert chunks["upstream_mb_sent"] < 10, chunks  # closed at the reply cap, not read to the end
    assert one_line["last_frame"]["type"] == "error" and one_line["upstream_mb_sent"] < 10, one_line
