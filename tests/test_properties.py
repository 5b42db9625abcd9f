"""A seeded property test of the whole CLI: random trees of good, broken, special and oddly named
files, random options and formats, random interruptions, then random second runs (the same
command again, `--resume`, `--overwrite`, two processes at once, the library instead of the CLI);
after every run the invariants a user relies on.

Each run is a real process (signals need one). The suite runs a few; for a long soak:
`GRANITE_PROPERTY_RUNS=100 python3 -m pytest tests/test_properties.py -q` (and
`GRANITE_PROPERTY_SEED` for another sequence). A failure prints the run's seed and commands.
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
#: Each format, its output's name, and a foreign file of the same kind that must never be taken for ours.
FORMATS = {
    "jsonl": ("out.jsonl", '{"source": "mine.png", "page": null, "note": "a user\'s own"}\n'),
    "markdown": ("report.md", "# My notes\n\nnot a report of ours\n"),
    "csv": ("table.csv", "source,page,notes\nx.png,1,the user's\n"),
    "html": ("review.html", "<!doctype html>\n<p>the user's own page</p>\n"),
}
SIDECAR = ".txt"


@dataclass
class Run:
    seed: int
    fmt: str
    args: list[str]
    stdin: bytes | None = None
    output: Path | None = None
    journal: Path | None = None
    existing: str = "none"
    """What was at the output before the run: none, foreign, input."""
    sidecar: bool = False
    signal: int | None = None
    delay: float = 0.0
    notes: list[str] = field(default_factory=list)


def pictures(root: Path) -> list[Path]:
    """The good pictures `make_tree` made (p0.png, sub/p3.jpg, ...)."""
    return sorted(path for path in root.rglob("p[0-9]*") if not path.is_symlink() and path.suffix != SIDECAR)


def make_tree(rng: random.Random, root: Path) -> None:
    """Good pictures, broken files, duplicates through links, files that must never be opened, and
    names of every kind a filesystem holds."""
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
        (root / "notes.text").write_text("unsupported")
    if rng.random() < 0.3:
        noise(30, 30).save(root / "sp ace ünï.png")
    if rng.random() < 0.4:  # a name that is not UTF-8
        noise(30, 30).save(os.fsdecode(os.fsencode(str(root)) + b"/bad\xff\xfe.png"))
    if rng.random() < 0.3:  # a name a spreadsheet would run, a name with a newline
        noise(30, 30).save(root / rng.choice(["=1+1.png", "new\nline.png", "-dash.png"]))


def plan_run(rng: random.Random, seed: int, root: Path, out_dir: Path, model: Path) -> Run:
    fmt = rng.choice(["jsonl", "jsonl", "markdown", "csv", "html"])
    args = ["caption", "--model", str(model), "--max-new-tokens", str(rng.randint(2, 8))]
    args += ["--batch-size", str(rng.randint(1, 4)), "-f", fmt]
    run = Run(seed, fmt, args)
    how = rng.choice(["folder", "glob", "stdin"])
    if how == "folder":
        args.append(str(root))
    elif how == "glob":
        args.append(str(root / "**" / "*.*"))
    else:
        args.append("-")
        entries = sorted(p for p in root.rglob("*") if (not p.is_dir() or p.is_symlink()) and "\n" not in p.name)
        run.stdin = b"\0".join(os.fsencode(p) for p in entries)  # NUL-separated: any name
    if rng.random() < 0.2:
        args += ["--pages", "1"]
    if rng.random() < 0.15:  # a prompt whose bytes are not UTF-8: refused, never a traceback
        args += ["--prompt", os.fsdecode(b"caf\xe9")]
    if rng.random() < 0.3:
        run.sidecar = True
        args += ["--sidecar", SIDECAR]
    where = rng.choice(["file", "file", "file", "stdout"])
    if where == "file":
        name, foreign = FORMATS[fmt]
        run.output = out_dir / name
        run.journal = run.output if fmt == "jsonl" else run.output.with_name(run.output.name + ".jsonl")
        run.existing = rng.choice(["none", "none", "foreign", "input"])
        if run.existing == "foreign":
            run.output.write_text(foreign)
        elif run.existing == "input":
            run.output = pictures(root)[0]
        args += ["-o", str(run.output)]
    if rng.random() < 0.6:
        run.signal = rng.choice([signal.SIGINT, signal.SIGTERM])
        run.delay = rng.uniform(0.5, 8.0)
    return run


def start(args: list[str], stdin: bytes | None) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "granite_cli", *args],
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    if stdin is not None:
        try:
            process.stdin.write(stdin)
            process.stdin.close()
        except BrokenPipeError:  # it exited before reading its stdin (a usage error)
            pass
        process.stdin = None
    return process


def execute(run: Run, extra: list[str] = (), interrupt: bool = False) -> subprocess.CompletedProcess:
    process = start([*run.args, *extra], run.stdin)
    if interrupt and run.signal is not None:
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
        if run.fmt != "jsonl":
            return []
        raw = result.stdout
    else:
        if run.journal is None or not run.journal.exists():
            return []
        raw = run.journal.read_bytes()
        if not raw.endswith(b"\n"):  # a torn last line (the process was killed writing it)
            raw = raw[: raw.rfind(b"\n") + 1]
    text = raw.decode("utf-8")  # valid UTF-8, whatever the names held
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def identity(record: dict) -> tuple:
    """A regular file is known by its inode (links and spellings are one item), anything else by name."""
    try:
        info = os.stat(record["source"])
    except OSError:
        return (record["source"], record["page"])
    return ((info.st_dev, info.st_ino) if stat.S_ISREG(info.st_mode) else record["source"], record["page"])


def answered(records: list[dict]) -> set[tuple]:
    return {identity(record) for record in records if record["answer"] is not None}


def sidecar_of(record: dict) -> Path:
    base = Path(record["source"])
    stem = base.stem if record["page"] is None else f"{base.stem}.page-{record['page']}"
    return base.with_name(stem + SIDECAR)


def ours(path: str) -> bool:
    return path.endswith(SIDECAR)


class Check:
    """The invariants of one seeded scenario, checked after each of its runs."""

    def __init__(self, run: Run, root: Path) -> None:
        self.run = run
        self.root = root
        self.before = tree_hashes(root)
        self.log = f"seed {run.seed}: {' '.join(map(repr, run.args))}"

    def where(self, result: subprocess.CompletedProcess, what: str) -> str:
        self.log += f"\n{what} {self.run.notes} -> exit {result.returncode}\n"
        self.log += result.stderr.decode(errors="replace")[-1500:]
        return self.log

    def common(self, result: subprocess.CompletedProcess, what: str) -> str:
        where = self.where(result, what)
        assert result.returncode in EXIT_CODES, where
        assert b"Traceback" not in result.stderr, where
        protected = {k: v for k, v in tree_hashes(self.root).items() if not ours(k) and k != str(self.run.output)}
        expected = {k: v for k, v in self.before.items() if not ours(k) and k != str(self.run.output)}
        assert protected == expected, where  # no file outside the run's own outputs changed
        return where

    def sidecars(self, records: list[dict], where: str) -> None:
        """Every answered picture has its sidecar, holding its answer."""
        if not self.run.sidecar:
            return
        for record in records:
            if record["answer"] is not None and record["page"] is None and Path(record["source"]).exists():
                assert sidecar_of(record).read_text() == record["answer"] + "\n", where


def scenario(run: Run, root: Path, rng: random.Random) -> None:
    check = Check(run, root)
    output_before = run.output.read_bytes() if run.output is not None and run.output.exists() else None
    result = execute(run, interrupt=True)
    where = check.common(result, "first run")
    non_utf8_prompt = any("\udce9" in arg for arg in run.args)
    if non_utf8_prompt:
        assert result.returncode == 2 and b"not valid UTF-8" in result.stderr, where
    if run.existing in ("foreign", "input") or result.returncode == 2:  # refused: untouched
        assert run.existing == "none" or result.returncode in ((2, 130) if run.notes else (2,)), where
        if output_before is not None:
            assert run.output.read_bytes() == output_before, where
        return
    records = records_of(run, result)
    keys = [identity(record) for record in records]
    assert len(keys) == len(set(keys)), where  # at most one record per item
    special = {str(root / "pipe.png"), str(root / "sock.png")}
    if run.stdin is None:  # met in a walk or a glob: never opened, no record at all
        assert not special & {record["source"] for record in records}, where
    check.sidecars(records, where)
    if run.output is None or result.returncode not in (0, 1, 130):
        return
    kept = answered(records)
    journal_before = run.journal.read_bytes() if run.journal.exists() else b""

    # The same command again, without --resume: refused if the output holds answers, untouched.
    again = execute(run)
    where = check.common(again, "the same command again")
    if kept:
        assert again.returncode == 2 and b"--resume" in again.stderr and b"--overwrite" in again.stderr, where
        assert (run.journal.read_bytes() if run.journal.exists() else b"") == journal_before, where

    # Then a way to finish: --resume (one process, two at once, or through the library), or --overwrite.
    how = rng.choice(["resume", "resume", "two at once", "library", "overwrite"])
    if how == "two at once":
        processes = [start([*run.args, "--resume"], run.stdin) for _ in range(2)]
        results = [subprocess.CompletedProcess(p.args, p.wait(timeout=600), b"", p.stderr.read()) for p in processes]
        for each in results:
            where = check.common(each, "two --resume at once")
            assert each.returncode in (0, 1), where
    elif how == "library":
        each = library(run, root)
        where = check.common(each, "granite_cli.caption(..., resume=True)")
        assert each.returncode in (0, 1), where
    else:
        each = execute(run, [f"--{how}"])
        where = check.common(each, f"--{how}")
        assert each.returncode in (0, 1), where
    final = records_of(run, each)
    got = [identity(record) for record in final]
    pages = PageSelection.parse("1") if "--pages" in run.args else None
    sources = [a for a in run.args if a == "-" or a.startswith(str(root))]
    wanted = {item.identity for item in resolve(sources, pages=pages, stdin=io.BytesIO(run.stdin or b"")).items}
    assert len(got) == len(set(got)) and set(got) >= wanted, where  # exactly one record per item
    if how != "overwrite":
        assert answered(final) >= kept, where  # nothing answered before is lost
    check.sidecars(final, where)


def library(run: Run, root: Path) -> subprocess.CompletedProcess:
    """The same job through `granite_cli.caption` in a fresh interpreter (UsageError is its
    one-line refusal; anything else escaping is a bug)."""
    options = {"resume": True, "output": str(run.output), "format": run.fmt}
    args = run.args
    for flag, name, kind in (("--model", "model", str), ("--max-new-tokens", "max_new_tokens", int),
                             ("--batch-size", "batch_size", int), ("--pages", "pages", str),
                             ("--sidecar", "sidecar", str), ("--prompt", "prompt", str)):  # fmt: skip
        if flag in args:
            options[name] = kind(args[args.index(flag) + 1])
    sources = [a for a in args if a == "-" or a.startswith(str(root))]
    script = (
        "import io, json, sys\nimport granite_cli\n"
        f"sources, options, stdin = {sources!r}, {options!r}, {run.stdin!r}\n"
        "from granite_cli.api import run_caption\nfrom granite_cli.jobs import CaptionJob\n"
        "try:\n"
        "    result = run_caption(CaptionJob(sources=sources, **options), stdin=io.BytesIO(stdin or b''))\n"
        "except granite_cli.UsageError as exc:\n"
        "    print('error:', exc, file=sys.stderr); sys.exit(2)\n"
        "sys.exit(result.exit_code)\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=600)


@pytest.mark.slow
def test_random_trees_options_reruns_and_interruptions_keep_every_invariant(tmp_path, tiny_model):
    master = random.Random(SEED)
    for number in range(RUNS):
        seed = master.randint(0, 2**31)
        rng = random.Random(seed)
        base = tmp_path / f"run{number:03d}"
        root, out_dir = base / "tree", base / "out"
        out_dir.mkdir(parents=True)
        make_tree(rng, root)
        run = plan_run(rng, seed, root, out_dir, tiny_model)
        scenario(run, root, rng)
