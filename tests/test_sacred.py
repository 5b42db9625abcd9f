"""A user's files are sacred, as a principle: what a second new-user run found, each as a user
would see it (the numbers are those of the issue that listed them)."""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from helpers import MAX_NEW, c_locale, disk_full, make_pdf, noise, one_error_line, read_jsonl, run_process, tree_hashes

import granite_cli
from granite_cli import UsageError


@pytest.fixture
def shots(tmp_path) -> Path:
    root = tmp_path / "shots"
    root.mkdir()
    for i in range(4):
        noise(40 + 8 * i, 40, 30 + i).save(root / f"s{i}.png")
    return root


# --------------------------------------------------------------------------- finished answers are never lost
def test_1_a_sidecar_job_run_again_keeps_every_earlier_record(cli, shots, tmp_path):
    out = tmp_path / "captions.jsonl"
    first = [str(shots / "s0.png"), str(shots / "s1.png")]  # a run stopped half-way, in effect
    assert cli("caption", *first, "--sidecar", ".txt", "-o", str(out)).exit_code == 0
    before = out.read_bytes()
    again = cli("caption", str(shots), "--sidecar", ".txt", "-o", str(out))  # the same command, all of it
    assert again.exit_code == 2 and "--resume" in again.stderr and "--overwrite" in again.stderr
    assert out.read_bytes() == before
    resumed = cli("caption", str(shots), "--sidecar", ".txt", "-o", str(out), "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert sorted(Path(r["source"]).name for r in read_jsonl(out)) == ["s0.png", "s1.png", "s2.png", "s3.png"]
    assert all((shots / f"s{i}.txt").exists() for i in range(4))


@pytest.mark.parametrize("fmt", ["jsonl", "markdown", "csv", "html"])
def test_2_an_output_holding_answers_is_replaced_only_with_overwrite(cli, shots, tmp_path, fmt):
    out = tmp_path / "out.result"
    journal = out if fmt == "jsonl" else tmp_path / "out.result.jsonl"
    assert cli("caption", str(shots), "-f", fmt, "-o", str(out)).exit_code == 0
    before = tree_hashes(tmp_path)
    for inputs in ([str(shots / "s0.png")], [str(shots)]):  # other inputs, or the same
        again = cli("caption", *inputs, "-f", fmt, "-o", str(out))
        assert again.exit_code == 2 and one_error_line(again.stderr) == (
            f"error: --output {out}: holds 4 answer(s) of an earlier run; refusing to replace them."
            " Hint: --resume continues that run, --overwrite replaces it (or pick another --output)"
        )
        assert tree_hashes(tmp_path) == before
    replaced = cli("caption", str(shots / "s0.png"), "-f", fmt, "-o", str(out), "--overwrite")
    assert replaced.exit_code == 0 and len(read_jsonl(journal)) == 1


@pytest.mark.slow
def test_3_two_runs_resuming_into_one_output_keep_every_record(tiny_model, shots, tmp_path):
    """`ls imgs/* | xargs -P2 -n1 granite-vision caption -o xb.jsonl --resume`: the second waits."""
    out = tmp_path / "xb.jsonl"
    args = ["-m", "granite_cli", "caption", "-o", str(out), "--resume", "--model", str(tiny_model)]
    for _ in range(2):
        processes = [
            subprocess.Popen([sys.executable, *args, "--max-new-tokens", MAX_NEW, str(path)], stderr=subprocess.PIPE)
            for path in sorted(shots.glob("*.png"))
        ]
        results = [(process.wait(timeout=300), process.stderr.read().decode()) for process in processes]
        assert all(code == 0 for code, _ in results), results
        assert sorted(Path(r["source"]).name for r in read_jsonl(out)) == [f"s{i}.png" for i in range(4)]
    assert not list(tmp_path.glob(".xb.jsonl.lock"))  # let go of, and gone


def test_3_a_lock_is_held_from_planning_to_the_end(cli, shots, tmp_path, monkeypatch):
    from granite_cli.journal import OutputLock

    held: list[bool] = []
    real_release = OutputLock.release

    def release(self):
        held.append(self.fd is not None and Path(self.path).exists())
        real_release(self)

    monkeypatch.setattr(OutputLock, "release", release)
    assert cli("caption", str(shots), "-o", str(tmp_path / "out.jsonl")).exit_code == 0
    assert held == [True] and not (tmp_path / ".out.jsonl.lock").exists()


@pytest.mark.parametrize(
    ("name", "fmt", "text"),
    [
        ("metadata.jsonl", "imagefolder", '{"file_name": "s0.png", "label": "cat"}\n'),
        ("table.csv", "csv", "source,page,notes\nx.png,1,hello\n"),
        ("table.csv", "csv", "source,page,prompt,answer,error\nx.png,one,hi,there,\n"),
        ("out.jsonl", "jsonl", '{"source": "a.png", "page": null, "prompt": "p", "model": "m"}\nnotes\n'),
        ("page.html", "html", "<!doctype html>\n<p>the user's own page</p>\n</html>\n"),
    ],
)
def test_4_a_file_is_ours_only_if_all_of_it_is_what_we_write(cli, shots, name, fmt, text):
    target = shots / name
    target.write_text(text)
    for extra in ([], ["--overwrite"], ["--resume"]):
        result = cli("caption", str(shots / "s0.png"), "-f", fmt, "-o", str(target), *extra)
        assert result.exit_code == 2 and "refusing" in one_error_line(result.stderr)
    assert target.read_text() == text


# --------------------------------------------------------------------------- names and prompts of any bytes
def test_5_a_name_that_is_not_utf8_is_answered_written_and_resumed(cli, shots, tmp_path, tiny_model):
    odd = os.fsdecode(os.fsencode(str(shots)) + b"/odd\x80\xff\xfe.png")  # the lowest and highest such bytes
    noise(30, 30).save(odd)
    out = tmp_path / "out.jsonl"
    result = cli("caption", str(shots), "-o", str(out))
    assert result.exit_code == 0, result.stderr
    raw = out.read_bytes()
    raw.decode("utf-8")  # valid UTF-8, every line
    assert b'odd\\udc80\\udcff\\udcfe.png"' in raw  # the undecodable bytes, as surrogate escapes
    assert odd in [record["source"] for record in read_jsonl(out)]  # ... which read back as the name
    resumed = cli("caption", str(shots), "-o", str(out), "--resume")
    assert resumed.exit_code == 0 and "5 answered before, 0 to run" in resumed.stderr
    stdout = cli("caption", odd)
    assert stdout.exit_code == 0 and stdout.records()[0]["source"] == odd
    for fmt in ("markdown", "csv", "html"):
        report = tmp_path / f"r.{fmt}"
        assert cli("caption", odd, "-f", fmt, "-o", str(report)).exit_code == 0
        assert "odd\\x80\\xff\\xfe.png" in report.read_text(encoding="utf-8")
    pdf = make_pdf(tmp_path / "doc.pdf", 1).rename(os.fsdecode(os.fsencode(str(tmp_path)) + b"/doc\xff.pdf"))
    report = tmp_path / "pages.html"
    assert cli("caption", str(pdf), "-o", str(report)).exit_code == 0  # a page's picture is made for it
    pictures = list((tmp_path / "pages.html.files").iterdir())
    assert len(pictures) == 1 and f"pages.html.files/{pictures[0].name}" in report.read_text()
    # A library caller's string may hold a lone surrogate no file name makes: shown as U+FFFD.
    report = tmp_path / "lone.md"
    granite_cli.caption(["gone\ud800\udd00\udfff.png"], output=str(report), format="markdown", model=str(tiny_model))
    assert "gone\ufffd\ufffd\ufffd.png" in report.read_text(encoding="utf-8")


def test_6_a_prompt_that_is_not_utf8_is_one_line_before_the_model(cli, shots, broken_model):
    for args, where in (
        (
            ("ask", str(shots / "s0.png"), "bad \udcff prompt"),
            "QUESTION: not valid UTF-8 text (byte 0xff at character 5)",
        ),
        (("caption", str(shots), "--prompt", "caf\udce9"), "--prompt: not valid UTF-8 text (byte 0xe9 at character 4)"),
    ):  # the byte a Latin-1 terminal sent, where a user counts (from 1)
        result = cli(*args, model=broken_model)
        said = f"error: {where}; check your terminal's encoding (it should be UTF-8)"
        assert result.exit_code == 2 and one_error_line(result.stderr) == said, result.stderr


def test_a_missing_file_in_a_sidecar_run_is_its_own_error_not_the_runs(cli, shots):
    (shots / "gone.png").symlink_to(shots / "nothing.png")
    result = cli("caption", str(shots / "s0.png"), str(shots / "gone.png"), "--sidecar", ".txt")
    assert result.exit_code == 1 and [r["error"] for r in result.records()] == [None, "no such file"]
    assert (shots / "s0.txt").exists() and not (shots / "gone.txt").exists()


def test_a_failed_item_keeps_its_record_though_something_lies_where_its_sidecar_would(cli, shots):
    (shots / "gone.txt").write_text("an old sidecar; the picture is gone")
    result = cli("caption", str(shots / "gone.png"), str(shots / "s0.png"), "--sidecar", ".txt")
    assert [(Path(r["source"]).name, r["error"]) for r in result.records()] == [
        ("gone.png", "no such file"),
        ("s0.png", None),
    ]


def test_7_a_sidecar_path_that_is_a_folder_or_a_pipe_is_refused(cli, shots):
    (shots / "s0.txt").mkdir()
    result = cli("caption", str(shots), "--sidecar", ".txt")
    assert result.exit_code == 2 and "s0.txt is a directory" in one_error_line(result.stderr)
    os.rmdir(shots / "s0.txt")
    os.mkfifo(shots / "s1.txt")  # reading it to check it would hang
    result = cli("caption", str(shots), "--sidecar", ".txt")
    assert result.exit_code == 2 and "s1.txt is not a regular file" in result.stderr.splitlines()[-1]


@pytest.mark.slow
def test_8_a_closed_stdout_and_an_ascii_locale(tiny_model, shots, tmp_path):
    args = ["--model", str(tiny_model), "--max-new-tokens", MAX_NEW]
    for command in (["caption", str(shots)], ["ask", str(shots / "s0.png"), "hi"]):  # `... >&-`
        result = subprocess.run(
            [sys.executable, "-m", "granite_cli", *command, *args],
            stderr=subprocess.PIPE,
            preexec_fn=lambda: os.close(1),
        )
        assert result.returncode == 2 and b"stdout is closed" in result.stderr, result.stderr
    written = subprocess.run(
        [sys.executable, "-m", "granite_cli", "caption", str(shots), "-o", str(tmp_path / "o.jsonl"), *args],
        stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1),
    )  # fmt: skip
    assert written.returncode == 0 and len(read_jsonl(tmp_path / "o.jsonl")) == 4  # stdout is not needed there
    emoji = shots / "😀.png"
    noise(30, 30).save(emoji)
    result = run_process("ask", str(emoji), "hi", "--json", *args, env={"PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0 and json.loads(result.stdout.decode("utf-8"))["source"] == str(emoji)


def library_telling(watched: tuple[int, ...], to: int, loud: bool = False) -> str:
    """A script running the CLI with a library under it that, whenever it opens a picture, tells
    on descriptor `to` where the `watched` descriptors lead at that moment; `loud`: first it
    writes to descriptor 2 itself (as C libraries do)."""
    return f"""
import contextlib, os, runpy, sys
from PIL import Image
real = Image.open
def telling(*args, **kwargs):
    if {loud}:
        with contextlib.suppress(OSError):
            os.write(2, b"written to fd 2\\n")
    for fd in {watched}:
        try:
            target = os.readlink(f"/proc/self/fd/{{fd}}")
        except OSError:
            target = "closed"
        os.write({to}, f"{{fd}} {{target}}\\n".encode())
    return real(*args, **kwargs)
Image.open = telling
sys.argv[0] = "granite-vision"
runpy.run_module("granite_cli", run_name="__main__")
"""


@pytest.mark.slow
def test_a_closed_stdin_and_stderr_take_none_of_our_files(tiny_model, shots, tmp_path):
    """`caption ... -o out.jsonl <&- 2>&-`: the numbers 0 and 2 are held (on /dev/null), so the
    files a run opens (its output, its lock, its journal) never take them, and whatever writes to
    "stderr" (a library, a child process) cannot land in one: the output holds its records."""
    out = tmp_path / "out.jsonl"
    command = ["caption", str(shots), str(shots / "missing.png"), "-o", str(out), "--batch-size", "1"]

    def close_0_and_2():
        os.close(0)
        os.close(2)

    script = library_telling((0, 2), to=1, loud=True)
    result = subprocess.run(
        [sys.executable, "-c", script, *command, "--model", str(tiny_model), "--max-new-tokens", MAX_NEW],
        stdout=subprocess.PIPE, preexec_fn=close_0_and_2, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    seen = set(result.stdout.decode().splitlines())
    assert seen == {"0 /dev/null", "2 /dev/null"}, seen
    records = read_jsonl(out)
    assert len(records) == 5 and sum(r["error"] is not None for r in records) == 1
    assert b"written to fd 2" not in out.read_bytes()


@pytest.mark.slow
def test_a_closed_stdout_and_stderr_are_held_even_beside_an_inherited_descriptor(tiny_model, shots, tmp_path):
    """`caption ... -o out.jsonl >&-` (with `2>&-` or without) from a parent that left
    descriptor 3 open: each closed one is held on /dev/null (its own number, whatever else is
    open), so no file the run opens takes it and nothing a library prints to it lands in one."""
    script = library_telling((1, 2), to=9)
    for closed in ((1, 2), (1,)):
        out, report = tmp_path / f"out{len(closed)}.jsonl", tmp_path / f"where{len(closed)}.txt"

        def close(closed=closed, report=report):  # (in the child)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 3)  # the parent's own open descriptor
            os.dup2(os.open(report, os.O_WRONLY | os.O_CREAT), 9)  # where the library's lines go instead
            for fd in closed:
                os.close(fd)

        command = ["caption", str(shots), "-o", str(out), "--model", str(tiny_model), "--max-new-tokens", MAX_NEW]
        result = subprocess.run([sys.executable, "-c", script, *command], preexec_fn=close, pass_fds=(3, 9),
                                stderr=None if 2 in closed else subprocess.DEVNULL, timeout=300)  # fmt: skip
        assert result.returncode == 0 and len(read_jsonl(out)) == 4
        lines = set(report.read_text().splitlines())
        assert {f"{fd} /dev/null" for fd in closed} <= lines and len(lines) == 2, (closed, lines)


@pytest.mark.slow
def test_a_file_name_no_encoding_can_show_is_escaped_on_stderr_not_a_crash(tiny_model, tmp_path):
    """A broken picture whose name is not valid UTF-8, under a UTF-8 and an ASCII locale: its
    error line on the real stderr shows the bad byte as an escape (`\\xff`), and the run still
    answers the other picture."""
    noise(30, 30).save(tmp_path / "good.png")
    bad = os.fsencode(tmp_path) + b"/bad\xff.png"
    with open(bad, "wb") as handle:
        handle.write(b"not a picture")
    for encoding in ("utf-8", "ascii"):
        result = run_process("caption", str(tmp_path), "--model", str(tiny_model), "--max-new-tokens", MAX_NEW,
                             env={"PYTHONIOENCODING": encoding})  # fmt: skip
        assert result.returncode == 1, result.stderr.decode(errors="replace")[-1500:]
        assert "Traceback" not in result.stderr.decode(errors="replace")
        assert b"bad\\xff.png: not an image or PDF" in result.stderr and b"bad\xff" not in result.stderr
        assert len(result.stdout.splitlines()) == 2


LINGERING_THREAD = """
import runpy, sys, threading, time
threading.Thread(target=time.sleep, args=(120,)).start()  # a library's own thread (a download, say)
sys.argv[0] = "granite-vision"
runpy.run_module("granite_cli", run_name="__main__")
"""


@pytest.mark.slow
def test_ctrl_c_leaves_without_waiting_for_a_librarys_thread(tiny_model, tmp_path):
    """Ctrl-C ends the run in its own time (exit 130, the records so far kept), not when some
    library's non-daemon thread would let the interpreter finish."""
    import signal

    for i in range(40):
        noise(30, 30, seed=i).save(tmp_path / f"p{i:02d}.png")
    out = tmp_path / "out.jsonl"
    command = ["caption", str(tmp_path), "-o", str(out), "--batch-size", "1", "--model", str(tiny_model),
               "--max-new-tokens", MAX_NEW]  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", LINGERING_THREAD, *command], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_bytes().count(b"\n") >= 1):  # the run is under way
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
        code = process.wait(timeout=60)
    finally:
        process.kill()
    assert code == 130 and time.monotonic() - started < 60 and 1 <= len(read_jsonl(out)) < 40


def test_9_and_10_the_library_takes_what_python_users_pass(tiny_model, shots, tmp_path):
    from PIL import Image

    model = {"model": str(tiny_model), "max_new_tokens": 4}
    one = granite_cli.caption(str(shots / "s0.png"), **model)  # a string is one source
    assert [Path(r.source).name for r in one.records] == ["s0.png"]
    assert granite_cli.caption([shots / "s1.png"], **model).answered == 1  # a Path works
    pdf = make_pdf(tmp_path / "doc.pdf", 3)
    assert [r.page for r in granite_cli.caption([pdf], pages=2, **model).records] == [2]
    picture = Image.open(shots / "s2.png")
    asked = granite_cli.ask(picture, "What is shown?", **model).record
    assert asked.ok and asked.source.startswith("<image ") and (asked.width, asked.height) == picture.size
    assert asked.answer == granite_cli.ask(str(shots / "s2.png"), "What is shown?", **model).record.answer
    two = [r.source for r in granite_cli.caption([picture, picture.rotate(90)], **model).records]
    assert two[0] == asked.source and two[1] != two[0]  # named by content: the same picture, the same name
    for bad, said in [
        ({"max_new_tokens": "4"}, "max_new_tokens='4': expected a whole number"),
        ({"temperature": "hot"}, "temperature='hot': expected a number"),
        ({"max_new_tokens": 0}, "max_new_tokens=0: expected at least 1"),
        ({"resume": "yes"}, "resume='yes': expected True or False"),
        ({"prompt": 5}, "prompt=5: expected text or a list or None"),
        ({"max_tiles": "4"}, "max_tiles='4': expected a whole number or None"),
        ({"max_new_token": 4}, "no keyword 'max_new_token' (did you mean max_new_tokens?)"),
        ({"format": "pdf"}, "format='pdf': expected one of"),
        ({"dtype": "fp8"}, "dtype='fp8': expected one of auto|bfloat16|float16|float32"),
    ]:
        with pytest.raises(UsageError, match=pytest.importorskip("re").escape(said)):
            granite_cli.caption([str(shots / "s0.png")], **(model | bad))
    with pytest.raises(UsageError, match="^source b'bytes': expected a path, a URL, - or a PIL image, not bytes$"):
        granite_cli.ask(b"bytes", "q", **model)
    assert re.fullmatch(r"<image [0-9a-f]{12}>", asked.source)  # as the README shows it

    with pytest.raises(UsageError, match="^sources='': empty \\(it names no file, folder or URL\\)$"):
        granite_cli.caption([str(shots / "s0.png"), ""], **model)


def test_the_library_names_a_keyword_it_does_not_take_and_shows_its_own_signature(tiny_model):
    """A misspelt keyword: one line with the closest real one, or none when nothing is close;
    the CLI's own fields are no keywords. `help(granite_cli.caption)` lists the real ones, typed,
    with their defaults, after the positional arguments."""
    import inspect

    for call, said in [
        (lambda: granite_cli.caption(["x.png"], max_new_token=4),
         "caption(): no keyword 'max_new_token' (did you mean max_new_tokens?)"),
        (lambda: granite_cli.ask("x.png", "q", max_tile=4), "ask(): no keyword 'max_tile' (did you mean max_tiles?)"),
        (lambda: granite_cli.caption(["x.png"], zzz=1), "caption(): no keyword 'zzz'"),
        (lambda: granite_cli.caption(["x.png"], from_cli=True), "caption(): no keyword 'from_cli'"),
        (lambda: granite_cli.caption(["x.png"], model_origin="--model"), "caption(): no keyword 'model_origin'"),
    ]:  # fmt: skip
        with pytest.raises(UsageError) as refused:
            call()
        assert str(refused.value) == said
    for function, first in ((granite_cli.ask, ["source", "question"]), (granite_cli.caption, ["sources"])):
        parameters = list(inspect.signature(function).parameters.values())
        assert [p.name for p in parameters[: len(first)]] == first
        assert all(p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in parameters[: len(first)])
        rest = {p.name: p for p in parameters[len(first) :]}
        assert all(p.kind is p.KEYWORD_ONLY for p in rest.values()) and not {"from_cli", "model_origin"} & set(rest)
        assert (rest["max_new_tokens"].default, rest["max_new_tokens"].annotation) == (256, int)
        assert (rest["model"].default, rest["temperature"].annotation) == (granite_cli.DEFAULT_MODEL, float)
    assert str(inspect.signature(granite_cli.caption)).startswith("(sources: list[str], *, model: str = ")
    assert "pages: str | None = None" in str(inspect.signature(granite_cli.caption))


def test_every_name_the_package_exports_is_there_and_others_are_an_attribute_error():
    """`from granite_cli import *` and each name in `__all__` (imported when first used); a name
    it lacks raises AttributeError as a module does (so hasattr and getattr defaults work)."""
    for name in [*granite_cli.__all__, "AskJob", "CaptionJob"]:
        value = getattr(granite_cli, name)
        assert value == "ibm-granite/granite-vision-3.3-2b" if name == "DEFAULT_MODEL" else value.__name__ == name
    with pytest.raises(AttributeError) as missing:
        granite_cli.nothing_here  # noqa: B018
    assert str(missing.value) == "module 'granite_cli' has no attribute 'nothing_here'"
    assert not hasattr(granite_cli, "askjob") and getattr(granite_cli, "Ask", None) is None


def test_ask_dash_with_no_picture_coming_says_where_to_pipe_it(tiny_model, shots, monkeypatch):
    """`ask -` reads the picture's bytes from stdin: a terminal or a closed stdin would wait
    forever or read nothing, so each is one line saying how to pipe a picture in."""
    import io

    class Terminal(io.TextIOWrapper):
        def isatty(self) -> bool:
            return True

    pipe = "; pipe a picture in: cat photo.jpg | granite-vision ask - 'What is shown?'"
    model = {"model": str(tiny_model), "max_new_tokens": 2}
    for stdin, state in ((None, "closed"), (Terminal(io.BytesIO(b"")), "a terminal")):
        monkeypatch.setattr(sys, "stdin", stdin)
        with pytest.raises(UsageError) as refused:
            granite_cli.ask("-", "What is shown?", **model)
        assert str(refused.value) == f"ask -: stdin is {state}{pipe}"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((shots / "s0.png").read_bytes())))
    assert granite_cli.ask("-", "What is shown?", **model).record.ok  # piped in: read
    monkeypatch.setattr(sys, "stdin", None)
    assert granite_cli.ask(str(shots / "s1.png"), "What is shown?", **model).record.ok  # a file: stdin is no matter


def test_the_library_reads_paths_from_its_stdin_for_a_dash(tiny_model, shots, monkeypatch):
    """`caption(["-"])` reads paths from the process's stdin; a closed one is one line."""
    import io

    model = {"model": str(tiny_model), "max_new_tokens": 2}
    paths = f"{shots / 's0.png'}\n{shots / 's1.png'}\n".encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(paths)))
    read = granite_cli.caption(["-"], **model)
    assert [r.source for r in read.records] == [str(shots / "s0.png"), str(shots / "s1.png")]
    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(UsageError, match="^caption -: stdin is closed, so there are no paths to read$"):
        granite_cli.caption(["-"], **model)


