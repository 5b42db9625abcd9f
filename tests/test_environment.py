"""The environment the tool runs in: dependency floors that are the ones the floor lane tests,
one line before any work where it cannot run right, a library that leaves its host's process as
it found it, and GRANITE_VISION_DEBUG for the traceback behind a one-line error."""

from __future__ import annotations

import gc
import json
import logging
import platform
import random
import subprocess
import sys
import tomllib
import warnings
import weakref
from pathlib import Path

import pytest
from helpers import noise, tree_hashes

from granite_cli import environment
from granite_cli.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent


def installed(monkeypatch, **versions: str | None) -> None:
    """Pretend these packages are installed at these versions (None: not installed)."""
    real = environment._version
    names = {name.replace("_", "-"): version for name, version in versions.items()}
    monkeypatch.setattr(environment, "_version", lambda name: names[name] if name in names else real(name))


# --------------------------------------------------------------------------- floors
def test_the_floors_checked_at_run_time_are_pyprojects():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = dict(requirement.split(";")[0].split(">=") for requirement in dependencies)  # (markers aside)
    assert declared == environment.REQUIREMENTS
    assert list(declared) == list(environment.REQUIREMENTS)


def test_versions_compare_by_release():
    assert environment.release("2.11.0+cu130") == (2, 11) == environment.release("2.11")
    assert environment.release("5.17.0") < environment.release("5.24") < environment.release("5.24.1")
    assert environment.release("5.25.0.dev0") > environment.release("5.24.0")
    assert environment.release("10.3.0") > environment.release("9.5.0")
    assert environment.release("5") == (5, 0) == environment.release("5.0.0") < environment.release("5.0.1")
    assert environment.release("unknown") == (0, 0)  # a version that names no release: older than any


def test_every_problem_of_an_environment_is_counted_in_its_one_line(cli, monkeypatch, tmp_path):
    """The first problem is the line; the others are counted, and `info` lists them all."""
    noise(40, 40).save(tmp_path / "a.png")
    old = 'transformers 5.17.0 is installed; granite-vision needs >= 5.24.0 (pip install -U "transformers>=5.24.0")'
    installed(monkeypatch, transformers="5.17.0")
    one = cli("caption", str(tmp_path / "a.png"))
    assert (one.exit_code, one.stderr) == (2, f"error: {old}\n")
    installed(monkeypatch, transformers="5.17.0", pillow="9.0.0")
    two = cli("caption", str(tmp_path / "a.png"))
    assert (two.exit_code, two.stderr) == (2, f"error: {old} (and 1 more: see `granite-vision info`)\n")
    monkeypatch.undo()
    installed(monkeypatch, transformers="5.17.0", accelerate=None, pillow="9.0.0")
    three = cli("caption", str(tmp_path / "a.png"))
    assert (three.exit_code, three.stderr) == (2, f"error: {old} (and 2 more: see `granite-vision info`)\n")


# --------------------------------------------------------------------------- one line before any work
@pytest.mark.parametrize(
    ("versions", "expected"),
    [
        (
            {"transformers": "5.17.0"},
            "error: transformers 5.17.0 is installed; granite-vision needs >= 5.24.0"
            ' (pip install -U "transformers>=5.24.0")',
        ),
        ({"accelerate": "0.34.2"}, "error: accelerate 0.34.2 is installed; granite-vision needs >= 1.1.0"),
        ({"torchvision": "0.21.0"}, "error: torchvision 0.21.0 is installed; granite-vision needs >= 0.26.0"),
        (
            {"torch": "2.11.0", "torchvision": "0.29.1"},
            "error: torchvision 0.29.1 is built for torch 2.14, but torch 2.11.0 is installed"
            ' (pip install "torchvision==0.26.*")',
        ),
        ({"accelerate": None}, "error: accelerate is not installed; granite-vision needs >= 1.1.0"),
    ],
)
def test_an_environment_that_cannot_run_right_is_one_line_before_any_work(
    cli, monkeypatch, tmp_path, broken_model, versions, expected
):
    noise(40, 40).save(tmp_path / "a.png")
    out = tmp_path / "out.jsonl"
    out.write_text('{"an": "earlier run"}\n')
    before = tree_hashes(tmp_path)
    installed(monkeypatch, **versions)
    for args in (
        ("caption", str(tmp_path / "a.png"), "-o", str(out)),
        ("ask", str(tmp_path / "a.png"), "What is shown?"),
    ):
        result = cli(*args, model=broken_model)  # a model that would fail to load: never reached
        assert result.exit_code == 2, result.stderr
        assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1, result.stderr
        assert result.stdout == ""
    assert tree_hashes(tmp_path) == before
    with pytest.raises(UsageError, match=expected.removeprefix("error: ")[:30]):
        import granite_cli

        granite_cli.caption([str(tmp_path / "a.png")], model=str(broken_model))


