"""The command surface: help without heavy imports, examples, version, `python -m`."""

from __future__ import annotations

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
