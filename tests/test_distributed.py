"""Several processes through `accelerate launch` (gloo on the CPU): one output, every item once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import MAX_NEW, make_pdf, noise

from granite_cli.distributed import item_cost, split


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(processes: int, *args: str, model: Path, input: bytes | None = None, background: bool = False):
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "granite_cli", "caption", *args,
        "--model", str(model), "--max-new-tokens", MAX_NEW, "--device", "cpu",
    ]  # fmt: skip
    if background:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    return subprocess.run(command, input=input, capture_output=True, timeout=600)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (launcher -> torchrun agent -> ranks), from /proc."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def single(*args: str, model: Path):
    command = [
        sys.executable,
        "-m",
        "granite_cli",
        "caption",
        *args,
        "--model",
        str(model),
        "--max-new-tokens",
        MAX_NEW,
    ]
    return subprocess.run(command, capture_output=True, timeout=600)


@pytest.fixture
def workload(tmp_path) -> Path:
    root = tmp_path / "work"
    root.mkdir()
    for i in range(9):
        noise(40 + 30 * (i % 4), 50 + 20 * (i % 3), i).save(root / f"p{i}.png")
    make_pdf(root / "doc.pdf", 3)
    (root / "broken.jpg").write_text("not a jpeg")
    return root


def test_split_is_deterministic_complete_and_balanced_by_cost():
    costs = [100, 1, 1, 1, 1, 1, 1, 1, 1, 1, 90, 5]
    shares = split(costs, 2)
    assert shares == split(costs, 2)
    assert sorted(i for share in shares for i in share) == list(range(len(costs)))
    assert all(share == sorted(share) for share in shares)
    loads = [sum(costs[i] for i in share) for share in shares]
    assert abs(loads[0] - loads[1]) <= 10  # by count it would be 6/6 items, 197 vs 7 cost units
    assert split([1.0] * 5, 3) == [[0, 3], [1, 4], [2]]
    assert split([], 4) == [[], [], [], []]


def test_split_gives_the_costliest_items_out_first_and_depends_on_the_costs_ratios_alone():
    """In input order, two thumbnails would go one to each process and the page after them to the
    first: 3 units against 1. Costliest first, the page is one process's share and the thumbnails
    the other's. Costs are in no particular unit: the same costs, however scaled, split alike."""
    assert split([1, 1, 2], 2) == [[2], [0, 1]]
    costs = [100, 1, 1, 1, 1, 1, 1, 1, 1, 1, 90, 5]
    for scale in (2.0**-70, 2.0**-20, 1.0, 2.0**40):  # powers of two: scaled exactly
        shares = split([cost * scale for cost in costs], 2)
        assert shares == [[0, 6, 8], [1, 2, 3, 4, 5, 7, 9, 10, 11]], scale  # 102 units each
    assert split([2.0**-70, 2.0**-71], 2) == [[0], [1]]  # two items, two processes: one each


