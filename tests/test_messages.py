"""What a user reads on stderr, word for word: the one line a failed item gets (and its record
carries), the notes on what resolving the inputs left out, the closing summary (interrupted or
not, one process or several), and the one line a failed output gets."""

from __future__ import annotations

import errno
import json
import os
import re
import sys

import pytest
from helpers import noise
from rich.text import Text

from granite_cli import ui
from granite_cli.api import CaptionResult
from granite_cli.errors import InputError, OutputError, describe
from granite_cli.records import Record
from granite_cli.sources import Resolution
from granite_cli.ui import Reporter


def said(action) -> list[str]:
    """The lines `action` prints on the tool's stderr console, as a user reads them (no colours)."""
    with ui.console.capture() as captured:
        action()
    return Text.from_ansi(captured.get()).plain.splitlines()


def failed(source: str, error: str, page: int | None = None) -> Record:
    return Record(source, page, "Describe", None, error, "m")


def answered(source: str) -> Record:
    return Record(source, None, "Describe", "an answer", None, "m")


# --------------------------------------------------------------------------- one line per failed item
LONG = "word " * 80  # 400 characters


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (
            InputError("corrupt or truncated image (broken data stream)"),
            "corrupt or truncated image (broken data stream)",
        ),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "a.png"), "no such file"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "photos"), "is a directory"),
        (PermissionError(errno.EACCES, "Permission denied", "a.png"), "permission denied"),
        (MemoryError(), "out of memory"),
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device (ENOSPC)"),
        (OSError(errno.EIO, "the card reader went away"), "the card reader went away (EIO)"),  # the library's words
        (OSError(9999, ""), "Unknown error 9999 (9999)"),  # an errno this system has no name for
        (RuntimeError("decoder said:\n\tbad   header"), "RuntimeError: decoder said: bad header"),
        (RuntimeError(), "RuntimeError: RuntimeError"),  # no message: its kind at least
        (ValueError("x" * 300), "ValueError: " + "x" * 300),  # up to 300 characters: whole
        (ValueError("x" * 301), "ValueError: " + "x" * 297 + "..."),
        (ValueError(LONG), "ValueError: " + LONG[:297] + "..."),
    ],
)
def test_an_items_failure_is_one_line_in_the_words_a_user_knows(exc, line):
    assert describe(exc) == line


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "--output out.jsonl: No space left on device (ENOSPC)"),
        (OSError("the share went offline"), "--output out.jsonl: the share went offline"),  # no errno
        (OSError(), "--output out.jsonl: OSError"),
        (OSError("x" * 200), "--output out.jsonl: " + "x" * 200),  # up to 200 characters: whole
        (OSError("x" * 201), "--output out.jsonl: " + "x" * 197 + "..."),
    ],
)
def test_a_failed_output_is_one_line_naming_it(error, line):
    assert str(OutputError("--output out.jsonl", error)) == line


def test_a_failed_items_line_on_stderr_is_its_records_error_after_its_name(cli, tmp_path):
    r"""Names are shown as they are (a backslash stays one backslash), with the reason the record
    carries; an OS error the tool has no words of its own for keeps the system's, and its name."""
    noise(30, 30).save(tmp_path / "good.png")
    (tmp_path / "back\\slash.png").write_bytes((tmp_path / "good.png").read_bytes()[:100])  # truncated
    not_a_folder = tmp_path / "good.png" / "inside.png"
    result = cli("caption", str(tmp_path / "back\\slash.png"), str(not_a_folder), str(tmp_path / "good.png"))
    assert result.exit_code == 1
    records = result.records()
    assert records[1]["error"] == "Not a directory (ENOTDIR)"
    assert records[0]["error"] == "corrupt or truncated image (image file is truncated)"  # PIL's reason, kept
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {tmp_path}/back\\slash.png: {records[0]['error']}",
        f"error: {not_a_folder}: Not a directory (ENOTDIR)",
    ]


