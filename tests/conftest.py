"""Fixtures: tiny random Granite Vision models on disk, sample inputs, a CLI runner, and the
session's loaded engines. Helpers that are not fixtures live in helpers.py.

The models are built once per session by `granite_cli.tiny_model` and loaded through
`from_pretrained`, exactly as a downloaded checkpoint would be. In-process runs share one loaded
engine per model and options (loading is what the loading tests test, not every test).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import MAX_NEW, MIXED_SIZES, Result, make_pdf, noise
from typer.testing import CliRunner

from granite_cli.cli import app
from granite_cli.tiny_model import build_granite4_vision, build_llava_next

# Keep every test off the network: ids that are not local folders must fail fast.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("GRANITE_VISION_MODEL", None)


def pytest_collection_modifyitems(config, items) -> None:
    """`gpu` tests run where CUDA is, `mps` tests where Apple Metal is; elsewhere they are
    skipped, saying why."""
    import importlib.util

    cuda = mps = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    for marker, present, reason in (("gpu", cuda, "needs a CUDA GPU"), ("mps", mps, "needs Apple Metal (MPS)")):
        for item in items if not present else ():
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under a mutant (`tests/mutants.py` sets $GRANITE_TEST_LIMIT), a test that runs past the
    limit ends the session as failed: the mutant hangs it, and the tests have noticed. A thread
    exits the process, since the hang may be in C code or a blocked read that no signal ends."""
    limit = float(os.environ.get("GRANITE_TEST_LIMIT", "0"))
    if not limit:
        return (yield)
    import threading

    watchdog = threading.Timer(limit, os._exit, (1,))
    watchdog.daemon = True
    watchdog.start()
    try:
        return (yield)
    finally:
        watchdog.cancel()


def pytest_runtest_logreport(report) -> None:
    """Under a mutant, the test that failed is written down ($GRANITE_MUTANT_KILLERS): the next
    mutants of the same function run it first (see `tests/mutants.py`)."""
    killers, mutant = os.environ.get("GRANITE_MUTANT_KILLERS"), os.environ.get("MUTANT_UNDER_TEST", "")
    if killers and report.failed and "__mutmut_" in mutant:
        with open(killers, "a", encoding="utf-8") as handle:
            handle.write(f"{mutant}\t{report.nodeid}\n")


@pytest.fixture(scope="session", autouse=True)
def _no_leftovers_under_mutants(tmp_path_factory):
    """Under a mutant, the session ends in `os._exit` and pytest never prunes its temporary
    folders: this session's go when it ends (thousands of them once filled the disk)."""
    yield
    if os.environ.get("GRANITE_TEST_LIMIT"):
        import shutil

        shutil.rmtree(tmp_path_factory.getbasetemp(), ignore_errors=True)


def _tiny(family: str, build, tmp_path_factory) -> Path:
    """A tiny model of `family`, built for this session; or, where $GRANITE_TEST_MODELS names a
    folder already holding one (the mutation runs, thousands of short sessions), that one."""
    shared = Path(os.environ.get("GRANITE_TEST_MODELS", "/nonexistent")) / family
    if (shared / "config.json").exists():
        return shared
    return build(tmp_path_factory.mktemp(f"tiny-{family}"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return _tiny("llava_next", build_llava_next, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_g4(tmp_path_factory) -> Path:
    return _tiny("granite4_vision", build_granite4_vision, tmp_path_factory)


@pytest.fixture(scope="session")
def loaded_engines():
    """`load_engine`, remembering what it loaded: one engine per model, device, dtype and options."""
    from granite_cli import engine

    real, cache = engine.load_engine, {}

    def load(model: str, **options):
        key = (model, *sorted((name, repr(value)) for name, value in options.items()))
        if os.environ.get("MUTANT_UNDER_TEST") == "stats":
            # mutmut is mapping which tests reach which function: every test loads its own
            # engine, so code run once per engine (Generator, Prompts, costs) maps to them all.
            return real(model, **options)
        if key not in cache:
            cache[key] = real(model, **options)
        return cache[key]

    load.real = real
    return load


@pytest.fixture(autouse=True)
def _share_loaded_engines(loaded_engines, monkeypatch):
    monkeypatch.setattr("granite_cli.engine.load_engine", loaded_engines)


@pytest.fixture
def real_loading(loaded_engines, monkeypatch):
    """For tests about loading itself: every load reads the model folder again."""
    monkeypatch.setattr("granite_cli.engine.load_engine", loaded_engines.real)


@pytest.fixture
def tiny_engine(loaded_engines, tiny_model):
    """The tiny LLaVA-NeXT model, loaded on the CPU (float32)."""
    return loaded_engines(str(tiny_model), device="cpu")


@pytest.fixture
def broken_model(tmp_path) -> Path:
    """A model folder that passes every check before loading and fails to load: a run that
    says anything about it has tried to load a model."""
    folder = tmp_path / "broken-model"
    folder.mkdir()
    (folder / "config.json").write_text("{ this is not json")
    return folder


@pytest.fixture
def inputs(tmp_path, _inputs_original) -> Path:
    """A folder of mixed inputs: photos of several sizes, a 2-page PDF, a 3-page TIFF,
    a nested folder, a hidden file, and a file of unsupported type (each test's own copy)."""
    import shutil

    return Path(shutil.copytree(_inputs_original, tmp_path / "inputs"))


@pytest.fixture(scope="session")
def _inputs_original(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs-original") / "inputs"
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


@pytest.fixture(scope="session")
def _mixed_originals(tmp_path_factory) -> list[Path]:
    """MIXED_SIZES' pictures, encoded once a session (noise compresses slowly: a second a test)."""
    folder = tmp_path_factory.mktemp("mixed")
    paths = []
    for i, (width, height) in enumerate(MIXED_SIZES):
        path = folder / f"img{i}.png"
        noise(width, height, seed=100 + i).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def mixed_images(tmp_path, _mixed_originals):
    """Pictures of every shape the processor tiles differently (MIXED_SIZES, in that order),
    each test's own copies (a test may write beside them)."""
    import shutil

    return [Path(shutil.copyfile(path, tmp_path / path.name)) for path in _mixed_originals]


@pytest.fixture
def http_root(tmp_path):
    """A web server on loopback serving a folder: (base URL, folder)."""
    import http.server
    import threading
    from functools import partial

    noise(320, 240, 7).save(tmp_path / "remote.png")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # not into the stderr a test reads
            pass

    handler = partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    server.shutdown()
