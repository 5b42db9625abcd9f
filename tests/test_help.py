"""The command surface: help without heavy imports, examples, version, `python -m`."""

# No `from __future__ import annotations` here: typer reads the toy commands' annotations at run time.
import os
import re
import shlex
import subprocess
import sys
from typing import Annotated, Literal, Optional

import pytest
import typer
from helpers import run_process


@pytest.mark.slow
def test_help_answers_without_importing_torch_or_transformers():
    code = (
        "import sys\n"
        "from granite_cli.cli import app\n"
        "try:\n"
        "    app(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "for sub in ('ask', 'caption', 'info'):\n"
        "    try:\n"
        "        app([sub, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'torchvision', 'accelerate') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY=\n" in result.stdout or result.stdout.rstrip().endswith("HEAVY="), result.stdout[-300:]


@pytest.mark.slow
def test_help_shows_commands_and_examples():
    result = run_process("--help")
    out = result.stdout.decode()
    assert result.returncode == 0
    for word in ("ask", "caption", "info", "Examples", "jq .answer"):
        assert word in out
    caption_help = run_process("caption", "--help").stdout.decode()
    for option in ("--prompt", "--format", "--output", "--pages", "--dpi", "--batch-size", "--pdf-renderer", "--model"):
        assert option in caption_help
    assert "Examples" in caption_help


@pytest.mark.slow
def test_version_and_module_entry_point():
    from granite_cli import __version__

    result = run_process("--version")
    assert result.returncode == 0
    assert result.stdout.decode().strip() == __version__


def test_version_is_the_installed_packages(cli):
    from importlib.metadata import version

    result = cli("--version")
    assert (result.exit_code, result.stdout, result.stderr) == (0, version("granite-vision") + "\n", "")


def test_unknown_option_is_a_usage_error(cli):
    result = cli("caption", "--no-such-option", "x")
    assert result.exit_code == 2


def test_info_reports_versions_devices_and_renderers(cli):
    result = cli("info", "--json")
    assert result.exit_code == 0
    import json

    facts = json.loads(result.stdout)
    assert facts["versions"]["transformers"]
    assert facts["devices"][0]["device"] == "cpu"
    assert facts["default_model"] == "ibm-granite/granite-vision-3.3-2b"
    assert facts["pdf_renderers"]["pypdfium2"] is True
    assert "model_cache" in facts
    text = cli("info").stdout
    assert "pdf renderers:" in text and "default model:" in text


# --------------------------------------------------------------------------- a CLI that feels native
def test_help_piped_is_whole_with_flags_choices_defaults_and_variables(cli):
    from granite_cli.engine import CACHES, DTYPES
    from granite_cli.readers import RENDERERS
    from granite_cli.writers import FORMATS

    text = cli("caption", "--help").stdout
    assert text.startswith("Usage: granite-vision caption [OPTIONS] SOURCE...\n")
    for option in ("--prompt", "--format", "--output", "--pages", "--dpi", "--pdf-renderer", "--pdf-password",
                   "--max-pixels", "--resume", "--sidecar", "--overwrite", "--schema", "--json-object", "--model",
                   "--revision", "--device", "--dtype", "--batch-size", "--max-batch-tokens", "--max-tiles",
                   "--cache", "--max-new-tokens", "--temperature", "--seed", "--help"):  # fmt: skip
        assert f"{option} " in text or f"{option}\n" in text, option
    for choice in (*FORMATS, *RENDERERS, *CACHES, *DTYPES):
        assert choice in text, choice
    from granite_cli.writers import WRITERS, formats_help

    said = "; ".join(f"{name}: {writer.help}" for name, writer in WRITERS.items())
    assert formats_help() == said and " ".join(said.split()) in " ".join(text.split())  # what each format is
    words = text.split()
    assert "GRANITE_VISION_PDF_PASSWORD]" in words and "GRANITE_VISION_MODEL]" in words  # whole, never cut
    assert "ibm-granite/granite-vision-3.3-2b;" in words and "--max-new-tokens)," in words  # not split at hyphens
    flat = " ".join(text.split())  # (lines wrap between words)
    assert "[default: 'Describe this image in detail.'" in flat and "[default: 144; 36<=x<=1200]" in flat
    assert "<bool>" not in text and "<str>" not in text and "…" not in text and "╭" not in text
    assert "  --resume  " in text or "  --resume\n" in text or " --resume " in text  # a flag, no value
    asked = cli("ask", "--help").stdout
    assert asked.startswith("Usage: granite-vision ask [OPTIONS] SOURCE QUESTION\n") and "  --json  " in asked
    assert cli("ask", "-h").stdout == asked  # -h is --help


def test_every_usage_error_is_one_line_and_exit_2(cli):
    for args, start in [
        (("caption", "x.png", "--dpi", "20"), "error: --dpi 20: "),
        (("caption", "x.png", "--dpi=abc"), "error: --dpi abc: "),
        (("caption", "x.png", "-f", "xml"), "error: --format xml: "),
        (("caption", "x.png", "--batch-size", "0"), "error: --batch-size 0: "),
        (("caption",), "error: Missing argument 'SOURCE'"),
        (("ask", "x.png"), "error: Missing argument 'QUESTION'"),
        (("caption", "x.png", "--no-such-option"), "error: No such option: --no-such-option"),
        (("nonsense",), "error: No such command 'nonsense'"),
        (("caption", "x.png", "--pages", "3-1"), "error: --pages '3-1': "),
        (("caption", "x.png", "--schema", "total:money"), "error: --schema: "),
    ]:
        result = cli(*args, model=None)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith(start), (args, result.stderr)
        assert "╭" not in result.stderr and "Usage:" not in result.stderr


def test_choices_take_any_case(cli, inputs):
    picture = str(inputs / "a.png")
    assert cli("caption", picture, "-f", "MARKDOWN").stdout.startswith("# granite-vision report")
    for option, value in (
        ("--device", "CPU"),
        ("--dtype", "FLOAT32"),
        ("--cache", "Dynamic"),
        ("--pdf-renderer", "PYPDFIUM2"),
    ):
        assert cli("caption", picture, option, value).exit_code == 0, option


@pytest.mark.slow
def test_shell_completion_installs(tmp_path):
    # As a user types it, in bash (typer finds the shell from the parent process; a shell name
    # after the flag is not read). `; exit $?`: bash stays the parent rather than exec the command.
    command = f"{shlex.quote(sys.executable)} -m granite_cli --show-completion; exit $?"
    shown = subprocess.run(["bash", "-c", command], capture_output=True, env={**os.environ, "HOME": str(tmp_path)})
    assert shown.returncode == 0 and b"complete" in shown.stdout and b"granite" in shown.stdout.lower()


# --------------------------------------------------------------------------- the layout of help, whole
def help_sections(text: str, width: int) -> tuple[list[str], dict[str, dict[str, str]], list[str]]:
    """A help text as a user reads it: (the lines before the first section, {section title: {term:
    its help, lines joined}}, the epilog's lines), checking its layout on the way: in each section
    the help of every term starts in one column, two spaces after the longest term or at column
    36, a longer term alone on its line; help wraps between words only, filling each line up to
    the width left beside that column (at least 40); only a word longer than that is wider."""
    head, sections = [], {}
    body, examples, rest = text.rstrip("\n").partition("\n\nExamples:\n")
    epilog = ["Examples:", *rest.split("\n")] if examples else []
    for block in body.split("\n\n"):
        lines = block.split("\n")
        if not (re.fullmatch(r"[A-Z][A-Za-z ]*:", lines[0]) and len(lines) > 1 and lines[1].startswith("  ")):
            assert not sections, f"prose after the sections: {block!r}"
            head += lines
            continue
        title, rows = lines[0][:-1], {}
        terms = [line[2:].split("  ")[0].rstrip() for line in lines[1:] if re.match(r"  \S", line)]
        column = min(max(map(len, terms)) + 4, 36)
        wrap = max(40, width - column)
        texts: dict[str, list[str]] = {}
        for line in lines[1:]:
            if re.match(r"  \S", line):
                term = line[2:].split("  ")[0].rstrip()
                texts[term] = []
                if len(term) + 4 > column:
                    assert line == f"  {term}", f"a long term stands alone: {line!r}"
                    continue
                assert line[:column].rstrip() == f"  {term}" and line[column - 1 : column] == " ", line
                line = " " * column + line[column:]
            assert line[:column].strip() == "" and line[column : column + 1] != " ", f"not in the column: {line!r}"
            assert len(line) - column <= wrap or " " not in line.strip(), f"wider than {wrap}: {line!r}"
            texts[term].append(line[column:])
        for term, parts in texts.items():
            for this, following in zip(parts, parts[1:], strict=False):
                assert len(this) + 1 + len(following.split()[0]) > wrap, f"{term}: wraps early: {this!r}"
            rows[term] = " ".join(parts).strip()
        sections[title] = rows
    return head, sections, epilog


def extras(rows: dict[str, str]) -> dict[str, str]:
    """Each term's bracketed defaults, range, variable (what --help | grep looks for), or ''."""
    return {term: (re.search(r"\[[^\[\]]*\]$", text) or [""])[0] for term, text in rows.items()}


IN_ANY_HELP = {  # the rows `ask` and `caption` share: {panel: {option: its bracketed default, range, variable}}
    "Structured output": {"--schema SCHEMA": "", "--json-object": ""},
    "Model": {
        "-m, --model ID|FOLDER": "[default: ibm-granite/granite-vision-3.3-2b; env var: GRANITE_VISION_MODEL]",
        "--server URL": "[env var: GRANITE_VISION_SERVER]",
        "--api-key KEY": "[env var: GRANITE_VISION_API_KEY]",
        "--revision REV": "",
        "--device [auto|cpu|cuda|cuda:N|mps]": "[default: auto]",
        "--dtype [auto|bfloat16|float16|float32]": "[default: auto]",
        "--quantize [int8|nf4]": "[default: no: every weight in --dtype]",
        "--max-tiles N": "[x>=2]",
        "--cache [auto|dynamic|static]": "[default: auto]",
        "--max-memory GIB": "[default: 40, or 92% of a smaller card; x>=1.0]",
    },
    "Generation": {
        "--max-new-tokens N": "[default: 256; x>=1]",
        "--temperature X": "[default: 0.0; x>=0.0]",
        "--seed N": "",
        "--repetition-stop / --no-repetition-stop": "[default: True]",
    },
}
INPUT = {
    "--dpi N": "[default: 144; 36<=x<=1200]",
    "--pdf-renderer [pypdfium2|poppler]": "[default: pypdfium2]",
    "--pdf-password PASSWORD": "[env var: GRANITE_VISION_PDF_PASSWORD]",
    "--max-pixels N": "[default: 179000000; x>=1]",
}
HELPS = {
    "ask": (
        [
            "Usage: granite-vision ask [OPTIONS] SOURCE QUESTION",
            "Answer one question about one image or PDF page; the answer streams to stdout.",
        ],
        {
            "Arguments": {"SOURCE": "[required]", "QUESTION": "[required]"},
            "Input": {"--page N": "[default: 1; x>=1]", **INPUT},
            "Options": {"--json": "", "-h, --help": ""},
            **IN_ANY_HELP,
        },
        [
            "Examples:",
            "  granite-vision ask photo.jpg 'What is shown?'",
            "  granite-vision ask invoice.pdf --page 2 'What is the total?' --json",
            "  curl -s https://example.com/a.png | granite-vision ask - 'Describe it.'",
        ],
    ),
    "caption": (
        [
            "Usage: granite-vision caption [OPTIONS] SOURCE...",
            "Caption (or ask the same question of) every image and PDF page named; one record per picture.",
        ],
        {
            "Arguments": {"SOURCE...": ""},
            "Options": {
                "--prompt TEXT": "[default: 'Describe this image in detail.', or with --schema, a request for its"
                " fields]",
                "--prompts FILE": "",
                "--requests FILE": "",
                "-f, --format [jsonl|markdown|csv|imagefolder|html|openai-batch]": "[default: from --output's"
                " ending (report.md:"
                " markdown, .csv, .html), else jsonl]",
                "-o, --output FILE": "",
                "--resume": "",
                "--sidecar EXT": "",
                "--overwrite": "",
                "-v, --verbose": "",
                "-h, --help": "",
            },
            "Structured output": IN_ANY_HELP["Structured output"],
            "Input": {"--pages PAGES": "", **INPUT},
            "Model": {
                **dict(list(IN_ANY_HELP["Model"].items())[:7]),
                "--batch-size N": "[default: 8 on the CPU, 128 on a GPU (where the memory budget decides below); x>=1]",
                "--max-batch-tokens N": "[default: on a GPU, what its free memory allows; on the CPU, no limit; x>=1]",
                **dict(list(IN_ANY_HELP["Model"].items())[7:]),
            },
            "Generation": IN_ANY_HELP["Generation"],
        },
        [
            "Examples:",
            "  granite-vision caption photos/ scans/*.pdf --format markdown -o report.md",
            "  granite-vision caption 'archive/**/*.tif' --pages 1-3 -o captions.jsonl",
            "  find . -name '*.jpg' | granite-vision caption - | jq .answer",
        ],
    ),
    "info": (
        [
            "Usage: granite-vision info [OPTIONS]",
            "Versions, devices, dtypes, defaults, renderers; --fit: what a model needs on a GPU.",
        ],
        {
            "Options": {"--json": "", "--fit": "", "-h, --help": ""},
            "Model": {
                **{
                    option: default
                    for option, default in IN_ANY_HELP["Model"].items()
                    if "KEY" not in option and "URL" not in option and "cache" not in option
                },
                "--card GIB": "[x>=1.0]",
            },
            "Generation": {"--max-new-tokens N": "[default: 256; x>=1]"},
        },
        [],
    ),
}


GROUP_HEAD = [
    "Usage: granite-vision [OPTIONS] COMMAND [ARGS]...",
    "Ask questions about images and PDF pages, and caption whole folders, with IBM Granite Vision.",
]


@pytest.mark.parametrize("command", list(HELPS))
def test_command_help_piped_is_usage_arguments_option_panels_and_examples(cli, command):
    """What `granite-vision COMMAND --help | less` shows, whatever the terminal's width: the usage
    with its arguments, what the command does, its arguments, its options by panel in the order
    they first appear (flags without a value, choices listed, defaults, ranges and variables
    whole), then its examples one per line; every line within 100 columns."""
    text = cli(command, "--help", env={"COLUMNS": "60"}).ok().stdout
    head, sections, epilog = help_sections(text, 100)
    expected_head, expected_sections, expected_epilog = HELPS[command]
    assert head == expected_head and epilog == expected_epilog
    assert {title: extras(rows) for title, rows in sections.items()} == expected_sections
    assert list(sections) == list(expected_sections)
    assert max(map(len, text.splitlines())) <= 100
    rows = {term: text for section in sections.values() for term, text in section.items()}
    assert rows["-h, --help"] == "Show this message and exit."
    if command != "info":  # a row is its help, then what is in brackets, if anything
        assert rows["--seed N"] == "Random seed for sampling."
        assert rows["--dpi N"] == "PDF rendering resolution. [default: 144; 36<=x<=1200]"
        assert rows["--revision REV"] == "Model revision (branch, tag or commit) on the Hub."
        assert rows["--schema SCHEMA"].startswith("Answer with JSON valid against this schema: a JSON Schema file,")


def test_group_help_lists_each_command_with_the_line_its_help_starts_with(cli):
    text = cli("--help", env={"COLUMNS": "60"}).ok().stdout
    head, sections, epilog = help_sections(text, 100)
    assert head == GROUP_HEAD
    serve = "Keep the model loaded and answer OpenAI-style chat requests over HTTP, batching every client together."
    listed = {command: HELPS[command][0][1] for command in ("ask", "caption", "info")}
    assert sections["Commands"] == {**dict(list(listed.items())[:2]), "serve": serve, "info": listed["info"]}
    assert sections["Options"] == {
        "--version": "Print the version and exit.",
        "--install-completion": "Install completion for the current shell.",
        "--show-completion": "Show completion for the current shell, to copy it or customize the installation.",
        "-h, --help": "Show this message and exit.",
    }
    assert list(sections) == ["Commands", "Options"]
    bare = cli(env={"COLUMNS": "60"})  # `granite-vision` alone: the same help, as a usage error's exit code
    assert (bare.exit_code, bare.stdout, bare.stderr) == (2, text, "")
    assert epilog == [
        "Examples:",
        "  granite-vision ask photo.jpg 'What is shown?'",
        "  granite-vision caption photos/ 'scans/*.pdf' --format markdown -o report.md",
        "  find . -name '*.jpg' | granite-vision caption - | jq .answer",
        "Shell completion: granite-vision --install-completion (bash, zsh, fish, PowerShell).",
    ]


@pytest.mark.parametrize("command", [[], ["ask"]])
def test_help_on_a_terminal_wraps_at_its_width(monkeypatch, capsys, command):
    """On a 60-column terminal the prose wraps at 60, and so does a row whose terms are short; an
    option's help still gets 40 columns beside its column."""
    import sys

    from granite_cli.cli import app

    monkeypatch.setenv("COLUMNS", "60")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    with pytest.raises(SystemExit) as exited:
        app([*command, "--help"], prog_name="granite-vision")
    text = capsys.readouterr().out
    assert exited.value.code == 0
    head, sections, _ = help_sections(text, 60)
    piped = HELPS[command[0]][0] if command else GROUP_HEAD
    assert head[0] == piped[0] and len(head) > 2 and " ".join(head[1:]) == piped[1]
    assert max(map(len, head)) <= 60
    wide = [line for line in text.splitlines() if len(line) > 60]
    assert wide and max(map(len, wide)) <= 36 + 40


# --------------------------------------------------------------------------- usage errors, word for word
@pytest.mark.parametrize(
    ("args", "line"),
    [
        (("caption", "x.png", "--max-new-tokens", "4", "--dpi", "20"), "--dpi 20: " + "expected a whole number"
         " at least 36 and at most 1200"),
        (("caption", "x.png", "--dpi=1=2"), "--dpi 1=2: expected a whole number at least 36 and at most 1200"),
        (("caption", "x.png", "--batch-size", "0"), "--batch-size 0: expected a whole number at least 1"),
        (("caption", "x.png", "--temperature", "-1"), "--temperature -1: expected a number at least 0.0"),
        (
            ("caption", "x.png", "-f", "xml"),
            "--format xml: expected one of jsonl|markdown|csv|imagefolder|html|openai-batch",
        ),
        (("caption", "--max-new-tokens", "4", "-fxml", "--", "-f"),  # the value glued on; a picture named -f
         "--format: expected one of jsonl|markdown|csv|imagefolder|html|openai-batch"),
        (("caption",), "Missing argument 'SOURCE' (see --help; or --requests FILE)"),
        (("ask", "x.png"), "Missing argument 'QUESTION' (see --help)"),
        (("caption", "x.png", "--fooX"), "No such option: --fooX (see --help)"),
        (("info", "extra"), "Got unexpected extra argument(s) (extra) (see --help)"),
        (("nonsense",), "No such command 'nonsense' (see --help)"),
        (("ask", "x.png", "what", "is", "it"), "Got unexpected extra argument(s) (is it). Hint: ask takes one"
         " picture, then one question (quote it: 'What is shown?'); for several pictures: granite-vision caption"
         " a.png b.png --prompt '...'"),
    ],
)  # fmt: skip
def test_a_usage_error_says_what_was_given_and_what_was_expected(cli, args, line):
    """`--option VALUE: what it takes` in the words the library's own errors use; the parser's
    other errors without their final period, pointing to --help (or, for `ask`, at quoting)."""
    result = cli(*args, model=None)
    assert (result.exit_code, result.stderr, result.stdout) == (2, f"error: {line}\n", "")


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["caption", "x.png", "--dpi", "20"], "--dpi 20: expected a whole number at least 36 and at most 1200"),
        (["caption"], "Missing argument 'SOURCE' (see --help; or --requests FILE)"),
    ],
)
def test_a_usage_error_of_the_command_line_itself(monkeypatch, capsys, argv, line):
    """As the installed command runs: the arguments come from sys.argv."""
    import sys

    from granite_cli.cli import app

    monkeypatch.setattr(sys, "argv", ["granite-vision", *argv])
    with pytest.raises(SystemExit) as exited:
        app(prog_name="granite-vision")
    assert exited.value.code == 2 and capsys.readouterr().err == f"error: {line}\n"


