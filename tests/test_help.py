"""The command surface: help without heavy imports, examples, version, `python -m`."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest
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
