"""The benchmarks must keep working: their tiny modes run here on every full test run.

No timing is asserted (speed targets live in benchmarks/, not in tests); what is asserted is
that every path ran over the same work and that, greedy in float32, they agree token for token.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_tiny_benchmark_runs_and_paths_agree(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--tiny", "--items", "7"]
    sweeps = ["--max-tiles-sweep", "3", "--quantize-sweep", "nf4"]
    result = subprocess.run([*command, *sweeps, "--json", str(out)], capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    report = json.loads(out.read_text())
    assert report["setup"]["items"] == 7 and report["setup"]["pages"] >= 3 and report["setup"]["photos"] >= 2
    for path in ("card", "batched", "engine"):
        assert report[path]["images_per_s"] > 0 and report[path]["new_tokens_per_s"] > 0
    assert report["engine"]["items"] == 7 and report["card"]["items"] == 4
    assert report["agreement_engine_vs_batched"] == {"items": 7, "first_token": 1.0, "all_tokens": 1.0}
    assert report["agreement_engine_vs_card"]["all_tokens"] == 1.0
    sweep = report["max_tiles_sweep"][0]
    assert sweep["max_tiles"] == 3 and sweep["prompt_tokens_per_page"] < report["setup"]["prompt_tokens_per_page"]
    [nf4] = report["quantize_sweep"]
    assert nf4["quantize"] == "nf4" and nf4["items"] == 7 and nf4["images_per_s"] > 0 and nf4["weights_gib"] > 0
    table = result.stdout.decode()
    assert "(c) --quantize nf4 (weights" in table
    assert "(c) granite-vision" in table and "c/a =" in table


@pytest.mark.slow
def test_the_phases_benchmark_times_each_way_it_is_given(tmp_path):
    out = tmp_path / "phases.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "phases.py"), "--tiny", "--rows", "3", "--new-tokens", "8"]
    ways = "rows, static cache; batch (chunks), dynamic cache"
    result = subprocess.run([*command, "--ways", ways, "--out", str(out)], capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    report = json.loads(out.read_text())
    assert (report["rows"], report["new_tokens"]) == (3, 8)
    rows, batch = report["ways"]
    assert (rows["way"], rows["status"], batch["way"], batch["status"]) == (
        "rows, static cache",
        "ok",
        "batch (chunks), dynamic cache",
        "ok",
    )
    assert rows["one token"]["prefill"] > 0 and "prefill" not in batch["one token"]  # (only rows have their own)
    for way in (rows, batch):
        # Timings: each phase is measured and a longer run is not shorter (equal is allowed: the
        # report rounds to milliseconds, and the tiny model's steps are about that long).
        assert way["all tokens"]["run"] >= way["one token"]["run"] >= way["one token"]["encode"] > 0
        steps = way["all tokens"]["step_ms"]
        assert steps["max"] >= steps["median"] >= steps["min"] > 0 and way["decode_step_ms"] >= 0
    assert out.with_suffix(".md").read_text().strip() in result.stdout.decode()


@pytest.mark.slow
def test_the_gpu_lane_script_runs_its_plumbing_on_a_cpu(tmp_path):
    """benchmarks/gpu_check.sh in smoke mode: every row of the GPU lane, on the tiny model, into
    $OUT (the device tool's folder), each row saved as it ends."""
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "OUT": str(tmp_path)}
    env.pop("GPU_CHECK_OUT", None)
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, timeout=600
    )
    assert result.returncode == 0, result.stdout.decode()[-2000:]
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        f"gpu-3.2-2b.{suffix}" for suffix in ("json", "log", "md", "rows.jsonl")
    ]
    report = json.loads((tmp_path / "gpu-3.2-2b.json").read_text())
    assert report["setup"]["pages"] == report["setup"]["items"] == 6  # letter pages only
    labels = [row["label"] for row in report["variants"]]
    assert [label.split(" ")[0] for label in labels] == ["static", "prefill", "prefill", "budget"]
    for row in report["variants"]:
        assert row["answered"] == 6 and row["agreement_vs_batched"]["all_tokens"] == 1.0, row["label"]
    assert report["schema"]["items"] == 6
    assert [(row["quantize"], row["items"]) for row in report["quantize_sweep"]] == [("int8", 6), ("nf4", 6)]
    keys = ["setup", "card", "batched", "engine", "static", "batch-prefill", "no-chunks", "oom-backoff", "schema"]
    keys += ["quantize-int8", "quantize-nf4"]
    events = [json.loads(line) for line in (tmp_path / "gpu-3.2-2b.rows.jsonl").read_text().splitlines()]
    assert [(e["key"], e["status"]) for e in events] == [(k, s) for k in keys for s in ("running", "ok")]
    table = (tmp_path / "gpu-3.2-2b.md").read_text()
    assert table.startswith("model tiny") and table in result.stdout.decode()