@pytest.mark.parametrize(
    ("record", "line"),
    [
        (failed("a.png", "no such file"), "error: a.png: no such file"),
        (
            failed("doc.pdf", "page 2 could not be rendered (bad xref)", page=2),
            "error: doc.pdf (page 2): page 2 could not be rendered (bad xref)",
        ),
        (failed("new\nline.png", "no such file"), "error: new\\nline.png: no such file"),  # one message, one line
        (failed("[bold]a.png", "not [an] image"), "error: [bold]a.png: not [an] image"),  # brackets are text
        (failed(r"C:\scans\a.png", ""), "error: C:\\scans\\a.png: "),  # an empty reason stays empty
    ],
)
def test_each_failed_item_gets_one_line_and_answered_ones_none(record, line):
    reporter = Reporter()

    def run() -> None:
        with reporter.progress(2) as done:
            done(answered("fine.png"))
            done(record)

    assert said(run) == [line]
    assert reporter.errors == 1


# --------------------------------------------------------------------------- what resolving left out
RESOLUTION = Resolution(
    unsupported={(1, 1): "photos/a.heic", (1, 2): "photos/new\nline.djvu"},
    special=1,
    unmatched=["scans/*.tif"],
    duplicates=3,
)
NOTES = [
    "warning: scans/*.tif: matched no supported file",
    "skipped 2 file(s) of unsupported type inside folders (--verbose lists them)",
    "skipped 1 pipe(s), socket(s) or device(s) met in folders or globs",
    "3 picture(s) named more than once: each is captioned once",
]


def test_what_resolving_left_out_is_one_line_each_and_the_skipped_files_are_listed_only_when_asked():
    assert said(lambda: Reporter().resolution(RESOLUTION)) == NOTES
    assert said(lambda: Reporter().resolution(RESOLUTION, verbose=False)) == NOTES
    assert said(lambda: Reporter().resolution(RESOLUTION, verbose=True)) == [
        NOTES[0],
        "skipped 2 file(s) of unsupported type inside folders",
        "  skipped: photos/a.heic",
        "  skipped: photos/new\\nline.djvu",
        *NOTES[2:],
    ]


@pytest.mark.parametrize("reporter", [Reporter(quiet=True), Reporter(rank=1, world=2)], ids=["library", "rank 1"])
def test_a_library_caller_and_every_process_but_the_first_say_nothing_of_the_inputs(reporter):
    assert said(lambda: reporter.resolution(RESOLUTION, verbose=True)) == []
    assert said(lambda: reporter.warn("a warning")) == []
    assert said(lambda: reporter.note("a note")) == []
    assert said(lambda: Reporter(rank=0, world=2).warn("a warning")) == ["warning: a warning"]


# --------------------------------------------------------------------------- the closing summary
@pytest.mark.parametrize(
    ("stats", "seconds", "output", "line"),
    [
        (CaptionResult(4, 3, 1), 0.5, "out.jsonl", "3 of 4 answered, 1 failed in 0.5 s (8.00 items/s) -> out.jsonl"),
        (CaptionResult(6, 6, 0), 2.0, "-", "6 of 6 answered in 2.0 s (3.00 items/s)"),  # stdout: not named
        (CaptionResult(6, 2, 4), 4.0, None, "2 of 6 answered, 4 failed in 4.0 s (1.50 items/s)"),  # a library call
        (CaptionResult(2, 2, 0), 0.0, "out.md", "2 of 2 answered in 0.0 s (0.00 items/s) -> out.md"),  # no time
        (
            CaptionResult(24, 8, 0, stopped=True),
            2.0,
            "out.jsonl",
            "interrupted: 8 of 24 answered in 2.0 s (4.00 items/s) -> out.jsonl;"
            " run the same command with --resume to finish",
        ),
        (
            CaptionResult(24, 8, 1, stopped=True),
            3.0,
            "-",
            "interrupted: 8 of 24 answered, 1 failed in 3.0 s (3.00 items/s)",
        ),
        (CaptionResult(24, 0, 0, stopped=True), 1.0, None, "interrupted: 0 of 24 answered in 1.0 s (0.00 items/s)"),
    ],
)
def test_the_closing_line_says_what_was_done_how_fast_where_and_how_to_finish(stats, seconds, output, line):
    """Only a file can be resumed: the hint to --resume names no stdout and no library call."""
    assert said(lambda: Reporter().summary(stats, seconds, output)) == [line]
    assert said(lambda: Reporter(quiet=True).summary(stats, seconds, output)) == []


def test_the_closing_line_is_never_wrapped_however_long_the_output_path():
    output = "/" + "/".join(["a-rather-long-folder-name"] * 40) + "/captions.jsonl"
    lines = said(lambda: Reporter().summary(CaptionResult(24, 8, 0, stopped=True), 2.0, output))
    assert lines == [
        f"interrupted: 8 of 24 answered in 2.0 s (4.00 items/s) -> {output};"
        " run the same command with --resume to finish"
    ]