def test_a_picture_in_memory_is_read_as_the_same_picture_in_a_file_would_be(tiny_model, tmp_path):
    """A PIL image passed to the library: its EXIF orientation is applied (as for a file), and
    modes PNG cannot hold (CMYK, 32-bit) are read too, at their size."""
    from PIL import Image

    model = {"model": str(tiny_model), "max_new_tokens": 2}
    upright = noise(40, 20)
    exif = upright.getexif()
    exif[0x0112] = 6  # "rotate 90° to show": a phone photo taken in portrait
    upright.save(tmp_path / "turned.jpg", exif=exif)
    from_file = granite_cli.ask(str(tmp_path / "turned.jpg"), "q", **model).record
    in_memory = granite_cli.ask(Image.open(tmp_path / "turned.jpg"), "q", **model).record
    assert (from_file.width, from_file.height) == (in_memory.width, in_memory.height) == (20, 40)
    for mode in ("CMYK", "I", "F"):
        record = granite_cli.ask(upright.convert(mode), "q", **model).record
        assert record.ok and (record.width, record.height) == (40, 20), (mode, record.error)


def test_an_empty_argument_is_a_slip_named_as_the_command_spells_it(cli, shots):
    """`caption "$DIR"` with DIR unset, `ask img.png ""`: one line naming the argument, exit 2,
    before the model loads; nothing on stdout."""
    picture = str(shots / "s0.png")
    for args, line in [
        (("caption", picture, ""), "error: SOURCE '': empty (it names no file, folder or URL)"),
        (("ask", "", "What is shown?"), "error: SOURCE '': empty (it names no file, folder or URL)"),
        (("ask", picture, ""), "error: QUESTION '': empty (there is nothing to ask)"),
        (("caption", picture, "--prompt", ""), "error: --prompt '': empty (there is nothing to ask)"),
    ]:
        result = cli(*args)
        assert (result.exit_code, one_error_line(result.stderr), result.stdout) == (2, line, ""), args