def test_packages_only_some_options_need_are_checked_for_those_options(cli, monkeypatch, tmp_path):
    noise(40, 40).save(tmp_path / "a.png")
    installed(monkeypatch, xgrammar="0.2.7", pdf2image=None)
    assert cli("caption", str(tmp_path / "a.png")).exit_code == 0
    schema = cli("caption", str(tmp_path / "a.png"), "--schema", "title")
    assert schema.exit_code == 2 and schema.stderr.startswith("error: xgrammar 0.2.7 is installed;")
    poppler = cli("caption", str(tmp_path / "a.png"), "--pdf-renderer", "poppler")
    assert poppler.exit_code == 2 and poppler.stderr.startswith("error: pdf2image is not installed;")


def test_info_shows_the_same_check(cli, monkeypatch):
    facts = json.loads(cli("info", "--json").ok().stdout)
    names = [entry["name"] for entry in facts["environment"]]
    assert names == ["python", *environment.REQUIREMENTS]
    assert all(entry["supported"] and entry["problem"] is None for entry in facts["environment"])
    by_name = {entry["name"]: entry for entry in facts["environment"]}
    assert by_name["transformers"]["needed"] == "5.24.0" and by_name["python"]["needed"] == "3.11"
    assert by_name["xgrammar"]["only_for"] == "--schema" and "only_for" not in by_name["torch"]

    installed(monkeypatch, transformers="5.17.0")
    result = cli("info", "--json")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: transformers 5.17.0 is installed; granite-vision needs >= 5.24.0")
    entry = {entry["name"]: entry for entry in json.loads(result.stdout)["environment"]}["transformers"]
    assert entry == {
        "name": "transformers",
        "installed": "5.17.0",
        "needed": "5.24.0",
        "supported": False,
        "problem": "transformers 5.17.0 is installed; granite-vision needs >= 5.24.0"
        ' (pip install -U "transformers>=5.24.0")',
    }
    assert "transformers: 5.17.0 (needs >= 5.24.0: NOT SUPPORTED)" in cli("info").stdout


def test_info_shows_the_python_running_and_a_python_too_old_stops_the_run(cli, monkeypatch, tmp_path):
    running = platform.python_version()
    facts = json.loads(cli("info", "--json").ok().stdout)
    assert facts["environment"][0] == {
        "name": "python",
        "installed": running,
        "needed": "3.11",
        "supported": True,
        "problem": None,
    }

    monkeypatch.setattr(environment, "PYTHON", (99, 0))  # as a Python older than the floor would be
    problem = f"Python {running} is running; granite-vision needs >= 99.0"
    result = cli("info", "--json")
    assert result.exit_code == 2 and result.stderr == f"error: {problem}\n"
    assert json.loads(result.stdout)["environment"][0] == {
        "name": "python",
        "installed": running,
        "needed": "99.0",
        "supported": False,
        "problem": problem,
    }
    noise(40, 40).save(tmp_path / "a.png")
    caption = cli("caption", str(tmp_path / "a.png"))
    assert caption.exit_code == 2 and caption.stderr == f"error: {problem}\n" and caption.stdout == ""


def test_a_torchvision_build_that_does_not_load_is_one_line(cli, monkeypatch, tmp_path, tiny_model, real_loading):
    """A CPU torch beside a CUDA torchvision: the versions fit, the import fails."""
    import builtins

    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *args, **kwargs)

    noise(40, 40).save(tmp_path / "a.png")
    monkeypatch.setattr(builtins, "__import__", failing_import)
    result = cli("caption", str(tmp_path / "a.png"))
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: torchvision does not load beside torch ")
    assert "operator torchvision::nms does not exist" in result.stderr and result.stderr.count("\n") == 1
    assert result.stderr.rstrip().endswith("; install the torchvision built for this torch (see `granite-vision info`)")
    assert cli("info").exit_code == 2


# --------------------------------------------------------------------------- a library changes nothing process-wide
def _process_state() -> dict:
    """What a library must leave as it found it."""
    import numpy
    import torch
    from PIL import Image, ImageFile
    from transformers.utils import logging as hf_logging

    return {
        "pil": (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES),
        "warnings": list(warnings.filters),
        "loggers": {
            name: logging.getLogger(name).level
            for name in ("transformers", "torch", "PIL", "accelerate", "huggingface_hub")
        },
        "transformers": (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()),
        "torch": (
            torch.get_num_threads(),
            torch.get_default_dtype(),
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            torch.are_deterministic_algorithms_enabled(),
            torch.get_rng_state().tolist(),
        ),
        "random": (random.getstate(), numpy.random.get_state()[1].tolist()),
    }