def test_several_processes_each_say_their_share_and_the_first_the_merged_output():
    merged = [answered("a.png"), failed("b.png", "no such file"), answered("c.png")]
    first = said(lambda: Reporter(rank=0, world=2).summary(CaptionResult(2, 1, 1), 1.0, "out.jsonl", merged))
    second = said(lambda: Reporter(rank=1, world=2).summary(CaptionResult(2, 1, 1), 2.0, "out.jsonl", merged))
    assert first == [
        "rank 0/2: 1 of 2 answered, 1 failed in 1.0 s (2.00 items/s) -> out.jsonl",
        "merged 3 records from 2 processes (1 failed) -> out.jsonl",
    ]
    assert second == ["rank 1/2: 1 of 2 answered, 1 failed in 2.0 s (1.00 items/s) -> out.jsonl"]


def test_a_runs_closing_line_on_stderr_names_its_output_file(cli, tmp_path):
    noise(30, 30).save(tmp_path / "good.png")
    out = tmp_path / "out.jsonl"
    result = cli("caption", str(tmp_path / "good.png"), str(tmp_path / "missing.png"), "-o", str(out))
    assert result.exit_code == 1
    last = result.stderr.splitlines()[-1]
    assert re.fullmatch(rf"1 of 2 answered, 1 failed in \d+\.\d s \(\d+\.\d\d items/s\) -> {re.escape(str(out))}", last)


# --------------------------------------------------------------------------- a failed stdout
def test_a_stdout_that_fails_is_one_line_and_is_not_failed_again_at_exit(tiny_model, tmp_path, monkeypatch, capsys):
    """`ask ... > /dev/full`, in this process: exit 2, one line naming stdout (nothing to resume
    there), and what Python still holds for stdout goes nowhere rather than failing again."""
    from granite_cli.cli import app

    noise(30, 30).save(tmp_path / "a.png")
    ask = ["ask", str(tmp_path / "a.png"), "What is shown?", "--model", str(tiny_model), "--max-new-tokens", "4"]
    for args in (ask, [*ask, "--json"], ["info", "--json"]):  # streamed, one record, the facts
        with open("/dev/full", "w") as full, monkeypatch.context() as patch:
            patch.setattr(sys, "stdout", full)
            with pytest.raises(SystemExit) as exited:
                app(args)
            full.write("left over\n")
            full.flush()  # stdout now leads nowhere: no second failure
        assert exited.value.code == 2
        assert capsys.readouterr().err == "error: stdout: No space left on device (ENOSPC)\n", args


