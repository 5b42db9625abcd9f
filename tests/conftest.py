"""Fixtures: tiny random Granite Vision models on disk, sample inputs, and a CLI runner.

The models are built once per session by `granite_cli.tiny_model` and loaded by the CLI through
`from_pretrained`, exactly as a downloaded checkpoint would be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from granite_cli.cli import app
from granite_cli.tiny_model import build_granite4_vision, build_llava_next

# Keep every test off the network: ids that are not local folders must fail fast.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("GRANITE_VISION_MODEL", None)

MAX_NEW = "6"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_llava_next(tmp_path_factory.mktemp("tiny-llava-next"))


@pytest.fixture(scope="session")
def tiny_g4(tmp_path_factory) -> Path:
    return build_granite4_vision(tmp_path_factory.mktemp("tiny-granite4"))


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """A picture with content (so the model sees something different for each seed)."""
    import random

    rng = random.Random(seed)
    image = Image.effect_noise((width, height), 20 + rng.randint(0, 80)).convert("RGB")
    tint = Image.new("RGB", (width, height), (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)))
    return Image.blend(image, tint, 0.5)


def make_pdf(path: Path, pages: int, seed: int = 0) -> Path:
    images = [noise(612, 792, seed + i) for i in range(pages)]
    images[0].save(path, save_all=True, append_images=images[1:], resolution=72)
    return path


@pytest.fixture
def inputs(tmp_path) -> Path:
    """A folder of mixed inputs: photos of several sizes, a 2-page PDF, a 3-page TIFF,
    a nested folder, a hidden file, and a file of unsupported type."""
    root = tmp_path / "inputs"
    (root / "nested").mkdir(parents=True)
    noise(640, 480, 1).save(root / "a.png")
    noise(300, 900, 2).save(root / "b.jpg")
    noise(1000, 250, 3).save(root / "nested" / "c.webp")
    make_pdf(root / "doc.pdf", 2, seed=10)
    frames = [noise(200, 160, 20 + i) for i in range(3)]
    frames[0].save(root / "scan.tiff", save_all=True, append_images=frames[1:])
    noise(50, 50, 4).save(root / ".hidden.png")
    (root / "notes.txt").write_text("not a picture")
    return root


class Collect(list):
    """A writer that keeps the records it is given, for driving `pipeline.caption` directly."""

    def write(self, record) -> None:
        self.append(record)

    def close(self) -> None:
        pass


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    def answered(self, count: int) -> list[dict]:
        """The records of a run that must have succeeded: exit 0, `count` records, each answered.
        Every comparison between runs starts here, so that two failed runs never compare equal."""
        assert self.exit_code == 0, self.stderr
        records = self.records()
        assert len(records) == count and all(r["answer"] is not None for r in records), records
        return records

    def ok(self) -> Result:
        """A run that must have succeeded (exit 0), whatever it wrote where."""
        assert self.exit_code == 0, self.stderr
        return self

    def record(self) -> dict:
        """The one JSON record of a successful `ask --json`."""
        assert self.exit_code == 0, self.stderr
        record = json.loads(self.stdout)
        assert record["answer"] is not None and record["error"] is None, record
        return record


@pytest.fixture
def cli(tiny_model):
    """Run the CLI in-process (typer's CliRunner) with the tiny model as the default model."""

    def run(*args: str, input: str | bytes | None = None, model: Path | None = tiny_model, env=None) -> Result:
        argv = list(args)
        if model is not None and argv and argv[0] in ("ask", "caption") and "--model" not in argv:
            argv += ["--model", str(model)]
        if argv and argv[0] in ("ask", "caption") and "--max-new-tokens" not in argv:
            argv += ["--max-new-tokens", MAX_NEW]
        result = CliRunner().invoke(app, argv, input=input, env=env, catch_exceptions=False)
        return Result(result.exit_code, result.stdout, result.stderr)

    return run


@pytest.fixture
def http_root(tmp_path):
    """A web server on loopback serving a folder: (base URL, folder)."""
    import http.server
    import threading
    from functools import partial

    noise(320, 240, 7).save(tmp_path / "remote.png")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    server.shutdown()


def run_process(*args: str, input: bytes | None = None, env: dict | None = None, cwd: Path | None = None):
    """Run `python -m granite_cli ...` as a real subprocess (real stdin/stdout pipes, no TTY)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "granite_cli", *args],
        input=input,
        capture_output=True,
        env=full_env,
        cwd=cwd,
        timeout=600,
    )
