"""The real program in a real pipeline: stdin paths in, JSONL out, humans on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import MAX_NEW, run_process


@pytest.mark.slow
def test_find_pipe_caption_pipe_jq(inputs, tiny_model):
    listing = "\n".join(str(p) for p in sorted(inputs.rglob("*.png")) + sorted(inputs.rglob("*.jpg"))) + "\n"
    result = run_process(
        "caption",
        "-",
        "--max-new-tokens",
        MAX_NEW,
        input=listing.encode(),
        env={"GRANITE_VISION_MODEL": str(tiny_model)},
    )
    assert result.returncode == 0, result.stderr.decode()
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [r["source"] for r in records] == [str(inputs / ".hidden.png"), str(inputs / "a.png"), str(inputs / "b.jpg")]
    assert all(isinstance(r["answer"], str) for r in records)
    stderr = result.stderr.decode()
    assert "\x1b[" not in stderr  # no colours or progress bars when stderr is not a terminal
    assert "3 of 3 answered" in stderr
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_console_script_and_bad_input_exit_codes(inputs, tiny_model, tmp_path):
    (tmp_path / "bad.png").write_text("nope")
    result = run_process(
        "caption",
        str(inputs / "a.png"),
        str(tmp_path / "bad.png"),
        "--model",
        str(tiny_model),
        "--max-new-tokens",
        MAX_NEW,
    )
    assert result.returncode == 1
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["error"]
    assert "Traceback" not in result.stderr.decode()
    missing = run_process("ask", str(inputs / "a.png"), "hi", "--model", str(tmp_path / "nothing-here"))
    assert missing.returncode == 2
    assert len(missing.stderr.decode().strip().splitlines()) == 1


@pytest.mark.slow
def test_tiny_model_builder_is_a_command(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "granite_cli.tiny_model", str(tmp_path / "m")], capture_output=True, timeout=300
    )
    assert built.returncode == 0 and (tmp_path / "m" / "config.json").is_file()
    assert built.stdout.decode() == f"{tmp_path / 'm'}\n"  # `--model "$(python3 -m granite_cli.tiny_model DIR)"`


@pytest.mark.slow
def test_unreachable_hub_and_uncached_model_is_one_line(inputs, tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf-home"))  # port 9: nothing listens
    model = "ibm-granite/granite-vision-3.2-2b"
    result = subprocess.run(
        [sys.executable, "-m", "granite_cli", "ask", str(inputs / "a.png"), "hi", "-m", model],
        capture_output=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    stderr = result.stderr.decode().strip()
    assert len(stderr.splitlines()) == 1 and "cannot be reached" in stderr and "Retrying" not in stderr