def test_a_caller_that_shows_the_parsers_error_itself_gets_the_usage_of_help():
    """Run with standalone_mode=False (a caller embedding the CLI), click's own error display
    names the arguments as --help does."""
    import io

    from granite_cli.cli import app

    for argv, usage in (
        (["ask", "x.png"], "Usage: granite-vision ask [OPTIONS] SOURCE QUESTION"),
        (["caption", "--dpi", "9"], "Usage: granite-vision caption [OPTIONS] SOURCE..."),
    ):
        with pytest.raises(Exception) as raised:
            app(argv, prog_name="granite-vision", standalone_mode=False)
        shown = io.StringIO()
        raised.value.show(file=shown)
        assert shown.getvalue().splitlines()[0] == usage


# --------------------------------------------------------------------------- kinds of parameters the CLI has few of
@pytest.fixture
def toy():
    """A small app in the CLI's style with what its own commands lack: a command without help
    and one of two paragraphs, an optional argument, a choice from `options.choices` with an
    Enum default, an option without help, a hidden one, one with a maximum only, one whose help
    holds a word longer than any line, a flag of two names each way, a path that must exist and
    a required choice."""
    from pathlib import Path

    from granite_cli.helptext import Command, Group
    from granite_cli.options import choices

    colour = choices("Colour", ("red", "dark-blue"))
    app = typer.Typer(name="toy", cls=Group, help="A toy.", rich_markup_mode=None, add_completion=False)
    address = "https://example.com/" + "a-very-long-address/" * 4 + "page.html"

    @app.command(cls=Command, epilog="Examples:\n\n  toy paint a b\n\n  toy paint --colour dark-blue c")
    def paint(
        files: Annotated[list[str], typer.Argument(metavar="FILES...", help="What to paint.")],
        colour: Annotated[colour, typer.Option(case_sensitive=False, help="Paint colour.")] = colour.red,
        label: Annotated[Optional[str], typer.Option()] = None,
        secret: Annotated[bool, typer.Option(hidden=True)] = False,
        coats: Annotated[int, typer.Option(max=9, help="Coats.")] = 3,
        config: Annotated[Optional[Path], typer.Option(exists=True, help=f"Read {address} first.")] = None,
        loud: Annotated[bool, typer.Option("--loud/--quiet", "--shout/--whisper", help="Noise.")] = False,
    ) -> None:
        """Paint the files.

        Every one of them, twice."""
        print(colour.value, colour == colour.value)

    @app.command(cls=Command)
    def plain(
        who: Annotated[Literal["a", "b"], typer.Option(help="Pick.")],
        name: Annotated[str, typer.Argument(help="Who.")] = "world",
    ) -> None:
        pass

    app.address = address
    return app


