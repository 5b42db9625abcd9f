"""A seeded property test of the whole CLI: random trees of good, broken and special files,
random options, random interruptions; after each run the invariants a user relies on.

Each run is a real process (signals need one). The suite runs a few; for a long soak:
`GRANITE_PROPERTY_RUNS=100 python3 -m pytest tests/test_properties.py -q` (and
`GRANITE_PROPERTY_SEED` for another sequence). A failure prints the run's seed and command.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import make_pdf, noise, tree_hashes

from granite_cli.sources import PageSelection, resolve

RUNS = int(os.environ.get("GRANITE_PROPERTY_RUNS", "6"))
SEED = int(os.environ.get("GRANITE_PROPERTY_SEED", "20261130"))
EXIT_CODES = {0, 1, 2, 130, 141}  # the README's table
PROMPT = "Describe this image in detail."


@dataclass
class Run:
    seed: int
    args: list[str]
    stdin: bytes | None = None
    output: Path | None = None
    journal: Path | None = None
    existing: str = "none"
    """What was at the output before the run: none, ours (records of this job), foreign, input."""
    signal: int | None = None
    delay: float = 0.0
    notes: list[str] = field(default_factory=list)


def pictures(root: Path) -> list[Path]:
    """The good pictures `make_tree` made (p0.png, sub/p3.jpg, ...)."""
    return sorted(path for path in root.rglob("p[0-9]*") if not path.is_symlink())


def make_tree(rng: random.Random, root: Path) -> None:
    """Good pictures, broken files, duplicates through links, and files that must never be opened."""
    (root / "sub").mkdir(parents=True)
    for index in range(rng.randint(1, 5)):
        folder = root if rng.random() < 0.6 else root / "sub"
        suffix = rng.choice([".png", ".jpg"])
        noise(rng.randint(8, 300), rng.randint(8, 300), seed=rng.randint(0, 10_000)).save(folder / f"p{index}{suffix}")
    good = pictures(root)
    if rng.random() < 0.5:
        make_pdf(root / "doc.pdf", rng.randint(1, 2), seed=rng.randint(0, 100))
    if rng.random() < 0.5:
        (root / "text.png").write_text("not a picture")
    if rng.random() < 0.5:
        noise(100, 100).save(root / "cut.png")
        (root / "cut.png").write_bytes((root / "cut.png").read_bytes()[:120])
    if rng.random() < 0.3:
        (root / "empty.jpg").write_bytes(b"")
    if rng.random() < 0.5:
        os.mkfifo(root / "pipe.png")  # no writer: opening it would hang the run
    if rng.random() < 0.3:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(root / "sock.png"))
    if rng.random() < 0.5:
        (root / "sub" / "again.png").symlink_to(good[0])  # the same picture twice
    if rng.random() < 0.5:
        os.link(good[-1], root / "hard.png")
    if rng.random() < 0.4:
        (root / "dangling.png").symlink_to(root / "gone.png")
    if rng.random() < 0.3:
        (root / "sub" / "loop").symlink_to(root)
    if rng.random() < 0.4:
        (root / "notes.txt").write_text("unsupported")
    if rng.random() < 0.3:
        noise(30, 30).save(root / "sp ace ünï.png")


def plan_run(rng: random.Random, seed: int, root: Path, out_dir: Path, model: Path) -> Run:
    fmt = rng.choice(["jsonl", "jsonl", "markdown"])
    args = ["caption", "--model", str(model), "--max-new-tokens", str(rng.randint(2, 8))]
    args += ["--batch-size", str(rng.randint(1, 4)), "-f", fmt]
    run = Run(seed, args)
    how = rng.choice(["folder", "glob", "stdin"])
    if how == "folder":
        args.append(str(root))
    elif how == "glob":
        args.append(str(root / "**" / "*.*"))
    else:
        args.append("-")
        run.stdin = "\n".join(str(p) for p in sorted(root.rglob("*")) if not p.is_dir() or p.is_symlink()).encode()
    if rng.random() < 0.2:
        args += ["--pages", "1"]
    where = rng.choice(["file", "file", "file", "stdout"])
    if where == "file":
        run.output = out_dir / ("out.jsonl" if fmt == "jsonl" else "report.md")
        run.journal = run.output if fmt == "jsonl" else run.output.with_name(run.output.name + ".jsonl")
        run.existing = rng.choice(["none", "ours", "foreign", "input"] if fmt == "jsonl" else ["none", "foreign"])
        if run.existing == "ours":
            first = pictures(root)[0]
            record = {"source": str(first), "page": None, "prompt": PROMPT, "answer": "old", "error": None}
            run.output.write_text(json.dumps(record | {"model": str(model)}) + "\n")
        elif run.existing == "foreign":
            run.output.write_text("a user's own file\n")
        elif run.existing == "input":
            run.output = pictures(root)[0]
        args += ["-o", str(run.output)]
    if rng.random() < 0.6:
        run.signal = rng.choice([signal.SIGINT, signal.SIGTERM])
        run.delay = rng.uniform(0.5, 8.0)
    return run


def execute(run: Run, extra: list[str] = ()) -> subprocess.CompletedProcess:
    process = subprocess.Popen(
        [sys.executable, "-m", "granite_cli", *run.args, *extra],
        stdin=subprocess.PIPE if run.stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    if run.stdin is not None:
        try:
            process.stdin.write(run.stdin)
            process.stdin.close()
        except BrokenPipeError:  # it exited before reading its stdin (a usage error)
            pass
        process.stdin = None
    if run.signal is not None and not extra:
        deadline = time.monotonic() + run.delay
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
        if process.poll() is None:
            process.send_signal(run.signal)
            run.notes.append(f"signal {run.signal} at {run.delay:.2f} s")
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def records_of(run: Run, result: subprocess.CompletedProcess) -> list[dict]:
    if run.output is None:
        text = result.stdout.decode()
        if "-f" in run.args and run.args[run.args.index("-f") + 1] == "markdown":
            return []
    else:
        if run.journal is None or not run.journal.exists():
            return []
        text = run.journal.read_text()
        if not text.endswith("\n"):  # a torn last line (the process was killed writing it)
            text = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def identity(record: dict) -> tuple:
    """A regular file is known by its inode (links and spellings are one item), anything else by name."""
    try:
        info = os.stat(record["source"])
    except OSError:
        return (record["source"], record["page"])
    return ((info.st_dev, info.st_ino) if stat.S_ISREG(info.st_mode) else record["source"], record["page"])


def check_run(run: Run, root: Path, before: dict, output_before: bytes | None) -> None:
    result = execute(run)
    stderr = result.stderr.decode(errors="replace")
    where = f"seed {run.seed}: {' '.join(run.args)} {run.notes} -> exit {result.returncode}\n{stderr[-2000:]}"
    assert result.returncode in EXIT_CODES, where
    assert "Traceback" not in stderr, where
    protected = {k: v for k, v in tree_hashes(root).items() if run.output is None or k != str(run.output)}
    expected = {k: v for k, v in before.items() if run.output is None or k != str(run.output)}
    assert protected == expected, where  # no file outside the run's own outputs changed
    if run.existing in ("foreign", "input"):  # refused (or interrupted before it got that far), untouched
        assert result.returncode in ((2, 130) if run.notes else (2,)), where
        assert run.output.read_bytes() == output_before, where
        return
    if result.returncode == 2 and output_before is not None:
        assert run.output.read_bytes() == output_before, where
    records = records_of(run, result)
    keys = [identity(record) for record in records]
    assert len(keys) == len(set(keys)), where  # at most one record per item
    special = {str(root / "pipe.png"), str(root / "sock.png")}
    assert all(record["answer"] is None for record in records if record["source"] in special), where
    if run.stdin is None:  # met in a walk or a glob: never opened, no record at all
        assert not special & {record["source"] for record in records}, where
    if run.output is None or result.returncode not in (0, 1, 130):
        return
    resumed = execute(run, ["--resume"])
    where += f"\n--resume -> exit {resumed.returncode}\n{resumed.stderr.decode(errors='replace')[-2000:]}"
    assert resumed.returncode in (0, 1) and b"Traceback" not in resumed.stderr, where
    pages = PageSelection.parse("1") if "--pages" in run.args else None
    sources = [a for a in run.args if a == "-" or a.startswith(str(root))]
    items = resolve(sources, pages=pages, stdin=io.BytesIO(run.stdin or b""))
    wanted = {item.identity for item in items.items}
    got = [identity(record) for record in records_of(run, resumed)]
    assert len(got) == len(set(got)) and set(got) >= wanted, where  # exactly one record per item
    assert tree_hashes(root) == {k: v for k, v in before.items()}, where


@pytest.mark.slow
def test_random_trees_options_and_interruptions_keep_every_invariant(tmp_path, tiny_model):
    master = random.Random(SEED)
    for number in range(RUNS):
        seed = master.randint(0, 2**31)
        rng = random.Random(seed)
        base = tmp_path / f"run{number:03d}"
        root, out_dir = base / "tree", base / "out"
        out_dir.mkdir(parents=True)
        make_tree(rng, root)
        run = plan_run(rng, seed, root, out_dir, tiny_model)
        before = tree_hashes(root)
        output_before = run.output.read_bytes() if run.output is not None and run.output.exists() else None
        check_run(run, root, before, output_before)