def test_an_items_cost_is_its_image_tokens_plus_twenty_per_answer_token():
    """Each answer token runs one at a time, at a fraction of prefill speed per token: it weighs
    20 image tokens. An input that cannot be read costs one unit: it fails at once."""

    def image_tokens(width: int, height: int) -> int:
        return (width // 14) * (height // 14)

    assert item_cost((1400, 700), image_tokens, 0) == 5000.0
    assert item_cost((1400, 700), image_tokens, 50) == 6000.0
    assert item_cost((56, 56), image_tokens, 50) == 1016.0
    assert item_cost(None, image_tokens, 50) == 1.0


def ranks_of(path: Path, run_id: str, fmt: str = "jsonl", **options) -> list:
    """The output of each process of a run of two, in one process (the barrier is the caller's order)."""
    from granite_cli.output import FileOutput

    return [FileOutput(path, fmt, rank=rank, world=2, run_id=run_id, **options) for rank in (0, 1)]


def answered(source: str, answer: str):
    from granite_cli.records import Record

    return Record(source, None, "Describe", answer, None, "m")


def test_each_process_takes_a_share_weighed_by_the_sizes_its_pictures_have(tiny_engine, tmp_path):
    """Two processes weigh each item by its size, read cheaply (a picture's header, a PDF page's
    own box, not the first page's): the one large page of a PDF (146 image tokens with the tiny
    model) is a share on its own; its small first page and three small pictures (36 each), a
    broken file and a URL (read later: one unit each) are the other. Each process computes the
    same split."""
    from types import SimpleNamespace

    from granite_cli.api import _share
    from granite_cli.distributed import Ranks
    from granite_cli.readers import ReadOptions
    from granite_cli.sources import resolve

    pages = [noise(20, 15, 1), noise(1600, 1200, 2)]
    pages[0].save(tmp_path / "doc.pdf", save_all=True, append_images=pages[1:], resolution=72)
    for i in range(3):
        noise(40, 30, 10 + i).save(tmp_path / f"small{i}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    names = ["doc.pdf", "small0.png", "broken.png", "small1.png", "http://127.0.0.1:9/x.png", "small2.png"]
    items = resolve([name if name.startswith("http") else str(tmp_path / name) for name in names]).items
    shares = [
        _share(SimpleNamespace(ranks=Ranks(rank, 2), todo=items, read=ReadOptions()), tiny_engine, 0) for rank in (0, 1)
    ]
    assert [(Path(item.source).name, item.page) for item in shares[0]] == [("doc.pdf", 2)]
    assert [(Path(item.source).name, item.page) for item in shares[1]] == [
        ("doc.pdf", 1), ("small0.png", None), ("broken.png", None), ("small1.png", None), ("x.png", None),
        ("small2.png", None),
    ]  # fmt: skip


def test_a_fresh_run_of_two_processes_never_brings_back_a_dead_runs_answers(tmp_path):
    """A run of two processes died before merging; the next run (--overwrite) names only a.png,
    all of it on rank 0: its output holds that run's answer alone, and no part file is left."""
    from granite_cli.sources import Item

    out = tmp_path / "out.jsonl"
    for rank, sink in enumerate(ranks_of(out, "dead", resume=False)):
        sink.write(answered(f"{'ab'[rank]}.png", "old answer"))
        sink.close()  # killed here: nothing merged
    items = [Item("a.png")]
    first, second = ranks_of(out, "next", resume=False, overwrite=True)
    first.check(items), second.check(items)
    assert first.plan(items, None) == items
    first.write(answered("a.png", "new answer"))
    assert second.finish(items) == []  # rank 1 had nothing to do
    merged = first.finish(items)
    assert [(r.source, r.answer) for r in merged] == [("a.png", "new answer")]
    assert [(row["source"], row["answer"]) for row in map(json.loads, out.read_text().splitlines())] == [
        ("a.png", "new answer")
    ]
    assert not (tmp_path / "out.jsonl.parts").exists()


def test_resuming_with_two_processes_keeps_a_dead_runs_answers_once_each_in_input_order(tmp_path):
    from granite_cli.records import Job
    from granite_cli.sources import Item

    out = tmp_path / "out.jsonl"
    for rank, sink in enumerate(ranks_of(out, "dead", resume=False)):
        sink.write(answered(f"{'ca'[rank]}.png", f"answer {rank}"))
        sink.close()
    items = [Item(name) for name in ("a.png", "b.png", "c.png")]
    first, second = ranks_of(out, "next", resume=True)
    first.check(items)
    assert [item.source for item in first.plan(items, Job("Describe", "m"))] == ["b.png"]
    second.write(answered("b.png", "answer 2"))
    assert second.finish(items) == []
    first.finish(items)
    rows = [(row["source"], row["answer"]) for row in map(json.loads, out.read_text().splitlines())]
    assert rows == [("a.png", "answer 1"), ("b.png", "answer 2"), ("c.png", "answer 0")]
    assert not (tmp_path / "out.jsonl.parts").exists()


def test_two_processes_resuming_into_a_csv_edited_by_hand_refuse_before_writing(tmp_path):
    from granite_cli.errors import UsageError
    from granite_cli.records import Job
    from granite_cli.sources import Item

    report = tmp_path / "out.csv"
    first, second = ranks_of(report, "one", "csv", resume=False)
    first.write(answered("a.png", "an answer"))
    assert second.finish([]) == []
    first.finish([Item("a.png")])
    edited = report.read_text().replace("an answer", "MY FIX")
    report.write_text(edited)
    items = [Item("a.png"), Item("b.png")]
    first, second = ranks_of(report, "two", "csv", resume=True, label="--output out.csv")
    first.check(items)
    with pytest.raises(UsageError, match="^--output out.csv: a row was changed since granite-vision wrote it"):
        first.plan(items, Job("Describe", "m"))
    assert report.read_text() == edited


@pytest.mark.slow
def test_two_processes_write_the_same_records_as_one(workload, tiny_model, tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    first = single(str(workload), "-o", str(one), model=tiny_model)
    second = launch(2, str(workload), "-o", str(two), model=tiny_model)
    assert first.returncode == 1 and second.returncode != 0  # broken.jpg fails in both
    ours = [
        line
        for line in second.stderr.decode().splitlines()
        if line.lstrip().startswith('File "') and "granite_cli" in line
    ]
    assert ours == []  # (accelerate's launcher prints its own traceback for a rank's exit 1: no frame of ours)
    assert two.read_text() == one.read_text()
    assert len(one.read_text().splitlines()) == 13
    stderr = second.stderr.decode()
    assert "rank 0/2:" in stderr and "rank 1/2:" in stderr and "merged 13 records from 2 processes (1 failed)" in stderr
    assert not (tmp_path / "two.jsonl.parts").exists()


@pytest.mark.slow
def test_markdown_and_stdin_with_two_processes(workload, tiny_model, tmp_path):
    listing = "\n".join(str(p) for p in sorted(workload.glob("p*.png"))).encode()
    report = tmp_path / "report.md"
    result = launch(2, "-", "-f", "markdown", "-o", str(report), model=tiny_model, input=listing)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    text = report.read_text()
    assert [text.count(f"## `{p}`") for p in sorted(workload.glob("p*.png"))] == [1] * 9
    assert len((tmp_path / "report.md.jsonl").read_text().splitlines()) == 9


@pytest.mark.slow
def test_a_library_run_of_two_processes_reads_the_list_its_caller_hands_over(workload, tiny_model, tmp_path):
    """`run_caption(job, stdin=stream)` under `accelerate launch`: `-` is the caller's stream
    (read once, by the first process), not the process's own stdin (empty here); the first
    process's result holds every record of the run, merged, and counts its failures."""
    pictures = [*sorted(workload.glob("p*.png"))[:4], workload / "broken.jpg"]
    script = tmp_path / "run.py"
    script.write_text(
        "import io, os, sys\n"
        "from granite_cli.api import CaptionJob, run_caption\n"
        "job = CaptionJob(sources=['-'], output=sys.argv[1], model=sys.argv[2], device='cpu', max_new_tokens=2)\n"
        "result = run_caption(job, stdin=io.BytesIO(sys.argv[3].encode()))\n"
        "if os.environ['RANK'] == '0':\n"
        "    print(len(result.records), result.failed)\n"
    )
    out = tmp_path / "out.jsonl"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(script), str(out), str(tiny_model),
        "\n".join(map(str, pictures)),
    ]  # fmt: skip
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in records] == list(map(str, pictures))
    assert [r["answer"] is not None for r in records] == [True] * 4 + [False]
    assert done.stdout.decode().split() == ["5", "1"]


@pytest.mark.slow
def test_several_processes_need_an_output_file(workload, tiny_model):
    result = launch(2, str(workload), model=tiny_model)
    assert result.returncode != 0 and b"needs --output FILE" in result.stderr


@pytest.mark.slow
def test_resume_with_a_different_number_of_processes(workload, tiny_model, tmp_path):
    out = tmp_path / "out.jsonl"
    pngs = sorted(str(p) for p in workload.glob("p*.png"))
    assert single(*pngs[:4], "-o", str(out), model=tiny_model).returncode == 0
    resumed = launch(2, *pngs, "-o", str(out), "--resume", model=tiny_model)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert "4 answered before, 5 to run" in resumed.stderr.decode()
    reference = tmp_path / "ref.jsonl"
    single(*pngs, "-o", str(reference), model=tiny_model)
    assert out.read_text() == reference.read_text()


@pytest.mark.slow
def test_a_dead_run_keeps_every_finished_record_of_every_rank(tiny_model, tmp_path):
    """Two processes killed at once keep every line they finished; two resuming it (each
    writing a part file of its own run, never appending to the dead run's torn one) answer
    the rest, each picture once, in input order."""
    root = tmp_path / "many"
    root.mkdir()
    for i in range(120):
        noise(30 + i % 40, 30 + (i * 3) % 40, i).save(root / f"img{i:03d}.png")
    out = tmp_path / "out.jsonl"
    process = launch(2, str(root), "-o", str(out), "--batch-size", "2", model=tiny_model, background=True)
    parts = tmp_path / "out.jsonl.parts"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        files = list(parts.glob("rank-*.jsonl")) if parts.exists() else []
        if len(files) == 2 and all(f.read_bytes().count(b"\n") >= 5 for f in files):
            break
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    for pid in [process.pid, *descendants(process.pid)]:  # every rank dies at once
        os.kill(pid, signal.SIGKILL)
    process.wait()
    kept = 0
    for part in parts.glob("rank-*.jsonl"):
        lines = part.read_bytes().split(b"\n")
        kept += sum(1 for line in lines[:-1] if json.loads(line)["answer"] is not None)
    assert kept >= 10
    torn = sorted(parts.glob("rank-*.jsonl"))[-1]  # a rank killed while it wrote a line
    torn.write_bytes(torn.read_bytes() + b'{"source": "cut sh')
    resumed = launch(2, str(root), "-o", str(out), "--batch-size", "2", "--resume", model=tiny_model)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]  # its parts are its own: none appended to
    assert f"{kept} answered before" in resumed.stderr.decode()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in records] == sorted(str(p) for p in root.glob("*.png"))
    assert not parts.exists()


def test_each_process_of_several_loads_onto_its_own_gpu_unless_a_device_is_named():
    """`accelerate launch` on a 2-GPU machine: rank 1 was given cuda:1. `--device auto` or
    `cuda` mean that GPU (else both processes would load onto cuda:0); `cuda:0` or `cpu`, named
    exactly, are obeyed; a single process keeps what it was asked."""
    from granite_cli.distributed import Ranks

    second = Ranks(rank=1, world=2, device="cuda:1")
    assert [second.device_for(d) for d in ("auto", "cuda", "cuda:0", "cpu")] == ["cuda:1", "cuda:1", "cuda:0", "cpu"]
    assert [Ranks().device_for(d) for d in ("auto", "cuda", "cpu")] == ["auto", "cuda", "cpu"]
    assert Ranks(rank=1, world=2).device_for("auto") == "auto"  # (a rank without a device of its own)