def run_toy(toy, *args):
    from typer.testing import CliRunner

    result = CliRunner().invoke(toy, list(args), env={"COLUMNS": "60"}, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_help_lays_out_every_kind_of_parameter(toy):
    code, text, _ = run_toy(toy, "--help")
    head, sections, _ = help_sections(text, 100)
    assert code == 0 and head == ["Usage: toy [OPTIONS] COMMAND [ARGS]...", "A toy."]
    assert sections == {
        "Commands": {"paint": "Paint the files.", "plain": ""},  # the first line of each command's help
        "Options": {"--help": "Show this message and exit."},
    }

    code, text, _ = run_toy(toy, "paint", "--help")
    head, sections, epilog = help_sections(text, 100)
    assert head == ["Usage: toy paint [OPTIONS] FILES...", "Paint the files.", "Every one of them, twice."]
    assert sections == {
        "Arguments": {"FILES...": "What to paint. [required]"},
        "Options": {
            "--colour [red|dark-blue]": "Paint colour. [default: red]",
            "--label TEXT": "",
            "--coats N": "Coats. [default: 3; x<=9]",
            "--config TEXT": f"Read {toy.address} first.",
            "--loud, --shout / --quiet / --whisper": "Noise.",
            "--help": "Show this message and exit.",
        },
    }
    assert f"\n{' ' * 36}{toy.address}\n" in text  # a word longer than a line stands whole on its own
    assert epilog == ["Examples:", "  toy paint a b", "  toy paint --colour dark-blue c"]

    code, text, _ = run_toy(toy, "plain", "--help")
    head, sections, _ = help_sections(text, 100)
    assert [line for line in head if line.strip()] == ["Usage: toy plain [OPTIONS] NAME"]  # no help: none shown
    assert sections == {
        "Arguments": {"NAME": "Who. [default: world]"},  # optional: not "required"
        "Options": {"--who TEXT": "Pick.", "--help": "Show this message and exit."},
    }


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (("paint", "x", "--coats", "10"), "--coats 10: expected a whole number at most 9"),
        (("paint", "x", "--config", "a: b: c"), "--config a: b: c: path 'a: b: c' does not exist."),
        (("plain",), "--who: Missing option '--who'. Choose from: a, b"),
        (("paint", "x", "--colour", "green"), "--colour green: expected one of red|dark-blue"),
    ],
)
def test_usage_errors_of_every_kind_of_parameter(toy, args, line):
    code, out, err = run_toy(toy, *args)
    assert (code, out, err) == (2, "", f"error: {line}\n")


def test_choices_are_an_enum_of_strings_taken_in_any_case(toy):
    """`options.choices`: the Enum of a registry's names, each member the string itself."""
    from granite_cli.options import choices

    colour = choices("Colour", ("red", "dark-blue"))
    assert colour.__name__ == "Colour" and [member.value for member in colour] == ["red", "dark-blue"]
    assert colour("dark-blue") == "dark-blue" and isinstance(colour.red, str)
    assert run_toy(toy, "paint", "x", "--colour", "DARK-BLUE") == (0, "dark-blue True\n", "")