def test_the_command_line_keeps_python_warnings_off_stderr_unless_debugging(cli, tmp_path):
    """A picture whose EXIF block is damaged makes PIL warn (e.g. "Tag data larger than file"); the
    picture is still answered, and the user's stderr holds no Python warning lines. Under
    GRANITE_VISION_DEBUG=1 they show, for whoever is debugging."""
    import struct
    import warnings

    from PIL import Image

    # One entry, Make, whose 100 bytes lie beyond the end of the block.
    ifd = struct.pack("<H", 1) + struct.pack("<HHII", 0x010F, 2, 100, 1000) + struct.pack("<I", 0)
    Image.new("RGB", (32, 32), "red").save(tmp_path / "exif.jpg", exif=b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd)
    for env, shown in (({}, False), ({"GRANITE_VISION_DEBUG": "1"}, True)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")  # (pytest's own filters would hide it either way)
            result = cli("caption", str(tmp_path / "exif.jpg"), env=env)
        assert result.answered(1)
        # Pillow's words differ by version ("Tag data larger than file", "Truncated File Read").
        damaged = [w for w in seen if f"{os.sep}PIL{os.sep}" in w.filename]
        assert bool(damaged) == shown, [str(w.message) for w in seen]
        if not shown:
            assert seen == []


def test_a_closed_stdout_is_one_line_before_any_work(monkeypatch, capsys, broken_model, tmp_path):
    """`granite-vision ... >&-`: where the data would go is checked first, before the model."""
    from granite_cli.cli import app

    noise(20, 20).save(tmp_path / "a.png")
    monkeypatch.setattr(sys, "stdout", None)
    for args in (["info"], ["caption", str(tmp_path / "a.png"), "--model", str(broken_model)]):
        with pytest.raises(SystemExit) as exited:
            app(args)
        assert exited.value.code == 2
        assert capsys.readouterr().err == (
            "error: stdout is closed, so the data would go nowhere. Hint: run without >&-, or write to -o FILE\n"
        ), args


def test_a_stdout_that_fails_and_is_no_file_is_the_same_one_line(monkeypatch, capsys):
    """A program that runs the CLI with its own stdout object (no file descriptor behind it) gets
    the same: exit 2 and one line, the failure not turned into a traceback by the silencing."""
    import io

    from granite_cli.cli import app

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sys, "stdout", Full())
    with pytest.raises(SystemExit) as exited:
        app(["info", "--json"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: stdout: No space left on device (ENOSPC)\n"


def test_caption_dash_on_a_terminal_says_it_waits_for_paths_and_piped_says_nothing(
    tiny_model, tmp_path, monkeypatch, capsys
):
    """`caption -` typed at a terminal would look hung while it waits for paths: it says what it
    waits for and how to end; fed by a pipe it says nothing of it."""
    import io
    from types import SimpleNamespace

    from granite_cli.cli import app

    class Terminal(io.BytesIO):
        def isatty(self) -> bool:
            return True

    noise(20, 20).save(tmp_path / "a.png")
    for stdin, said in ((Terminal, True), (io.BytesIO, False)):
        monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=stdin(f"{tmp_path / 'a.png'}\n".encode())))
        with pytest.raises(SystemExit) as exited:
            app(["caption", "-", "--model", str(tiny_model), "--max-new-tokens", "2"])
        out, err = capsys.readouterr()
        assert exited.value.code == 0 and len(out.splitlines()) == 1
        assert ("reading paths from stdin, one per line; end with Ctrl-D" in err.splitlines()) is said, err


def test_on_a_terminal_ask_and_caption_say_which_model_loads_and_where(cli, tmp_path, tiny_model, monkeypatch):
    """The seconds a model takes to load are named on a terminal: the model, and the device when
    one was asked for; `ask` notes an option that does nothing here, as `caption` does."""
    import io

    from rich.console import Console

    noise(30, 30).save(tmp_path / "a.png")
    for command, device, where in (("ask", "cpu", " on cpu"), ("caption", "auto", "")):
        screen = io.StringIO()
        monkeypatch.setattr(
            ui, "console", Console(file=screen, force_terminal=True, no_color=True, highlight=False, soft_wrap=True)
        )
        args = [str(tmp_path / "a.png"), *(["What is shown?"] if command == "ask" else [])]
        assert cli(command, *args, "--device", device, "--seed", "3").exit_code == 0
        lines = screen.getvalue().splitlines()
        assert lines[0] == "note: --seed has no effect at --temperature 0 (greedy decoding is deterministic)"
        assert lines[1] == f"loading {tiny_model}{where}…", lines


def test_ask_whose_generation_fails_answers_with_the_reason(cli, tmp_path, monkeypatch):
    """A failure inside the model (a bug in a library) is the item's error, as in `caption`: a
    record naming it (`--json`), one line on stderr, exit 1; not a traceback. A device that
    broke (an illegal memory access) stops the run, as in `caption`: one line, exit 2."""
    from granite_cli.engine import hf

    error = RuntimeError("a kernel bug in some library")
    monkeypatch.setattr(hf.HfEngine, "run", lambda *args, **kwargs: (_ for _ in ()).throw(error))
    noise(30, 30).save(tmp_path / "a.png")
    result = cli("ask", str(tmp_path / "a.png"), "What is shown?", "--json")
    record = json.loads(result.stdout)
    why = "generation failed: RuntimeError: a kernel bug in some library"
    assert (result.exit_code, record["source"], record["answer"], record["error"]) == (
        1,
        str(tmp_path / "a.png"),
        None,
        why,
    )
    assert result.stderr.splitlines() == [f"error: {tmp_path / 'a.png'}: {why}"]
    error = RuntimeError("CUDA error: an illegal memory access was encountered")
    broken = cli("ask", str(tmp_path / "a.png"), "What is shown?")
    assert broken.exit_code == 2 and broken.stdout == ""
    assert "error: the run stopped, the device failed: RuntimeError: CUDA error: an illegal memory" in broken.stderr