# --------------------------------------------------------------------------- results that say what is true
def test_11_imagefolder_refuses_what_the_loader_cannot_read(cli, tmp_path, monkeypatch):
    data = tmp_path / "data"
    for split in ("train", "test"):
        (data / split).mkdir(parents=True)
        noise(30, 30).save(data / split / "a.png")
    result = cli("caption", str(data), "-f", "imagefolder", "-o", str(data / "metadata.jsonl"))
    assert result.exit_code == 2 and "split folders (test/)" in one_error_line(result.stderr)
    assert "-o " + str(data / "test" / "metadata.jsonl") in result.stderr
    deeper = tmp_path / "deeper"  # a split folder further down: the loader finds it too
    (deeper / "photos" / "val").mkdir(parents=True)
    noise(30, 30).save(deeper / "photos" / "val" / "a.png")
    nested = cli("caption", str(deeper), "-f", "imagefolder", "-o", str(deeper / "metadata.jsonl"))
    assert nested.exit_code == 2 and "split folders (val/)" in one_error_line(nested.stderr)
    named = tmp_path / "named"  # so does a picture named like a split: it alone, without captions
    named.mkdir()
    for name in ("a.png", "my_test.png"):
        noise(30, 30).save(named / name)
    like = cli("caption", str(named), "-f", "imagefolder", "-o", str(named / "metadata.jsonl"))
    assert like.exit_code == 2 and one_error_line(like.stderr) == (
        f"error: --format imagefolder: {named / 'my_test.png'} is named like a split: the loader would take it"
        " for one, and load it alone, without captions; rename it, or write the dataset elsewhere"
    )
    assert not (named / "metadata.jsonl").exists()
    per_split = cli("caption", str(data / "train"), "-f", "imagefolder", "-o", str(data / "train" / "metadata.jsonl"))
    assert per_split.exit_code == 0
    import datasets

    loaded = datasets.load_dataset("imagefolder", data_dir=str(data / "train"), split="train")
    assert loaded.num_rows == 1 and loaded[0]["text"]
    args = ("-f", "imagefolder", "-o", str(data / "train" / "metadata.jsonl"))
    for name in ("metadata.csv", "metadata.parquet"):  # the loader reads one metadata file per folder
        (data / "train" / name).write_text("file_name,text\na.png,x\n")
        other = cli("caption", str(data / "train"), *args)
        assert other.exit_code == 2 and other.stderr.strip().splitlines()[-1] == (
            f"error: --format imagefolder: {data / 'train' / name} is there too, and the loader reads one metadata"
            " file per folder (it would fail); move it away, or write the dataset elsewhere"
        )
        (data / "train" / name).unlink()
    monkeypatch.chdir(data / "train")  # a URL is no file of the dataset, wherever the run stands
    url = cli("caption", "http://127.0.0.1:9/a.png", *args)
    assert url.exit_code == 2 and "http://127.0.0.1:9/a.png is not a file inside" in url.stderr


