"""The benchmarks must keep working: their tiny modes run here on every full test run.

No timing is asserted (speed targets live in benchmarks/, not in tests); what is asserted is
that every path ran over the same work and that, greedy in float32, they agree token for token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_tiny_benchmark_runs_and_paths_agree(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--tiny", "--items", "7"]
    result = subprocess.run([*command, "--max-tiles-sweep", "3", "--json", str(out)], capture_output=True, timeout=600)
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
    table = result.stdout.decode()
    assert "(c) granite-vision" in table and "c/a =" in table


@pytest.mark.slow
def test_the_gpu_lane_script_runs_its_plumbing_on_a_cpu(tmp_path):
    """benchmarks/gpu_check.sh in smoke mode: every row of the GPU lane, on the tiny model."""
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "GPU_CHECK_OUT": str(tmp_path / "gpu")}
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, timeout=600
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["setup"]["pages"] == report["setup"]["items"] == 6  # letter pages only
    labels = [row["label"] for row in report["variants"]]
    assert [label.split(" ")[0] for label in labels] == ["static", "prefill", "budget"]
    for row in report["variants"]:
        assert row["answered"] == 6 and row["agreement_vs_batched"]["all_tokens"] == 1.0, row["label"]
    assert report["schema"]["items"] == 6
    assert (tmp_path / "gpu.md").read_text().startswith("model tiny")