# --------------------------------------------------------------------------- the rows' journal
def _rows():
    """benchmarks/rows.py, loaded by path (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location("benchmark_rows", ROOT / "benchmarks" / "rows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETUP = {
    "model": "tiny", "dtype": "float32", "device": "cpu", "gpu": None, "items": 6, "pages": 6, "photos": 0,
    "baseline_batch": 3, "engine_rows": 8, "engine_tokens": None, "new_tokens": 4, "prompt_tokens_per_page": 225,
}  # fmt: skip
TIMED = {"items": 6, "seconds": 0.5, "images_per_s": 12.0, "new_tokens_per_s": 48.0, "first_result_s": 0.2,
         "peak_gpu_gib": None}  # fmt: skip
PLAN = [("setup", "setup"), ("card", "(a) model card loop"), ("batched", "(b) batched generate")]


def _events(prefix: Path) -> list[tuple[str, str]]:
    lines = prefix.with_name(prefix.name + ".rows.jsonl").read_text().splitlines()
    return [(event["key"], event["status"]) for event in map(json.loads, lines)]


def test_a_failing_row_is_recorded_with_its_reason_and_the_next_row_runs(tmp_path):
    rows, prefix = _rows(), tmp_path / "run"
    report = rows.empty_report()
    journal = rows.Journal(report, prefix)
    journal.plan(PLAN)
    on_disk = []

    def out_of_memory():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\n(more lines)")

    def batched():
        on_disk.append(_events(prefix))  # the failed row is saved before the next one starts
        report["batched"] = TIMED

    assert journal.run("setup", lambda: report.update(setup=SETUP))
    assert not journal.run("card", out_of_memory, needs="setup")
    assert journal.run("batched", batched, needs="setup")
    assert on_disk == [[("setup", "running"), ("setup", "ok"), ("card", "running"), ("card", "failed"),
                        ("batched", "running")]]  # fmt: skip
    assert [(row["status"], row["reason"]) for row in report["rows"]] == [
        ("ok", None), ("failed", "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"), ("ok", None)
    ]  # fmt: skip
    table = (prefix.with_name("run.md")).read_text()
    assert "| (a) model card loop — failed: RuntimeError: CUDA out of memory. Tried" in table
    assert "| (b) batched generate | 6 | 12.0 | 48.0 | 0.2 | - |" in table
    assert json.loads(prefix.with_name("run.json").read_text()) == report


def test_the_deadline_stops_the_running_row_and_skips_the_rest(tmp_path):
    rows, prefix = _rows(), tmp_path / "run"
    report = rows.empty_report()
    journal = rows.Journal(report, prefix, deadline=time.time() + 0.5)
    journal.plan(PLAN)
    began = time.monotonic()
    assert journal.run("setup", lambda: report.update(setup=SETUP))
    assert not journal.run("card", lambda: time.sleep(30), needs="setup")
    assert not journal.run("batched", lambda: report.update(batched=TIMED), needs="setup")
    assert time.monotonic() - began < 5
    assert [(row["status"], row["reason"]) for row in report["rows"]] == [
        ("ok", None), ("killed", "out of time"), ("skipped", "out of time")
    ]  # fmt: skip
    assert report["batched"] is None and "| (b) batched generate — skipped: out of time |" in rows.render(report)


def test_a_killed_run_is_settled_from_what_it_saved(tmp_path, capsys):
    rows, prefix = _rows(), tmp_path / "run"
    report = rows.empty_report()
    journal = rows.Journal(report, prefix)
    journal.plan(PLAN)
    journal.run("setup", lambda: report.update(setup=SETUP))
    card = journal.row("card")
    card["status"] = "running"
    journal.save(event=card)  # ... and then the process was killed
    assert rows.finish(prefix, "out of time")
    table = capsys.readouterr().out
    assert "| (a) model card loop — killed: out of time |" in table
    assert "| (b) batched generate — skipped: out of time |" in table
    assert table.strip() == prefix.with_name("run.md").read_text().strip()
    assert _events(prefix)[-2:] == [("card", "killed"), ("batched", "skipped")]
    assert rows.finish(prefix, "again") and capsys.readouterr().out == ""  # settled: nothing to add