@pytest.mark.parametrize("fmt", ["markdown", "html", "csv"])
def test_12_resuming_with_nothing_left_leaves_a_whole_report(cli, shots, tmp_path, fmt):
    report = tmp_path / f"rr.{fmt}"
    assert cli("caption", str(shots), "-f", fmt, "-o", str(report)).exit_code == 0
    whole = report.read_bytes()
    if fmt != "markdown":  # a report cut short is not all ours any more: left alone (markdown has no end to tell by)
        report.write_bytes(whole[: len(whole) // 2])
        assert cli("caption", str(shots), "-f", fmt, "-o", str(report), "--resume").exit_code == 2
        assert report.read_bytes() == whole[: len(whole) // 2]
    for damage in (report.unlink, lambda: report.write_bytes(b"")):
        damage()
        resumed = cli("caption", str(shots), "-f", fmt, "-o", str(report), "--resume")
        assert resumed.exit_code == 0 and report.stat().st_size > 100
        if fmt != "html":  # (html says when it was made)
            assert report.read_bytes() == whole
    before = report.stat().st_mtime_ns
    assert cli("caption", str(shots), "-f", fmt, "-o", str(report), "--resume").exit_code == 0
    assert report.stat().st_mtime_ns == before  # an intact report is left as it is


def test_13_schema_fields_may_not_take_a_formats_own_columns(cli, shots, tmp_path):
    for fmt, fields, taken, own in [
        ("csv", "source:boolean, page:boolean, error:boolean", "'source', 'page', 'error'",
         "source, page, prompt, answer, error"),
        ("imagefolder", "file_name, text, ok:boolean", "'file_name', 'text'", "file_name, text, page"),
    ]:  # fmt: skip
        out = shots / "metadata.jsonl" if fmt == "imagefolder" else tmp_path / "t.csv"
        result = cli("caption", str(shots), "-f", fmt, "-o", str(out), "--schema", fields)
        said = f"error: --format {fmt}: the --schema field(s) {taken} would share a column with {fmt}'s own ({own})"
        assert result.exit_code == 2 and one_error_line(result.stderr) == f"{said}; rename the field(s)"
        assert not out.exists()


def test_14_csv_cells_never_run_as_formulas(cli, shots, tmp_path, monkeypatch):
    noise(30, 30).save(shots / "=1+1.png")
    monkeypatch.chdir(shots)
    out = tmp_path / "t.csv"
    result = cli("caption", "=1+1.png", "-o", str(out), "--prompt", '=HYPERLINK("http://x","y")')
    assert result.exit_code == 0
    row = list(csv.DictReader(io.StringIO(out.read_text())))[0]
    assert row["source"] == "'=1+1.png" and row["prompt"].startswith("'=HYPERLINK")
    numbers = cli("caption", str(shots / "s0.png"), "-o", str(tmp_path / "n.csv"), "--schema", "n:number")
    assert numbers.exit_code in (0, 1)  # a number is a number: no apostrophe (tested on the writer below)
    from granite_cli.records import Record
    from granite_cli.writers import render

    record = Record("-a.png", None, "p", "-5 is the answer", None, "m", data={"n": -5, "t": "+x"})
    cells = list(csv.reader(io.StringIO(render("csv", [record], None, ["n", "t"]))))[1]
    assert cells == ["'-a.png", "", "p", "'-5 is the answer", "-5", "'+x", ""]


def test_15_width_and_height_are_the_pictures_own_size_whatever_its_size(cli, tmp_path):
    from PIL import Image

    for size in [(300, 200), (4000, 4000), (6000, 4500)]:
        Image.new("RGB", size, (10, 20, 30)).save(tmp_path / f"{size[0]}.jpg")
    records = cli("caption", *sorted(map(str, tmp_path.glob("*.jpg")))).records()
    assert sorted((r["width"], r["height"]) for r in records) == [(300, 200), (4000, 4000), (6000, 4500)]


def test_16_and_28_the_html_report_fetches_nothing_and_shows_every_page(cli, tmp_path, http_root):
    base, served = http_root
    make_pdf(tmp_path / "doc.pdf", 2)
    frames = [noise(40, 30, i) for i in range(2)]
    frames[0].save(tmp_path / "scan.tiff", save_all=True, append_images=frames[1:])
    report = tmp_path / "out" / "report.html"
    report.parent.mkdir()
    url = f"{base}/remote.png"
    args = ["caption", str(tmp_path / "doc.pdf"), str(tmp_path / "scan.tiff"), url, "-o", str(report)]
    assert cli(*args).exit_code == 0
    text = report.read_text()
    sources = [part.split('"')[0] for part in text.split('<img src="')[1:]]
    assert len(sources) == 5 and all(src.startswith("report.html.files/") for src in sources)  # every page shown
    assert "http://" not in "".join(sources) and f'href="{url}"' in text  # a link to click, nothing fetched
    files = sorted((report.parent / "report.html.files").iterdir())
    assert len(files) == 5 and all(f.read_bytes()[:2] == b"\xff\xd8" for f in files)  # small JPEGs
    again = [f.stat().st_mtime_ns for f in files]
    assert cli(*args, "--resume").exit_code == 0  # resumable: nothing rebuilt, the pictures stay
    assert [f.stat().st_mtime_ns for f in files] == again and report.read_text().count("<img src=") == 5
    (report.parent / "report.html.files" / "mine.txt").write_text("the user's")
    refused = cli(*args, "--overwrite")
    assert refused.exit_code == 2 and one_error_line(refused.stderr) == (
        f"error: --output {report}: {report.parent / 'report.html.files'} is not the report's folder of page"
        " pictures; refusing to write in it. Hint: pick another --output"
    )
    folder = report.parent / "report.html.files"
    (folder / "mine.txt").unlink()
    folder.rename(tmp_path / "elsewhere")
    folder.symlink_to(tmp_path / "elsewhere")  # a link to a folder of the same pictures: still not ours to write in
    assert cli(*args, "--overwrite").exit_code == 2
    folder.unlink()
    folder.write_text("a file where the folder would be")
    assert cli(*args, "--overwrite").exit_code == 2 and folder.read_text() == "a file where the folder would be"
    failed = tmp_path / "failed.html"  # pages read but not answered (a prompt no context holds): shown, with why
    assert cli("caption", str(tmp_path / "doc.pdf"), "--prompt", "word " * 3000, "-o", str(failed)).exit_code == 1
    text = failed.read_text()
    assert text.count('<article class="card error"') == 2 and text.count('<img src="failed.html.files/') == 2


def test_17_resuming_with_fewer_inputs_counts_them_and_keeps_the_order(cli, shots, tmp_path):
    out = tmp_path / "out.jsonl"
    assert cli("caption", str(shots), "-o", str(out)).exit_code == 0
    noise(30, 30).save(shots / "new.png")
    resumed = cli("caption", str(shots / "s1.png"), str(shots / "new.png"), "-o", str(out), "--resume")
    assert resumed.exit_code == 0
    assert "1 answered before, 1 to run; 3 record(s) of pictures this run does not name are kept" in resumed.stderr
    assert [Path(r["source"]).name for r in read_jsonl(out)] == ["s0.png", "s1.png", "s2.png", "s3.png", "new.png"]
    failed = tmp_path / "failed.jsonl"  # a failure of a picture not named is not counted as kept: it is not
    assert cli("caption", str(shots / "s0.png"), str(shots / "gone.png"), "-o", str(failed)).exit_code == 1
    again = cli("caption", str(shots / "s1.png"), "-o", str(failed), "--resume")
    assert "0 answered before, 1 to run; 1 record(s) of pictures this run does not name are kept" in again.stderr
    assert [Path(r["source"]).name for r in read_jsonl(failed)] == ["s0.png", "s1.png"]


def test_18_resume_reruns_what_max_new_tokens_changes_and_refuses_other_changes(cli, shots, tmp_path):
    out = tmp_path / "out.jsonl"
    assert cli("caption", str(shots), "-o", str(out), "--max-new-tokens", "3").exit_code == 0
    assert all(r["finish_reason"] == "length" for r in read_jsonl(out))
    longer = cli("caption", str(shots), "-o", str(out), "--resume", "--max-new-tokens", "8")
    assert longer.exit_code == 0 and "0 answered before, 4 to run (4 cut by another --max-new-tokens" in longer.stderr
    assert [r["answer_tokens"] for r in read_jsonl(out)] == [8, 8, 8, 8]
    same = cli("caption", str(shots), "-o", str(out), "--resume", "--max-new-tokens", "8")
    assert "4 answered before, 0 to run" in same.stderr
    before = out.read_bytes()
    for option, value in [
        ("--temperature", "0.7"),
        ("--dpi", "72"),
        ("--max-tiles", "3"),
        ("--pdf-renderer", "poppler"),
    ]:
        changed = cli("caption", str(shots), "-o", str(out), "--resume", "--max-new-tokens", "8", option, value)
        assert changed.exit_code == 2 and f"another {option} (" in one_error_line(changed.stderr), changed.stderr
        assert out.read_bytes() == before


# --------------------------------------------------------------------------- messages and friction
def test_19_the_format_comes_from_the_outputs_ending(cli, shots, tmp_path):
    for name, starts in [("r.html", "<!doctype html>"), ("r.md", "# granite-vision report"), ("r.csv", "source,page")]:
        assert cli("caption", str(shots / "s0.png"), "-o", str(tmp_path / name)).exit_code == 0
        assert (tmp_path / name).read_text().startswith(starts)
    clash = cli("caption", str(shots / "s0.png"), "-f", "markdown", "-o", str(tmp_path / "x.html"))
    assert (clash.exit_code, one_error_line(clash.stderr)) == (
        2,
        f"error: --format markdown, but --output {tmp_path / 'x.html'} ends in .html, which is html; leave out"
        " --format, or name the output *.md",
    )
    assert not (tmp_path / "x.html").exists()


def test_20_an_html_report_on_stdout_says_why_it_has_no_pictures(cli, shots):
    result = cli("caption", str(shots / "s0.png"), "-f", "html")
    warned = (
        "warning: an HTML report on stdout shows no pictures: they are linked from the report's own folder;"
        " write it to a file (-o report.html) to see them"
    )
    assert result.exit_code == 0 and warned in result.stderr.splitlines()
    assert "Pictures show only in a report written to a file" in result.stdout


def test_21_wrong_argument_order_gets_a_hint(cli, shots):
    picture = str(shots / "s0.png")
    swapped = cli("ask", "What is shown?", picture)
    hint = "What is shown?: no such file. Hint: ask takes the picture first, then the question:"
    assert (swapped.exit_code, one_error_line(swapped.stderr)) == (
        2, f"error: {hint} granite-vision ask {picture} 'What is shown?'",
    )  # fmt: skip
    with pytest.raises(UsageError) as refused:  # the library says it in its own words
        granite_cli.ask("What is shown?", picture)
    assert str(refused.value) == f"{hint} ask({picture!r}, 'What is shown?')"
    extra = cli("ask", str(shots / "s0.png"), str(shots / "s1.png"), "hi")
    assert extra.exit_code == 2 and "granite-vision caption a.png b.png" in one_error_line(extra.stderr)


def test_a_question_that_names_a_file_is_still_a_question_after_a_real_picture(cli, shots, http_root, monkeypatch):
    """The swap hint is for a first argument that is no picture: after an existing file, a URL
    or `-`, a question that happens to name a file in this folder is asked as it is."""
    base, folder = http_root
    monkeypatch.chdir(shots)
    (shots / "describe").write_text("a file named like the question")
    for args, stdin in (((str(shots / "s0.png"), "describe"), None), ((f"{base}/remote.png", "describe"), None),
                        (("-", "describe"), (shots / "s1.png").read_bytes())):  # fmt: skip
        result = cli("ask", *args, "--json", input=stdin)
        assert result.exit_code == 0 and json.loads(result.stdout)["prompt"] == "describe", (args, result.stderr)


def test_22_an_incomplete_model_folder_names_what_it_lacks(cli, shots, tiny_model, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "model.safetensors"):
        (partial / name).write_bytes((tiny_model / name).read_bytes())
    result = cli("ask", str(shots / "s0.png"), "hi", model=partial)
    line = one_error_line(result.stderr)
    assert result.exit_code == 2 and line == (
        f"error: model folder {str(partial)!r} lacks its image processor (preprocessor_config.json) and its"
        " tokenizer (tokenizer.json or tokenizer_config.json): copy the whole model folder (every file of its"
        " Hub repository), not only some of its files"
    )
    (partial / "config.json").unlink()  # a folder that is no model at all
    line = one_error_line(cli("ask", str(shots / "s0.png"), "hi", model=partial).stderr)
    assert line == f"error: model folder {str(partial)!r} has no config.json: it is not a Hugging Face model folder"


def test_23_sidecar_messages(cli, shots):
    hint = cli("caption", str(shots), "--sidecar", "txt")
    assert hint.exit_code == 2 and "did you mean .txt?" in hint.stderr
    dots = cli("caption", str(shots), "--sidecar", "..")
    assert dots.exit_code == 2
    assert one_error_line(dots.stderr) == "error: --sidecar '..': expected a file name ending, like .txt or .caption"
    (shots / "s3.txt").write_bytes(b"\x00binary")  # found though a failing item comes first
    behind = cli("caption", str(shots / "missing.png"), str(shots / "s3.png"), "--sidecar", ".txt")
    assert behind.exit_code == 2 and f"{shots / 's3.txt'} exists and is not a text file" in behind.stderr
    (shots / "s3.txt").unlink()
    for i in range(4):
        noise(20, 20).save(shots / f"s{i}.jpg")
    clashes = cli("caption", str(shots), "--sidecar", ".txt")
    line = one_error_line(clashes.stderr)
    assert clashes.exit_code == 2 and line.count("would both write") == 3 and "(and 1 more)" in line
    assert f"{shots / 's0.jpg'} and {shots / 's0.png'} would both write {shots / 's0.txt'}; " in line
    (shots / "s3.jpg").unlink()
    three = one_error_line(cli("caption", str(shots), "--sidecar", ".txt").stderr)
    assert three.count("would both write") == 3 and three.endswith(".txt")  # all of them, nothing more to say


def test_a_folder_where_no_sidecar_can_be_written_is_named_before_any_work(cli, tmp_path):
    """Checked by writing a probe file there: here a folder whose path is so long that a picture
    fits in it but no temporary file name does (the same line as a read-only one, with its reason)."""
    folder = str(tmp_path)
    while len(folder) < 4070:
        folder = os.path.join(folder, "d" * min(200, 4070 - len(folder) - 1))
        os.mkdir(folder)
    noise(20, 20).save(os.path.join(folder, "a.png"))
    result = cli("caption", os.path.join(folder, "a.png"), "--sidecar", ".txt")
    line = one_error_line(result.stderr)
    assert result.exit_code == 2 and line == f"error: --sidecar: cannot write in {folder} (File name too long)"


def test_24_options_that_mean_nothing_are_said(cli, shots):
    assert "--pages ''" in one_error_line(cli("caption", str(shots), "--pages", "").stderr)
    assert "--output '': an empty file name" in one_error_line(cli("caption", str(shots), "-o", "").stderr)
    seeded = cli("caption", str(shots / "s0.png"), "--seed", "3")
    assert seeded.exit_code == 0 and "--seed has no effect at --temperature 0" in seeded.stderr


@pytest.mark.slow
def test_26_a_terminal_hears_what_is_loading_and_what_is_awaited(tiny_model, shots):
    """On a terminal (a pty here): a line before the model loads; `ask -` will not wait for a
    picture to be typed; `caption -` says it reads paths."""
    import pty

    def on_terminal(*args: str, stdin_tty: bool = False) -> tuple[int, str]:
        main, side = pty.openpty()
        process = subprocess.Popen(
            [sys.executable, "-m", "granite_cli", *args, "--model", str(tiny_model), "--max-new-tokens", MAX_NEW],
            stdin=side if stdin_tty else subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=side,
        )  # fmt: skip
        os.close(side)
        if stdin_tty:
            os.write(main, str(shots / "s0.png").encode() + b"\n\x04")
        chunks = []
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(main)
        return process.wait(timeout=120), b"".join(chunks).decode(errors="replace")

    code, said = on_terminal("caption", str(shots / "s0.png"))
    assert code == 0 and f"loading {tiny_model}…" in said
    code, said = on_terminal("ask", "-", "What is shown?", stdin_tty=True)
    assert code == 2 and "ask -: stdin is a terminal; pipe a picture in" in said
    code, said = on_terminal("caption", "-", stdin_tty=True)
    assert code == 0 and "reading paths from stdin, one per line; end with Ctrl-D" in said


def test_27_the_library_exports_its_errors_and_shows_its_keywords():
    import inspect

    from granite_cli import DeviceError, InputError, OutputError, Record  # noqa: F401

    parameters = inspect.signature(granite_cli.caption).parameters
    assert {"output", "format", "resume", "max_new_tokens", "schema", "sidecar"} <= set(parameters)
    assert parameters["max_new_tokens"].default == 256 and "question" in inspect.signature(granite_cli.ask).parameters


def test_27_choices_take_any_case(tiny_model, shots, tmp_path):
    out = tmp_path / "t.csv"
    result = granite_cli.caption([shots / "s0.png"], model=str(tiny_model), format="CSV", output=str(out), device="CPU")
    assert result.answered == 1 and out.read_text().startswith("source,page,")


# --------------------------------------------------------------------------- what a stranger's hour found next
def test_an_imagefolder_dataset_resumes_with_its_journal_beside_it(cli, tmp_path):
    data = tmp_path / "ds"
    data.mkdir()
    noise(30, 30, 1).save(data / "a.png")
    metadata = data / "metadata.jsonl"
    assert cli("caption", str(data), "-f", "imagefolder", "-o", str(metadata)).exit_code == 0
    noise(30, 30, 2).save(data / "b.png")
    resumed = cli("caption", str(data), "-f", "imagefolder", "-o", str(metadata), "--resume")
    assert resumed.exit_code == 0 and "1 answered before, 1 to run" in resumed.stderr
    assert [json.loads(line)["file_name"] for line in metadata.read_text().splitlines()] == ["a.png", "b.png"]
    noise(30, 30, 3).save(data / "c.png")  # and again, over rows of several pictures
    again = cli("caption", str(data), "-f", "imagefolder", "-o", str(metadata), "--resume")
    assert again.exit_code == 0 and "2 answered before, 1 to run" in again.stderr
    assert [json.loads(line)["file_name"] for line in metadata.read_text().splitlines()] == ["a.png", "b.png", "c.png"]
    theirs = tmp_path / "theirs"  # someone's own labels, with pages too: not ours to replace
    theirs.mkdir()
    noise(30, 30, 1).save(theirs / "a.png")
    mine = '{"file_name": "a.png", "label": "cat", "page": 1}\n'
    (theirs / "metadata.jsonl").write_text(mine)
    refused = cli("caption", str(theirs), "-f", "imagefolder", "-o", str(theirs / "metadata.jsonl"), "--overwrite")
    assert refused.exit_code == 2 and "is not a granite-vision output" in one_error_line(refused.stderr)
    assert (theirs / "metadata.jsonl").read_text() == mine


def test_pictures_in_memory_are_named_by_content_so_resume_loses_none(tiny_model, tmp_path):
    from PIL import Image

    out, model = tmp_path / "pil.jsonl", {"model": str(tiny_model), "max_new_tokens": 3}
    red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (80, 60), "blue")
    granite_cli.caption([red], output=str(out), **model)
    second = granite_cli.caption([blue, red], output=str(out), resume=True, **model)
    assert second.answered == 1  # blue is new, red was answered before
    names = [r["source"] for r in read_jsonl(out)]
    assert len(names) == 2 and len(set(names)) == 2 and all(n.startswith("<image ") for n in names)


@pytest.mark.slow
def test_a_stream_cannot_be_resumed_into(tiny_model, shots, tmp_path):
    out = tmp_path / "ps.jsonl"
    args = ["--model", str(tiny_model), "--max-new-tokens", MAX_NEW, "-o", str(out)]
    first = subprocess.run(
        ["bash", "-c", 'python3 -m granite_cli caption <(cat "$0") "$@"', str(shots / "s0.png"), *args]
    )
    assert first.returncode == 0
    again = subprocess.run(
        ["bash", "-c", 'python3 -m granite_cli caption <(cat "$0") "$@"', str(shots / "s1.png"), *args, "--resume"],
        stderr=subprocess.PIPE,
    )
    assert again.returncode == 2 and b"is a stream (a pipe or a device)" in again.stderr
    assert len(read_jsonl(out)) == 1


def test_a_fifo_named_as_an_input_cannot_be_resumed_into(cli, shots, tmp_path):
    """(In-process twin of the test above: a named pipe, fed by a thread.)"""
    import threading

    fifo, out = tmp_path / "pipe.png", tmp_path / "ps.jsonl"
    os.mkfifo(fifo)

    def fed(picture: Path, *args: str):
        feeder = threading.Thread(target=fifo.write_bytes, args=(picture.read_bytes(),), daemon=True)
        feeder.start()
        result = cli("caption", str(fifo), "-o", str(out), *args)
        with contextlib.suppress(OSError):  # a feeder nobody read from: let it go
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        feeder.join(10)
        return result

    assert fed(shots / "s0.png").exit_code == 0
    again = fed(shots / "s1.png", "--resume")
    assert again.exit_code == 2 and one_error_line(again.stderr) == (
        f"error: --resume: {fifo} is a stream (a pipe or a device), which has no identity to be found again"
        " by: its earlier record may be another picture's. Hint: resume with files (save the stream to one)"
    )
    assert len(read_jsonl(out)) == 1


def test_a_pdf_through_a_named_pipe_takes_pages_like_a_file(cli, tmp_path):
    """`caption <(cat doc.pdf) --pages 2`: a document read from a pipe is still a document whose
    pages are chosen."""
    import threading

    fifo = tmp_path / "doc.pdf"
    os.mkfifo(fifo)
    data = make_pdf(tmp_path / "real.pdf", 3).read_bytes()
    feeder = threading.Thread(target=fifo.write_bytes, args=(data,), daemon=True)
    feeder.start()
    result = cli("caption", str(fifo), "--pages", "2")
    feeder.join(10)
    assert [(r["source"], r["page"]) for r in result.answered(1)] == [(str(fifo), 2)]


def test_a_name_with_a_nul_is_one_record_and_a_repeated_picture_is_counted(cli, shots, tiny_model):
    """A library caller's name holding a NUL character names no file: its record says so (no
    command line can pass one). A picture named twice is answered once, and the note counts it."""
    nul = f"{shots}/s0\0.png"
    result = granite_cli.caption([nul, shots / "s1.png"], model=str(tiny_model), max_new_tokens=3)
    assert [(r.source, r.error) for r in result.records] == [
        (nul, "a name with a NUL character names no file (EINVAL)"),
        (str(shots / "s1.png"), None),
    ]
    twice = cli("caption", str(shots / "s0.png"), str(shots / "s1.png"), str(shots / "s0.png"))
    assert len(twice.answered(2)) == 2
    assert "1 picture(s) named more than once: each is captioned once" in twice.stderr.splitlines()


def test_an_output_that_is_a_pipe_gets_every_record_in_utf8_then_its_end(cli, shots, tmp_path):
    """`-o fifo` read by another program: the records as UTF-8 whatever the locale says, then
    end of file when the run ends (the program reading it is not left waiting)."""
    import threading

    fifo = tmp_path / "records.pipe"
    os.mkfifo(fifo)
    picture = shots / "café.png"
    (shots / "s0.png").rename(picture)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    with c_locale(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        result = cli("caption", str(picture), "-o", str(fifo))
        gc.collect()
    reader.join(10)
    assert result.exit_code == 0 and not reader.is_alive(), result.stderr  # the reader saw the end
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]  # closed by the run, not by luck
    assert [json.loads(line)["source"] for line in received[0].decode("utf-8").splitlines()] == [str(picture)]


def test_the_library_closes_a_pipe_it_wrote_and_a_report_in_a_pipe_is_the_one_stdout_gets(
    shots, tiny_model, tmp_path, capfd
):
    """`granite_cli.caption(..., output="report.pipe")` in a process that goes on: the run closes
    the pipe itself (the reader sees the end; no "unclosed file" warning under `python -X dev`).
    A report written into a pipe is the one stdout gets: no links (where the pipe's reader puts
    it, links relative to the pipe mean nothing)."""
    import threading

    fifo = tmp_path / "report.pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    options = dict(model=str(tiny_model), max_new_tokens=3, format="markdown")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)  # as `python -X dev` shows them
        result = granite_cli.caption([str(shots / "s0.png")], output=str(fifo), **options)
        gc.collect()
    reader.join(10)
    assert not reader.is_alive() and result.answered == 1
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]  # closed by the run, not by luck
    granite_cli.caption([str(shots / "s0.png")], output="-", **options)
    assert received[0].decode("utf-8") == capfd.readouterr().out and "s0.png" in received[0].decode("utf-8")


def test_a_stdout_that_fails_is_named_stdout(shots, tiny_model, monkeypatch):
    """(Through the library, its stdout a full disk: the CLI's test runner keeps its own stdout.)"""
    from granite_cli.errors import OutputError

    full = open("/dev/full", "w")  # noqa: SIM115 (closed below, where its last flush fails too)
    monkeypatch.setattr(sys, "stdout", full)
    with pytest.raises(OutputError) as failed:
        granite_cli.caption([str(shots / "s0.png")], output="-", model=str(tiny_model), max_new_tokens=4)
    monkeypatch.undo()
    with contextlib.suppress(OSError):
        full.close()
    assert str(failed.value) == "stdout: No space left on device (ENOSPC)"


def test_an_output_device_that_fails_is_one_line_naming_it(cli, shots, monkeypatch):
    """At its first record (/dev/full), or at its end, when the last bytes are flushed."""
    result = cli("caption", str(shots / "s0.png"), "-o", "/dev/full")
    assert result.exit_code != 0 and one_error_line(result.stderr).startswith(
        "error: --output /dev/full: No space left on device"
    ), result.stderr
    from granite_cli.writers import JsonlWriter

    monkeypatch.setattr(JsonlWriter, "close", disk_full)
    result = cli("caption", str(shots / "s0.png"), "-o", "/dev/null")
    assert result.exit_code != 0 and one_error_line(result.stderr).startswith(
        "error: --output /dev/null: No space left on device"
    ), result.stderr


def test_a_sidecar_that_would_be_the_output_is_refused(cli, shots):
    result = cli("caption", str(shots), "--sidecar", ".jsonl", "-o", str(shots / "s0.jsonl"))
    assert result.exit_code == 2 and "the output (-o) and" in one_error_line(result.stderr)
    assert not (shots / "s0.jsonl").exists()
    os.mkfifo(shots / "s1.out")  # an output that is a pipe (nobody reads it: the run must refuse first)
    piped = cli("caption", str(shots / "s1.png"), "--sidecar", ".out", "-o", str(shots / "s1.out"))
    assert piped.exit_code == 2 and "the output (-o) and" in one_error_line(piped.stderr)


def test_a_sidecar_sits_beside_a_local_file_only(cli, http_root):
    base, _ = http_root
    result = cli("caption", f"{base}/remote.png", "--sidecar", ".txt")
    line = f"error: --sidecar: {base}/remote.png is not a local file, so nothing can sit beside it"
    assert result.exit_code == 2 and one_error_line(result.stderr) == line


def test_an_answer_that_failed_its_schema_writes_no_sidecar(cli, shots):
    """A structured answer cut short is an error with its raw text in the record: no sidecar
    holds it, so the next run answers that picture again."""
    result = cli("caption", str(shots / "s0.png"), "--sidecar", ".json", "--schema", "title", "--max-new-tokens", "2")
    record = result.records()[0]
    assert result.exit_code == 1 and record["error"] and record["answer"]
    assert not (shots / "s0.json").exists()


def test_an_answer_with_carriage_returns_is_not_taken_for_a_hand_edit(cli, shots, tmp_path):
    """Answers may hold Windows or old Mac line ends: a CSV or metadata.jsonl showing them as
    written is ours, and --resume goes on (twice), leaving it as it was."""
    for name, fmt in (("c.csv", "csv"), ("metadata.jsonl", "imagefolder")):
        report = tmp_path / name
        command = ("caption", str(shots / "s0.png"), "-o", str(report), "-f", fmt)
        assert cli(*command).exit_code == 0
        journal = tmp_path / f"{name}.jsonl"
        journal.write_text(json.dumps(json.loads(journal.read_text()) | {"answer": "one\r\ntwo\rthree\nfour"}) + "\n")
        report.unlink()
        assert cli(*command, "--resume").exit_code == 0  # rebuilt from the journal
        shown = report.read_bytes()
        assert b"one\r\ntwo\rthree\nfour" in shown or b"one\\r\\ntwo\\rthree\\nfour" in shown, shown
        for _ in range(2):
            again = cli(*command, "--resume")
            assert again.exit_code == 0 and report.read_bytes() == shown, again.stderr


def test_a_csv_is_ours_only_as_we_write_it_even_with_overwrite(cli, shots, tmp_path):
    """Our CSV of a PDF's pages resumes; tables that only look like ours (a header of another
    column, page numbers that are words, a field too long for a CSV reader) are someone's own:
    refused even with --overwrite, and left as they were."""
    pages = tmp_path / "pages.csv"
    make_pdf(tmp_path / "doc.pdf", 2)
    assert cli("caption", str(tmp_path / "doc.pdf"), "-o", str(pages)).exit_code == 0
    resumed = cli("caption", str(tmp_path / "doc.pdf"), "-o", str(pages), "--resume")
    assert resumed.exit_code == 0 and "2 answered before, 0 to run" in resumed.stderr
    ours = "source,page,prompt,answer,error\r\n"
    for theirs in (
        "source,page,prompt,answer,notes\r\na.png,,p,a cat,mine\r\n",
        "file,page,question,answer,error\r\na.png,,p,a cat,\r\n",
        ours + "a.png,two,p,a cat,\r\n",
        ours + "a.png,,p," + "x" * 200_000 + ",\r\n",
    ):
        table = tmp_path / "theirs.csv"
        table.write_text(theirs, newline="")
        result = cli("caption", str(shots / "s0.png"), "-o", str(table), "--overwrite")
        assert result.exit_code == 2 and "is not a granite-vision output" in one_error_line(result.stderr), theirs[:40]
        assert table.read_bytes() == theirs.encode()


def test_a_report_edited_by_hand_or_without_its_journal_is_not_replaced(cli, shots, tmp_path):
    report = tmp_path / "c.csv"
    assert cli("caption", str(shots / "s0.png"), str(shots / "s1.png"), "-o", str(report)).exit_code == 0
    edited = report.read_text().replace("Describe this image in detail.,", "Describe this image in detail.,MY FIX", 1)
    report.write_text(edited)
    resumed = cli("caption", str(shots), "-o", str(report), "--resume")
    row = next(line for line in edited.splitlines() if "MY FIX" in line)
    assert resumed.exit_code == 2 and one_error_line(resumed.stderr).startswith(
        f"error: --output {report}: a row was changed since granite-vision wrote it ({row[:57] + '...'!r})"
    )  # the edited row, cut short
    assert report.read_text() == edited
    latin = edited.encode().replace(b"MY FIX", b"MY CAF\xc9")  # edited again in a Latin-1 editor
    report.write_bytes(latin)
    resumed = cli("caption", str(shots), "-o", str(report), "--resume")
    assert resumed.exit_code == 2 and "a row was changed since granite-vision" in one_error_line(resumed.stderr)
    assert report.read_bytes() == latin
    forced = cli("caption", str(shots), "-o", str(report), "--resume", "--overwrite")  # "replace my edits"
    assert forced.exit_code == 0 and "MY" not in report.read_text()
    report.write_text(edited)
    (tmp_path / "c.csv.jsonl").unlink()
    for extra in ([], ["--resume"]):
        gone = cli("caption", str(shots), "-o", str(report), *extra)
        assert gone.exit_code == 2 and one_error_line(gone.stderr) == (
            f"error: --output {report}: shows records, but its journal c.csv.jsonl (what --resume reads) is gone;"
            " refusing to replace it. Hint: --overwrite starts it over, or move it away"
        )
    assert report.read_text() == edited
    started_over = cli("caption", str(shots / "s0.png"), "-o", str(report), "--overwrite")  # as the hint says
    assert started_over.exit_code == 0 and "MY FIX" not in report.read_text()
    for name in ("r.md", "r.html"):  # the reports people read: records are what they show
        report = tmp_path / name
        assert cli("caption", str(shots / "s0.png"), "-o", str(report)).exit_code == 0
        (tmp_path / f"{name}.jsonl").unlink()
        before = report.read_bytes()
        gone = cli("caption", str(shots), "-o", str(report))
        assert gone.exit_code == 2 and f"its journal {name}.jsonl (what --resume reads) is gone" in gone.stderr
        assert report.read_bytes() == before
    dataset = tmp_path / "metadata.jsonl"  # a dataset's captions, edited by hand: the user's now
    command = ("caption", str(shots / "s0.png"), "-f", "imagefolder", "-o", str(dataset))
    assert cli(*command).exit_code == 0
    dataset.write_text(dataset.read_text().replace('"text": "', '"text": "MY FIX ', 1))
    edited = dataset.read_text()
    resumed = cli(*command, "--resume")
    assert resumed.exit_code == 2 and "a row was changed since granite-vision wrote it" in resumed.stderr
    assert dataset.read_text() == edited
    failed = tmp_path / "failed.csv"  # a table of ours that shows no answer holds nothing to lose
    assert cli("caption", str(shots / "missing.png"), "-o", str(failed)).exit_code == 1
    (tmp_path / "failed.csv.jsonl").unlink(missing_ok=True)
    assert cli("caption", str(shots / "s0.png"), "-o", str(failed)).exit_code == 0
    assert "s0.png" in failed.read_text()


def test_empty_prompts_and_impossible_answer_lengths_are_usage_errors(cli, shots):
    for args in (("caption", str(shots), "--prompt", ""), ("ask", str(shots / "s0.png"), "  ")):
        result = cli(*args)
        assert result.exit_code == 2 and "empty (there is nothing to ask)" in one_error_line(result.stderr)
    long = cli("caption", str(shots), "--max-new-tokens", "100000")
    assert (long.exit_code, one_error_line(long.stderr)) == (
        2,
        "error: --max-new-tokens 100000: no picture can be answered that long (104 prompt tokens (36 of them for"
        " the picture) + --max-new-tokens 100000 exceed the model's context of 4,096 tokens)",
    )  # the smallest prompt there is, with the tiny model: the prompt's own tokens, the least image
    assert long.stdout == ""


def test_library_errors_speak_python(tiny_model, shots):
    model = {"model": str(tiny_model), "max_new_tokens": 3}
    with pytest.raises(UsageError, match=r"^max_new_tokens='3': expected a whole number"):
        granite_cli.caption([shots / "s0.png"], **(model | {"max_new_tokens": "3"}))
    with pytest.raises(UsageError, match=r"^caption\(\): no keyword 'max_new_token'"):
        granite_cli.caption([shots / "s0.png"], max_new_token=3)
    with pytest.raises(UsageError, match=r"takes the picture first, then the question: ask\("):
        granite_cli.ask("What is shown?", str(shots / "s0.png"), **model)
    with pytest.raises(UsageError) as nothing:
        granite_cli.caption([], **model)
    assert str(nothing.value) == "nothing to caption: no image or PDF found (no sources given)"
    for empty in ("e1", "e2"):
        (shots / empty).mkdir()
    with pytest.raises(UsageError) as nothing:
        granite_cli.caption([shots / "e1", str(shots / "e2")], **model)
    assert str(nothing.value) == f"nothing to caption: no image or PDF found ('{shots}/e1', '{shots}/e2')"
    pdf = make_pdf(shots / "doc.pdf", 3)
    assert [r.page for r in granite_cli.caption([pdf], pages=[1, 3], **model).records] == [1, 3]
    for sources, options, said in [
        (42, {}, "sources=42: expected a list of paths, folders, globs or URLs"),
        (
            [shots / "s0.png"],
            {"format": "xml"},
            "format='xml': expected one of jsonl|markdown|csv|imagefolder|html|openai-batch",
        ),
        ([shots / "s0.png"], {"cache": "Warm"}, "cache='warm': expected one of auto|dynamic|static"),
        ([shots / "s0.png"], {"pdf_renderer": "mupdf"}, "pdf_renderer='mupdf': expected one of pypdfium2|poppler"),
        ([shots / "s0.png"], {"dpi": 20}, "dpi=20: expected at least 36 and at most 1200"),
        ([shots / "s0.png"], {"dpi": 1201}, "dpi=1201: expected at least 36 and at most 1200"),
        ([shots / "s0.png"], {"max_tiles": 1}, "max_tiles=1: expected at least 2"),
        ([shots / "s0.png"], {"pages": [True, 3]}, "pages=[True, 3]: expected text or None"),
        ([shots / "s0.png"], {"format": "markdown", "output": "r.html"},
         "format markdown, but output r.html ends in .html, which is html; leave out format, or name the output *.md"),
    ]:  # fmt: skip
        with pytest.raises(UsageError) as refused:
            granite_cli.caption(sources, **options, **model)
        assert str(refused.value) == said


def test_the_library_takes_one_picture_or_an_output_path_as_python_gives_them(tiny_model, shots, tmp_path):
    """A single PIL image is one source, like a single path; an output may be a Path."""
    from PIL import Image

    model = {"model": str(tiny_model), "max_new_tokens": 3}
    with Image.open(shots / "s0.png") as picture:
        alone = granite_cli.caption(picture, **model)
    assert alone.total == 1 and alone.records[0].ok
    written = granite_cli.caption([shots / "s0.png"], output=tmp_path / "out.jsonl", **model)
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert [r.source for r in written.records] == [json.loads(line)["source"] for line in lines]


def test_the_library_takes_a_model_folder_as_a_path_and_the_bounds_themselves(tiny_model, shots):
    """`model=Path(...)` loads like the string and is recorded as the string; a value at a bound
    (dpi=1200, max_tiles=2) is allowed, only beyond it refused."""
    from pathlib import Path

    result = granite_cli.caption([shots / "s0.png"], model=Path(tiny_model), max_new_tokens=3, dpi=1200, max_tiles=2)
    assert result.exit_code == 0 and result.records[0].model == str(tiny_model)
    assert type(result.records[0].model) is str and json.loads(result.records[0].to_json())["model"] == str(tiny_model)


# --------------------------------------------------------------------------- found by generated mutants
def test_records_of_an_earlier_version_resume(cli, shots, tmp_path):
    """Records written before `settings` existed (and hand-made ones without token counts) are
    answers like any other: resumed, not run again, never a crash."""
    out = tmp_path / "old.jsonl"
    assert cli("caption", str(shots / "s0.png"), str(shots / "s1.png"), "-o", str(out)).exit_code == 0
    rows = read_jsonl(out)
    del rows[0]["settings"], rows[1]["settings"]
    rows[1]["answer_tokens"] = rows[1]["finish_reason"] = None
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    resumed = cli("caption", str(shots), "-o", str(out), "--resume")
    assert resumed.exit_code == 0 and "2 answered before, 2 to run" in resumed.stderr, resumed.stderr
    assert [r["answer"] for r in read_jsonl(out)][:2] == [rows[0]["answer"], rows[1]["answer"]]


def test_records_of_an_earlier_version_still_refuse_other_settings(cli, shots, tmp_path):
    """A setting the record predates is taken as its default; the settings it does have are
    still compared, every one of them."""
    out = tmp_path / "old.jsonl"
    assert cli("caption", str(shots / "s0.png"), "-o", str(out)).exit_code == 0
    row = read_jsonl(out)[0]
    del row["settings"]["revision"]  # written before --revision was recorded
    out.write_text(json.dumps(row) + "\n")
    refused = cli("caption", str(shots / "s0.png"), "-o", str(out), "--resume", "--dpi", "72")
    assert refused.exit_code == 2 and "another --dpi (144; this run: 72)" in one_error_line(refused.stderr)
    resumed = cli("caption", str(shots / "s0.png"), "-o", str(out), "--resume")
    assert resumed.exit_code == 0 and "1 answered before, 0 to run" in resumed.stderr, resumed.stderr


def test_an_answer_run_again_that_now_fails_stays_and_resume_follows_the_new_input_order(cli, tmp_path):
    """A cut answer is run again under a larger --max-new-tokens; if the picture now fails, its
    earlier answer is kept (a failure never replaces an answer). The output follows this run's
    input order, whatever order the earlier run wrote."""
    a, b, out = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "out.jsonl"
    noise(40, 40, 1).save(a)
    noise(48, 40, 2).save(b)
    assert cli("caption", str(b), "-o", str(out), "--max-new-tokens", "1").exit_code == 0
    [earlier] = read_jsonl(out)
    assert earlier["finish_reason"] == "length"
    with open(b, "r+b") as handle:  # the same file, no longer a picture
        handle.write(b"not a picture any more")
    again = cli("caption", str(a), str(b), "-o", str(out), "--resume", "--max-new-tokens", "2")
    assert again.exit_code == 1 and "(1 cut by another --max-new-tokens: run again)" in again.stderr, again.stderr
    rows = read_jsonl(out)
    assert [r["source"] for r in rows] == [str(a), str(b)]
    assert rows[0]["answer"] is not None and rows[1] == earlier


def test_resume_takes_the_part_files_a_dead_run_left_and_says_the_journal_was_torn(cli, shots, tmp_path):
    """A run of several processes died before merging: --resume reads the journal and every
    part file, a torn last line in any of them is dropped (and said), nothing is run twice."""
    out = tmp_path / "out.jsonl"
    s0, s1, s2, s3 = (str(shots / f"s{i}.png") for i in range(4))
    assert cli("caption", s0, s1, "-o", str(out)).exit_code == 0
    rows = read_jsonl(out)
    parts = tmp_path / "out.jsonl.parts"
    parts.mkdir()
    (parts / "rank-00001-of-00002-dead.jsonl").write_text(json.dumps(rows[1] | {"source": s2}) + "\n")
    with open(out, "a") as handle:
        handle.write('{"source": "' + s3 + '", "page": nu')  # killed while writing
    resumed = cli("caption", s0, s1, s2, s3, "-o", str(out), "--resume")
    said = next(line for line in resumed.stderr.splitlines() if line.startswith("resuming "))
    assert said == f"resuming {out}: 3 answered before, 1 to run (a torn last line was dropped)", resumed.stderr
    assert [r["source"] for r in read_jsonl(out)] == [s0, s1, s2, s3] and not parts.exists()


def test_a_jsonl_output_is_ours_only_if_every_whole_line_is_a_record(cli, shots, tmp_path):
    """A record then a line of notes, notes then a record, one line of notes without a newline:
    someone's file, refused even with --overwrite. One record cut short by a crash is ours."""
    out = tmp_path / "out.jsonl"
    assert cli("caption", str(shots / "s0.png"), "-o", str(out)).exit_code == 0
    good = out.read_text()
    for theirs in (good + "my notes\n", "my notes\n" + good, "my notes"):
        out.write_text(theirs)
        refused = cli("caption", str(shots / "s0.png"), "-o", str(out), "--overwrite")
        assert refused.exit_code == 2 and "is not a granite-vision output" in one_error_line(refused.stderr), theirs
        assert out.read_text() == theirs
    out.write_text(good[:30])  # the first record, torn
    resumed = cli("caption", str(shots / "s0.png"), "-o", str(out), "--resume")
    assert resumed.exit_code == 0 and "0 answered before, 1 to run (a torn last line was dropped)" in resumed.stderr
    assert [Path(row["source"]).name for row in read_jsonl(out)] == ["s0.png"]


def test_a_journal_line_that_is_not_ours_stops_the_reading_naming_the_file_and_line(tmp_path):
    """(The library's reader of a run's records; the CLI refuses such a file even earlier.)"""
    from granite_cli.journal import read_records

    journal = tmp_path / "out.jsonl"
    good = granite_cli.Record("a.png", None, "p", "an answer", None, "m").to_json()
    journal.write_text(f'{good}\n\n{good}\n{{"not": "ours"}}\n{good}\n')
    with pytest.raises(UsageError) as refused:
        read_records(journal)
    assert str(refused.value) == f"{journal}: line 4 is not a granite-vision record; not touching it"
    journal.write_text(f'{good}\n{{"not": "ours"}}\n')  # the last line, whole: someone's, not torn
    with pytest.raises(UsageError) as refused:
        read_records(journal)
    assert str(refused.value) == f"{journal}: line 2 is not a granite-vision record; not touching it"
    journal.write_text(f'{good}\n{{"source": "b.png", "pa')  # cut short, no newline after it: torn
    assert read_records(journal) == ([granite_cli.Record.from_json(good)], True)


def test_a_second_writer_of_an_output_waits_says_so_and_then_writes(tmp_path):
    import threading

    from granite_cli.journal import OutputLock

    out = tmp_path / "out.jsonl"
    first, second, said = OutputLock(out), OutputLock(out), []
    first.acquire(said.append, "--output out.jsonl")
    waiter = threading.Thread(target=second.acquire, args=(said.append, "--output out.jsonl"), daemon=True)
    waiter.start()
    try:
        waiter.join(0.5)
        waiting = "--output out.jsonl: another granite-vision run is writing it; waiting for it to finish"
        assert waiter.is_alive() and said == [waiting]
    finally:
        first.release()
    waiter.join(10)
    assert not waiter.is_alive() and second.fd is not None and second.path.exists()
    second.release()
    second.release()  # (twice: harmless)
    assert not second.path.exists() and list(tmp_path.iterdir()) == []
    first.acquire(said.append, "again")  # and the output can be written again
    first.path.unlink()  # (someone removed the lock file meanwhile)
    first.release()
    assert len(said) == 1


def test_a_file_is_replaced_through_a_hidden_temp_file_beside_it(tmp_path, monkeypatch):
    """Beside it: the rename is atomic only on the same file system; hidden and named after it,
    so one left by a crash is recognisably ours."""
    from granite_cli import journal

    renames = []
    real = os.replace
    monkeypatch.setattr(journal.os, "replace", lambda a, b: (renames.append((Path(a), Path(b))), real(a, b)))
    report = tmp_path / "report.md"
    journal.write_atomic(report, "# granite-vision report\n")
    [(temp, target)] = renames
    assert target == report and temp.parent == tmp_path
    assert temp.name.startswith(".report.md.") and temp.name.endswith(".tmp")


def test_a_temp_name_already_taken_is_never_written_over(tmp_path, monkeypatch):
    """Whoever holds the name drawn for a temp file (a file of the same pattern, made by anyone)
    keeps it: another name is drawn."""
    from granite_cli import journal

    drawn = iter(["c0ffee00", "c0ffee00", "facade00"])
    monkeypatch.setattr(journal.secrets, "token_hex", lambda nbytes=None: next(drawn))
    (tmp_path / ".report.md.c0ffee00.tmp").write_text("someone's")
    journal.write_atomic(tmp_path / "report.md", "# granite-vision report\n")
    assert (tmp_path / ".report.md.c0ffee00.tmp").read_text() == "someone's"
    assert (tmp_path / "report.md").read_text() == "# granite-vision report\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == [".report.md.c0ffee00.tmp", "report.md"]


def test_outputs_are_utf8_whatever_the_locale_says(tmp_path):
    """Under a C (ASCII) locale too: a report of names and answers in any script is UTF-8."""

    from granite_cli import journal

    text = "# granite-vision report\n\nCafé — 東京 — Ωμέγα\n"
    with c_locale():
        journal.write_atomic(tmp_path / "report.md", text)
    assert (tmp_path / "report.md").read_bytes() == text.encode("utf-8")


def test_jsonl_keeps_every_script_as_it_is_so_grep_finds_it(tmp_path):
    from granite_cli import output

    sink = output.FileOutput(tmp_path / "out.jsonl", "jsonl", resume=False)
    sink.write(granite_cli.Record("東京/café.png", None, "Décris", "Un café à Tōkyō", None, "m"))
    sink.finish([])
    line = (tmp_path / "out.jsonl").read_text(encoding="utf-8")
    assert '"source": "東京/café.png"' in line and '"answer": "Un café à Tōkyō"' in line


def test_an_answer_that_ended_exactly_at_the_new_limit_stands(cli, shots, tmp_path):
    out = tmp_path / "out.jsonl"
    assert cli("caption", str(shots / "s0.png"), "-o", str(out), "--max-new-tokens", "8").exit_code == 0
    row = read_jsonl(out)[0] | {"answer_tokens": 5, "finish_reason": "stop"}  # it ended by itself at 5
    out.write_text(json.dumps(row) + "\n")
    for limit, said in (("5", "1 answered before, 0 to run"), ("4", "0 answered before, 1 to run")):
        result = cli("caption", str(shots / "s0.png"), "-o", str(out), "--resume", "--max-new-tokens", limit)
        assert result.exit_code == 0 and said in result.stderr, (limit, result.stderr)
        out.write_text(json.dumps(row) + "\n")


def test_resume_says_what_differs_both_ways_and_briefly(cli, shots, tmp_path):
    out = tmp_path / "out.jsonl"
    long = "Describe this picture, every object in it, its colours, its light and its mood, in one paragraph."
    assert cli("caption", str(shots / "s0.png"), "-o", str(out), "--prompt", long).exit_code == 0
    for args, said in [
        (["--prompt", "Short?"], f"another prompt ({long[:57] + '...'!r}; this run: 'Short?')"),
        (["--prompt", long, "--dpi", "72"], "another --dpi (144; this run: 72)"),
        (["--prompt", long, "--schema", "a"], "another schema (none; this run: 'sha256:"),
    ]:
        result = cli("caption", str(shots / "s0.png"), "-o", str(out), "--resume", *args)
        line = one_error_line(result.stderr)
        assert result.exit_code == 2 and line.startswith(f"error: --resume: {out} holds records made with {said}")
        assert line.endswith(". Hint: resume with the same options, or write to another --output"), line


@pytest.fixture
def commands(monkeypatch):
    """The CLI module, its "interrupted" flag fresh for this test (it is set once per process:
    a test that interrupts must not leave the next run interrupted)."""
    import threading

    from granite_cli import cli

    monkeypatch.setattr(cli, "INTERRUPTED", threading.Event())
    return cli


def test_ctrl_c_that_a_library_turns_into_its_own_error_is_still_an_interruption(
    cli, shots, monkeypatch, tmp_path, commands
):
    """transformers' lazy imports re-raise a KeyboardInterrupt as ModuleNotFoundError: a Ctrl-C
    while the model loads must still end as one, exit 130, the output untouched."""

    def load(*args, **kwargs):
        try:
            commands.interrupt()
        except KeyboardInterrupt:
            raise ModuleNotFoundError("Could not import module 'AutoProcessor'") from None

    monkeypatch.setattr("granite_cli.engine.load_engine", load)
    out = tmp_path / "out.jsonl"
    result = cli("caption", str(shots / "s0.png"), "-o", str(out))
    assert result.exit_code == 130 and result.stderr.strip().endswith("interrupted") and not out.exists()


def test_ctrl_c_while_the_model_loads_with_records_going_to_stdout_ends_as_an_interruption(
    cli, shots, monkeypatch, commands
):
    """Nothing was written to stdout yet: the run ends as interrupted (130), stdout empty."""

    monkeypatch.setattr("granite_cli.engine.load_engine", lambda *args, **kwargs: commands.interrupt())
    result = cli("caption", str(shots / "s0.png"))
    assert (result.exit_code, result.stdout) == (130, "") and result.stderr.strip().endswith("interrupted")


def test_a_real_ctrl_c_while_the_model_loads_stops_at_once(cli, shots, monkeypatch, tmp_path, commands):
    """A SIGINT delivered while the model loads (the signal handler itself, not a simulation):
    nothing runs yet, so the run stops at once (exit 130, "interrupted"), without waiting for
    the load to end and without the "stopping after the current batch" of a running run."""
    import signal
    import time

    def load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # a load that takes a while: the Ctrl-C must not wait for it
        raise AssertionError("the Ctrl-C waited for the model to load")

    monkeypatch.setattr("granite_cli.engine.load_engine", load)
    out = tmp_path / "out.jsonl"
    result = cli("caption", str(shots / "s0.png"), "-o", str(out))
    assert result.exit_code == 130 and result.stderr.strip().endswith("interrupted"), result.stderr
    assert "current batch" not in result.stderr and not out.exists()


def test_a_ctrl_c_during_the_last_batch_ends_a_complete_run_in_its_own_time(
    cli, shots, monkeypatch, tmp_path, commands
):
    """The first Ctrl-C (a real SIGINT) while the last batch runs: the batch finishes, and since
    nothing is left, the run is complete: not "interrupted", no exit 130, its exit code that of
    its failure (a missing file). The summary's time is the run's own (at most its wall time)."""
    import re
    import signal

    from granite_cli.engine import hf

    real = hf.HfEngine.run

    def run(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # handled before the batch goes on: "after the current batch"
        return real(self, *args, **kwargs)

    monkeypatch.setattr(hf.HfEngine, "run", run)
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    result = cli("caption", str(shots / "s0.png"), str(shots / "gone.png"), "-o", str(out))
    wall = time.monotonic() - started
    assert result.exit_code == 1 and "interrupted" not in result.stderr, result.stderr
    assert "stopping after the current batch" in result.stderr and len(read_jsonl(out)) == 2
    seconds = float(re.search(r"1 of 2 answered, 1 failed in ([0-9.]+) s", result.stderr)[1])
    assert seconds <= wall + 0.05


def test_a_second_ctrl_c_once_every_record_is_written_still_ends_a_complete_run(tiny_model, tmp_path):
    """A second Ctrl-C that lands after the last record was written (here: while it is being
    shown) stops nothing that was left: the result is complete, not "stopped", and both records
    (an answer and a missing file's failure) are in the output."""
    import contextlib

    from granite_cli.api import CaptionJob, run_caption
    from granite_cli.ui import Reporter

    class SecondCtrlC(Reporter):
        @contextlib.contextmanager
        def progress(self, total):
            seen = []

            def shown(record):
                seen.append(record)
                if len(seen) == total:
                    raise KeyboardInterrupt

            yield shown

    noise(40, 30).save(tmp_path / "a.png")
    out = tmp_path / "out.jsonl"
    job = CaptionJob(sources=[str(tmp_path / "a.png"), str(tmp_path / "gone.png")], output=str(out),
                     model=str(tiny_model), device="cpu", max_new_tokens=2)  # fmt: skip
    result = run_caption(job, reporter=SecondCtrlC(quiet=True))
    assert (result.stopped, result.answered, result.failed, len(read_jsonl(out))) == (False, 1, 1, 2)


def test_a_caption_run_whose_output_another_run_holds_says_it_waits_then_writes(cli, shots, tmp_path):
    import threading

    from granite_cli.journal import OutputLock

    out = tmp_path / "out.jsonl"
    other = OutputLock(out)
    other.acquire(lambda text: None, "other")
    threading.Timer(1.0, other.release).start()  # the other run ends a second later
    result = cli("caption", str(shots / "s0.png"), "-o", str(out))
    assert result.exit_code == 0 and len(read_jsonl(out)) == 1
    assert f"--output {out}: another granite-vision run is writing it; waiting for it to finish" in result.stderr


def test_a_caption_run_says_a_revision_for_a_local_folder_is_ignored(cli, shots, tiny_model):
    result = cli("caption", str(shots / "s0.png"), "--revision", "v2")
    assert result.exit_code == 0 and len(result.records()) == 1
    assert f"warning: --revision v2 is ignored: {tiny_model} is a local folder" in result.stderr.splitlines()


def test_a_second_ctrl_c_mid_batch_stops_at_once_keeping_the_finished_batches(cli, shots, monkeypatch, tmp_path):
    """The second Ctrl-C (a KeyboardInterrupt while a batch runs): the run ends at once as
    interrupted, exit 130, the batches finished before it written, and --resume takes the rest."""
    from granite_cli.engine import hf

    real, calls = hf.HfEngine.run, []

    def run(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(hf.HfEngine, "run", run)
    out = tmp_path / "out.jsonl"
    result = cli("caption", str(shots), "-o", str(out), "--batch-size", "2")
    assert result.exit_code == 130 and "interrupted: 2 of 4 answered" in result.stderr, result.stderr
    first = read_jsonl(out)
    assert len(first) == 2 and all(r["answer"] is not None for r in first)  # one batch (by size)
    resumed = cli("caption", str(shots), "-o", str(out), "--batch-size", "2", "--resume")
    assert resumed.exit_code == 0 and "2 answered before, 2 to run" in resumed.stderr
    assert sorted(Path(r["source"]).name for r in read_jsonl(out)) == ["s0.png", "s1.png", "s2.png", "s3.png"]


def test_ctrl_c_before_any_command_runs_is_the_same_interruption(cli, monkeypatch):
    """A Ctrl-C while the command line is still being read (the group's own set-up, before any
    command's body): not click's "Aborted!" and exit 1, but ours: "interrupted", exit 130."""
    from granite_cli import cli as commands

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "_configure_process", interrupted)
    result = cli("info")
    assert (result.exit_code, result.stdout, result.stderr.strip()) == (130, "", "interrupted")


def test_a_stream_output_that_fails_before_its_first_record_is_abandoned_quietly(tmp_path):
    """A run that fails before writing anything to stdout or a named pipe: abandoning the output
    closes nothing it did not open (the original error is what the user sees)."""
    from granite_cli.streamoutput import NoOutput, StreamOutput

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for sink in (StreamOutput(None, "jsonl", (), "stdout"), StreamOutput(str(fifo), "csv", (), "pipe"), NoOutput()):
        sink.abandon()
        sink.close()
        assert sink.finish([]) == [] and sink.stream is None


def test_the_library_without_an_output_returns_the_records_and_prints_nothing(tiny_model, shots, capfd):
    """`granite_cli.caption(...)` with no `output`: the records are the result; stdout stays the caller's."""
    result = granite_cli.caption(
        [str(shots / "s0.png"), str(shots / "s1.png")], model=str(tiny_model), max_new_tokens=2
    )
    assert [Path(r.source).name for r in result.records] == ["s0.png", "s1.png"]
    assert capfd.readouterr() == ("", "")  # nor stderr: no progress, no summary (the caller reports)


def test_the_library_does_not_replace_an_earlier_output_unless_asked(cli, tmp_path, shots):
    """`open_output` as a library caller gets it: an output with records is neither resumed nor
    replaced by default (the CLI passes --overwrite explicitly)."""
    from granite_cli.output import open_output
    from granite_cli.sources import Item

    out = tmp_path / "out.jsonl"
    item = Item(str(shots / "s0.png"))
    assert cli("caption", item.source, "-o", str(out)).exit_code == 0
    sink = open_output(str(out), "jsonl", False)
    with pytest.raises(UsageError) as refused:
        sink.check([item])
        sink.plan([item], None)
    sink.release()
    assert "--resume" in str(refused.value) and "--overwrite" in str(refused.value)


# --------------------------------------------------------------------------- outputs that cannot be one
def test_files_beside_the_output_that_are_in_the_way_are_refused_by_name(cli, shots, tmp_path):
    """The output's lock, its folder of part files and its journal are the run's own names: where
    something else holds one, the run refuses in one line naming it, and writes nothing."""
    picture = str(shots / "s0.png")
    out = tmp_path / "out.jsonl"
    (tmp_path / ".out.jsonl.lock").mkdir()
    result = cli("caption", picture, "-o", str(out))
    assert one_error_line(result.stderr) == f"error: --output {out}: cannot lock it (Is a directory)"
    (tmp_path / ".out.jsonl.lock").rmdir()
    (tmp_path / "out.jsonl.parts").write_text("mine")
    result = cli("caption", picture, "-o", str(out))
    parts = tmp_path / "out.jsonl.parts"
    assert one_error_line(result.stderr) == (
        f"error: --output {out}: {parts} is not a folder of part files; refusing to touch it"
    )
    parts.unlink()
    report = tmp_path / "out.md"
    (tmp_path / "out.md.jsonl").symlink_to("out.md.jsonl")  # a loop: stat fails, not "missing"
    result = cli("caption", picture, "-o", str(report), "-f", "markdown")
    assert one_error_line(result.stderr) == f"error: --output {report}: Too many levels of symbolic links"
    assert result.exit_code == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["out.md.jsonl", "shots"]


def test_an_imagefolder_dataset_streamed_to_a_named_pipe_is_checked_like_a_file(cli, shots, tmp_path):
    """`-o DIR/metadata.jsonl` being a FIFO: the pictures must still be inside DIR (the loader
    reads the folder), and the records flow through the pipe."""
    import threading

    data = tmp_path / "data"
    data.mkdir()
    noise(24, 24).save(data / "cat.png")
    fifo = data / "metadata.jsonl"
    os.mkfifo(fifo)
    outside = cli("caption", str(shots / "s0.png"), "-f", "imagefolder", "-o", str(fifo))
    assert one_error_line(outside.stderr) == (
        f"error: --format imagefolder: {shots / 's0.png'} is not a file inside {data}, the dataset folder"
    )
    read = []
    reader = threading.Thread(target=lambda: read.append(fifo.read_text()), daemon=True)
    reader.start()
    result = cli("caption", str(data / "cat.png"), "-f", "imagefolder", "-o", str(fifo))
    reader.join(timeout=60)
    assert result.exit_code == 0 and [json.loads(line)["file_name"] for line in read[0].splitlines()] == ["cat.png"]


def test_an_output_that_cannot_hold_the_run_is_refused_in_one_line(cli, shots, tmp_path, monkeypatch):
    """Each refusal names the output and the reason, before the model loads; nothing is written."""
    picture = str(shots / "s0.png")
    folder = tmp_path / "reports"
    folder.mkdir()
    resume = "--resume needs --output FILE: the file whose finished items are skipped"
    cases = [
        (["-o", "-", "--resume"], f"error: {resume}"),
        (["--resume"], f"error: {resume}"),
        (["-o", str(folder)], f"error: --output {folder}: is a directory"),
        (
            ["-o", "/dev/null", "--resume"],
            "error: --output /dev/null: not a regular file; --resume and several processes need one",
        ),
        (["-o", f"{picture}/out.jsonl"], f"error: --output {picture}/out.jsonl: Not a directory"),
    ]
    before = tree_hashes(tmp_path)
    for args, line in cases:
        result = cli("caption", picture, *args)
        assert (result.exit_code, one_error_line(result.stderr), result.stdout) == (2, line, ""), args
    assert tree_hashes(tmp_path) == before
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)  # a device we may not write (as root, none)
    result = cli("caption", picture, "-o", "/dev/null")
    assert one_error_line(result.stderr) == "error: --output /dev/null: cannot write there (permission denied)"


def test_a_run_of_several_processes_needs_a_file_of_its_own(tmp_path):
    """Processes of one run meet in part files beside a regular file: a stream cannot hold them."""
    from granite_cli.distributed import Ranks
    from granite_cli.output import open_output

    several = "a run of several processes needs --output FILE, on a filesystem all of them share"
    for name, message in (
        (None, several),
        ("-", several),
        ("/dev/null", "--output /dev/null: not a regular file; --resume and several processes need one"),
    ):
        with pytest.raises(UsageError) as refused:
            open_output(name, "jsonl", False, ranks=Ranks(1, 2))
        assert str(refused.value) == message


def test_each_process_of_a_run_writes_its_own_part_and_rank_0_merges_them(tmp_path, shots):
    """Through `open_output`, as the CLI opens it: each process appends to its own part file,
    named with the run's id; every process waits at the barrier; rank 0 merges the parts into
    the report, with the schema's columns, and removes them."""
    from granite_cli.distributed import Ranks
    from granite_cli.output import open_output
    from granite_cli.records import Record
    from granite_cli.sources import Item

    out = tmp_path / "out.csv"
    waited = []
    sinks = [
        open_output(
            str(out), "csv", False, ranks=Ranks(rank, 2, barrier=lambda r=rank: waited.append(r)),
            columns=["title"], run_id="r7",
        )
        for rank in (0, 1)
    ]  # fmt: skip
    items = [Item(str(shots / "s0.png")), Item(str(shots / "s1.png"))]
    for sink in sinks:
        sink.check(items)
        sink.plan(items, None)
    for rank, sink in enumerate(sinks):
        answer = json.dumps({"title": f"t{rank}"})
        sink.write(Record(items[rank].source, None, "Describe", answer, None, "m", data={"title": f"t{rank}"}))
    parts = tmp_path / "out.csv.jsonl.parts"
    assert sorted(p.name for p in parts.iterdir()) == ["rank-00000-of-00002-r7.jsonl", "rank-00001-of-00002-r7.jsonl"]
    assert sinks[1].finish(items) == []
    merged = sinks[0].finish(items)
    assert [r.source for r in merged] == [item.source for item in items] and waited == [1, 0]
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [(row["source"], row["title"]) for row in rows] == [(items[0].source, "t0"), (items[1].source, "t1")]
    assert not parts.exists()


def test_a_second_run_on_the_same_output_says_it_waits_for_the_first(tmp_path, shots):
    from granite_cli.output import open_output
    from granite_cli.sources import Item

    out, items = tmp_path / "out.jsonl", [Item(str(shots / "s0.png"))]
    first = open_output(str(out), "jsonl", False)
    first.check(items)
    said = []

    def notify(text: str) -> None:  # the first run finishes while the second waits
        said.append(text)
        first.release()

    second = open_output(str(out), "jsonl", False, notify=notify)
    second.check(items)
    second.release()
    assert said == [f"--output {out}: another granite-vision run is writing it; waiting for it to finish"]


def test_a_stream_named_by_o_gets_the_schemas_columns(cli, shots, tmp_path):
    """`-o FIFO -f csv --schema ...`: the header and the rows hold the schema's fields, as on stdout."""
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    read = []
    reader = threading.Thread(target=lambda: read.append(fifo.read_text()), daemon=True)  # never holds up exit
    reader.start()
    cli("caption", str(shots / "s0.png"), "-o", str(fifo), "-f", "csv", "--schema", "title, pages:integer")
    reader.join(timeout=60)
    header = read[0].splitlines()[0].split(",")
    assert header == ["source", "page", "prompt", "answer", "title", "pages", "error"], read


def test_the_refusal_of_a_hand_edited_report_quotes_the_row_and_says_what_to_do(cli, shots, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("caption", "shots/s0.png", "-o", "c.csv").exit_code == 0
    text = Path("c.csv").read_text()
    edited = text.replace(",Describe this image in detail.,", ",Describe this image in detail.,MY FIX ", 1)
    Path("c.csv").write_text(edited)
    resumed = cli("caption", "shots/s0.png", "-o", "c.csv", "--resume")
    line = one_error_line(resumed.stderr)
    assert line.startswith("error: --output c.csv: a row was changed since granite-vision wrote it ('shots/s0.png,,")
    assert line.endswith(
        "'); refusing to replace hand edits."
        " Hint: move it away (--resume then rebuilds it from its journal), or --overwrite"
    )