def test_the_library_changes_nothing_process_wide(tiny_model, tmp_path, real_loading):
    """An application's own settings, unusual on purpose, survive `import granite_cli` and calls
    that load a model (quietly), sample with a seed and decode a picture."""
    import torch
    from PIL import Image
    from transformers.utils import logging as hf_logging

    noise(64, 48).save(tmp_path / "a.png")
    Image.MAX_IMAGE_PIXELS = 50_000_000
    warnings.filterwarnings("always", message="an application's own filter")
    for level, name in enumerate(("transformers", "torch", "PIL", "accelerate", "huggingface_hub"), start=1):
        logging.getLogger(name).setLevel(level)
    hf_logging.enable_progress_bar()
    torch.manual_seed(1234)
    random.seed(99)
    try:
        before = _process_state()
        import granite_cli

        options = {"model": str(tiny_model), "max_new_tokens": 4, "temperature": 1.0, "seed": 5}
        result = granite_cli.caption([str(tmp_path / "a.png")], **options)
        asked = granite_cli.ask(str(tmp_path / "a.png"), "What?", **options)
        assert result.answered == 1 and asked.record.ok
        assert _process_state() == before
    finally:
        Image.MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)  # PIL's default
        for name in ("transformers", "torch", "PIL", "accelerate", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.NOTSET)
        hf_logging.set_verbosity_warning()


@pytest.mark.slow  # a fresh interpreter
def test_importing_any_module_of_the_package_changes_nothing_process_wide():
    """In a fresh interpreter: state before any import of ours equals state after importing every
    module of the package (a module-level `Image.MAX_IMAGE_PIXELS = None` would show here)."""
    script = """
import importlib, logging, pkgutil, sys, warnings
from PIL import Image, ImageFile
import transformers, torch
def state():
    return (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters),
            {n: logging.getLogger(n).level for n in ("transformers", "torch", "PIL", "accelerate", "huggingface_hub")},
            torch.get_num_threads(), torch.get_default_dtype(), torch.initial_seed())
before = state()
import granite_cli
names = [m.name for m in pkgutil.walk_packages(granite_cli.__path__, "granite_cli.")]
names.remove("granite_cli.__main__")
for name in names:
    importlib.import_module(name)
assert state() == before, (before, state())
print(len(names))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 25  # every module, engine included


def test_pils_own_limit_set_by_an_application_applies_to_the_library_in_words(tiny_model, tmp_path):
    from PIL import Image

    import granite_cli

    noise(64, 48).save(tmp_path / "a.png")
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, 1000
    try:
        record = granite_cli.caption([str(tmp_path / "a.png")], model=str(tiny_model), max_new_tokens=2).records[0]
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    # PIL's own reason (the picture's 3,072 pixels against twice the limit), then whose limit it is.
    assert "3072 pixels" in record.error and "MAX_IMAGE_PIXELS" in record.error and "corrupt" not in record.error


def test_an_engine_and_its_processor_are_freed_with_it(tiny_model, real_loading):
    from granite_cli import engine as engines

    engine = engines.load_engine(str(tiny_model), device="cpu")
    engine.tokens("What is shown?", 640, 480)  # fills every token cache
    engine.fit(2000, 3000)
    processor, model = weakref.ref(engine.processor), weakref.ref(engine.model)
    del engine
    gc.collect()
    assert processor() is None and model() is None


# --------------------------------------------------------------------------- GRANITE_VISION_DEBUG
def test_debug_prints_the_traceback_behind_each_one_line_error(cli, tmp_path, broken_model):
    noise(40, 40).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes((tmp_path / "good.png").read_bytes()[:200])  # truncated
    for off in ({}, {"GRANITE_VISION_DEBUG": "0"}, {"GRANITE_VISION_DEBUG": "false"}, {"GRANITE_VISION_DEBUG": "No"}):
        quiet = cli("caption", str(tmp_path / "bad.png"), str(tmp_path / "good.png"), env=off)
        assert quiet.exit_code == 1 and "Traceback" not in quiet.stderr, off
    loud = cli("caption", str(tmp_path / "bad.png"), str(tmp_path / "good.png"), env={"GRANITE_VISION_DEBUG": "1"})
    assert loud.exit_code == 1 and loud.records()[1]["answer"] is not None
    assert "Traceback (most recent call last)" in loud.stderr and "bad.png: corrupt or truncated image" in loud.stderr
    assert "PIL" in loud.stderr  # the cause's own frames, not only ours

    for env in ({}, {"GRANITE_VISION_DEBUG": "1"}):  # a model that does not load: a usage error
        result = cli("caption", str(tmp_path / "good.png"), model=broken_model, env=env)
        assert result.exit_code == 2 and result.stderr.splitlines()[-1].startswith("error: ")
        assert ("Traceback" in result.stderr) == bool(env)
