"""Fitting the GPU people have: `--quantize int8|nf4` (bitsandbytes; its CPU backend runs here),
`info --fit` and the memory line before a run on a GPU, and Apple Silicon's choices (tested from
the CPU side; what needs Metal is marked `mps` and skipped here)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from helpers import one_error_line, read_jsonl, run_process

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


# --------------------------------------------------------------------------- --quantize
@pytest.fixture(scope="module")
def bf16_bytes(tiny_model, tiny_g4):
    """Each tiny model's weights, loaded in bfloat16 without quantization (measured)."""
    from granite_cli.engine import load_engine, quantize

    return {
        str(folder): quantize.weight_bytes(load_engine(str(folder), device="cpu", dtype="bfloat16").model)
        for folder in (tiny_model, tiny_g4)
    }


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("family", ["llava_next", "granite4_vision"])
def test_only_the_language_models_layers_are_quantized_and_the_bytes_are_the_estimate(
    kind, family, tiny_model, tiny_g4, bf16_bytes
):
    """Every linear layer of the decoder is a bitsandbytes layer; the vision tower, the projectors
    and lm_head stay torch Linear layers in bfloat16; the weights take fewer bytes than in
    bfloat16, as many as `info --fit` estimates from the config."""
    import torch

    from granite_cli.engine import EngineOptions, hf, load_engine, quantize

    folder = str(tiny_model if family == "llava_next" else tiny_g4)
    engine = load_engine(folder, device="cpu", dtype="bfloat16", options=EngineOptions(quantize=kind))
    model = engine.model
    decoder = {id(module) for module in model.get_decoder().modules()}
    layer = {"int8": "Linear8bitLt", "nf4": "Linear4bit"}[kind]
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    inside = [type(module).__name__ for _, module in linears if id(module) in decoder]
    outside = [(name, module) for name, module in linears if id(module) not in decoder]
    assert inside and set(inside) == {layer}
    assert any(name == "lm_head" for name, _ in outside)
    assert not any(quantize._is_quantized(module) for _, module in outside)
    assert {module.weight.dtype for _, module in outside} == {torch.bfloat16}
    assert engine.quantized == kind and engine.settings == {"quantize": kind}

    measured = quantize.weight_bytes(model)
    estimate = quantize.estimate_weights(quantize.parts(hf.meta_model(model.config)), 2, kind)
    assert abs(measured - estimate) <= 0.01 * measured, (measured, estimate)
    saved = bf16_bytes[folder] - measured  # bytes the decoder's weights no longer take
    parts = quantize.parts(hf.meta_model(model.config))
    expected = parts.quantized * 2 - (parts.quantized + parts.rows * 4 if kind == "int8" else parts.quantized // 2)
    assert saved >= 0.9 * expected - parts.quantized // 16, (saved, expected)


def test_a_skip_list_without_lm_head_is_caught(tiny_model):
    """bitsandbytes' own lm_head exclusion is dropped once a skip list is given: ours names it,
    and a model whose head was quantized anyway is refused in one line, not run less accurately."""
    import torch
    from transformers import AutoModelForImageTextToText

    from granite_cli.engine import hf, quantize
    from granite_cli.errors import UsageError

    kept = quantize.kept_modules(hf.meta_model(hf._check_vision_model(str(tiny_model), None, True)))
    assert "lm_head" in kept and "model.vision_tower" in kept and "model.multi_modal_projector" in kept
    without_head = [name for name in kept if name != "lm_head"]
    model = AutoModelForImageTextToText.from_pretrained(
        tiny_model, dtype=torch.bfloat16, quantization_config=quantize.config("nf4", torch.bfloat16, without_head)
    )
    assert type(model.lm_head).__name__ == "Linear4bit"  # what the guard is for
    with pytest.raises(UsageError, match="lm_head was quantized"):
        quantize.check_quantized(model, str(tiny_model))


def test_quantized_caption_answers_and_says_so_in_its_records_and_resume_keeps_them_apart(cli, inputs, tmp_path):
    out = tmp_path / "out.jsonl"
    first = cli("caption", str(inputs / "a.png"), str(inputs / "b.jpg"), "--quantize", "NF4", "-o", str(out))
    assert first.exit_code == 0, first.stderr
    records = read_jsonl(out)
    assert len(records) == 2 and all(r["answer"] and r["settings"]["quantize"] == "nf4" for r in records)
    again = cli("caption", str(inputs / "a.png"), str(inputs / "b.jpg"), "--resume", "-o", str(out))
    assert (
        again.exit_code == 2
        and "another --quantize ('nf4'; this run: none; with --server, as that server was started)" in again.stderr
    )
    assert read_jsonl(out) == records  # refused: the file as it was
    before = tmp_path / "before.jsonl"  # records written before --quantize existed: none was quantized
    before.write_text("".join(json.dumps(r | {"settings": {k: v for k, v in r["settings"].items() if k != "quantize"}})
                              + "\n" for r in records))  # fmt: skip
    older = cli("caption", str(inputs / "a.png"), "--quantize", "nf4", "--resume", "-o", str(before))
    assert older.exit_code == 2 and "another --quantize (none; this run: 'nf4'; with --server" in older.stderr
    more = cli("caption", str(inputs), "--quantize", "nf4", "--resume", "-o", str(out))
    assert more.exit_code == 0, more.stderr
    assert read_jsonl(out)[:2] == records and all(r["settings"]["quantize"] == "nf4" for r in read_jsonl(out))


def test_the_library_loads_quantized_quietly_and_refuses_an_unknown_kind(tiny_model, inputs, caplog):
    """int8 layers log a notice at every layer of every step (bitsandbytes' own): a library
    call logs none of them, and leaves bitsandbytes' logger as it found it."""
    import logging

    import granite_cli
    from granite_cli.errors import UsageError

    logger = logging.getLogger("bitsandbytes.autograd._functions")
    model = granite_cli.load_model(str(tiny_model), device="cpu", quantize="int8", dtype="bfloat16")
    with caplog.at_level(logging.WARNING):
        record = model.ask(inputs / "a.png", "What is shown?", max_new_tokens=3).record
        assert record.ok and record.settings["quantize"] == "int8"
        assert not [entry for entry in caplog.records if "MatMul8bitLt" in entry.getMessage()]
        assert logger.filters == []
        logger.warning("MatMul8bitLt: inputs will be cast (the host's own call)")  # outside ours: as it was
        assert [entry for entry in caplog.records if "MatMul8bitLt" in entry.getMessage()]
    with pytest.raises(UsageError, match=r"quantize='int4': expected one of int8\|nf4"):
        granite_cli.ask(inputs / "a.png", "?", model=str(tiny_model), quantize="int4")
    with pytest.raises(UsageError, match="quantize is how the model was loaded"):
        model.ask(inputs / "a.png", "?", quantize="nf4")


def test_a_backend_that_cannot_run_is_one_line_and_exit_2(cli, inputs, monkeypatch):
    from granite_cli.engine import quantize

    monkeypatch.setattr(quantize, "_probe", lambda kind, device: "no kernel for this CPU")
    result = cli("ask", str(inputs / "a.png"), "?", "--quantize", "int8", "--device", "cpu")
    assert result.exit_code == 2 and result.stdout == ""
    line = one_error_line(result.stderr)
    assert "--quantize int8" in line and "cannot run on cpu here (no kernel for this CPU)" in line


@pytest.mark.slow
def test_without_bitsandbytes_quantize_is_one_line_and_everything_else_runs(tiny_model, inputs, tmp_path):
    """A bitsandbytes that does not import (missing, or its native library broken) stops only
    --quantize, in one line naming the package and its floor."""
    fake = tmp_path / "site" / "bitsandbytes"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('libbitsandbytes_cpu.so: cannot open shared object file')\n")
    env = {"PYTHONPATH": f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = ("ask", str(inputs / "a.png"), "?", "-m", str(tiny_model), "--device", "cpu", "--max-new-tokens", "2")
    refused = run_process(*args, "--quantize", "nf4", env=env)
    assert refused.returncode == 2 and refused.stdout == b""
    line = one_error_line(refused.stderr.decode())
    assert "--quantize nf4: bitsandbytes does not load" in line and "bitsandbytes>=0.50.2" in line
    assert run_process(*args, env=env).returncode == 0


@pytest.mark.slow
def test_serve_quantized_and_its_clients_records_say_so(tiny_model, inputs, tmp_path):
    from test_serve import server

    with server(tiny_model, "--quantize", "nf4") as (url, process):
        assert any("(nf4) at http" in line for line in process.lines)  # the start line says how it loaded
        result = run_process(
            "caption",
            str(inputs / "a.png"),
            "--server",
            url,
            "-o",
            str(tmp_path / "out.jsonl"),
            "--max-new-tokens",
            "3",
        )
        assert result.returncode == 0, result.stderr.decode()
        [record] = read_jsonl(tmp_path / "out.jsonl")
        assert record["answer"] and record["settings"]["quantize"] == "nf4"
        mixed = run_process("ask", str(inputs / "a.png"), "?", "--server", url, "--quantize", "int8")
        assert mixed.returncode == 2 and "give it to granite-vision serve" in mixed.stderr.decode()
        same = run_process("ask", str(inputs / "a.png"), "?", "--server", url, "--quantize", "nf4", "--json")
        assert same.returncode == 0 and json.loads(same.stdout)["settings"]["quantize"] == "nf4"


def test_info_lists_what_each_device_can_quantize(cli):
    result = cli("info", "--json")
    [cpu] = [device for device in json.loads(result.stdout)["devices"] if device["device"] == "cpu"]
    assert cpu["quantize"] == ["int8", "nf4"]  # (bitsandbytes' CPU backend runs here)
    assert "--quantize: int8, nf4" in cli("info").stdout


# --------------------------------------------------------------------------- info --fit
@pytest.fixture(scope="module")
def granite_shape(tmp_path_factory) -> Path:
    """Granite Vision 3.2's shapes without weights: config, processor, a tokenizer of its size."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from fit_table import shape_folder

    return shape_folder("granite-vision-3.2-2b", tmp_path_factory.mktemp("shape") / "granite-vision-3.2-2b")


def fit_json(cli, *args: str) -> dict:
    result = cli("info", "--fit", "--json", *args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    ("dtype", "kind"), [("bfloat16", None), ("bfloat16", "int8"), ("bfloat16", "nf4"), ("float32", None)]
)
def test_fit_estimates_the_weights_a_load_measures(cli, tiny_model, dtype, kind):
    from granite_cli.engine import EngineOptions, load_engine, quantize

    found = fit_json(cli, "-m", str(tiny_model), "--dtype", dtype, *(["--quantize", kind] if kind else []))
    engine = load_engine(str(tiny_model), device="cpu", dtype=dtype, options=EngineOptions(quantize=kind))
    measured = quantize.weight_bytes(engine.model)
    assert abs(found["weights"] - measured) <= 0.01 * measured
    assert found["weights_measured"] is False and found["card"] is None and found["pictures"] == 8


def test_fit_for_granite_shapes_on_cards(cli, granite_shape):
    """Granite Vision 3.2 in bfloat16 weighs what an H100 measured (5.56 GiB allocated); more
    memory, fewer bits or fewer tiles hold at least as many pictures."""
    bf16 = fit_json(cli, "-m", str(granite_shape), "--card", "24")
    assert 5.4 <= bf16["weights_gib"] <= 5.7
    assert bf16["tiles"] == 11 and bf16["budget_gib"] == 22.08 and bf16["pictures"] > 0
    from granite_cli.engine import fit, hf

    shapes = {tiles: hf.shape(str(granite_shape), max_tiles=tiles) for tiles in (None, 3)}
    pictures = {
        (card, kind, tiles): fit.plan(
            shapes[tiles], dtype="bfloat16", quantize_as=kind, max_tiles=None, card=card * GIB, device="card",
            max_memory=None, new_tokens=256, question="Describe this image in detail.",
        ).pictures
        for card in (12, 24) for kind in (None, "int8", "nf4") for tiles in (None, 3)
    }  # fmt: skip
    assert pictures[(24, None, None)] == bf16["pictures"]  # (what `info --fit` says is this formula)
    for (card, kind, tiles), count in pictures.items():
        assert count <= pictures[(24, kind, tiles)] and count <= pictures[(card, kind, 3)]
        assert count <= pictures[(card, "nf4", tiles)]
    assert pictures[(24, None, None)] < pictures[(24, "nf4", 3)]
    text = cli("info", "--fit", "-m", str(granite_shape), "--card", "24", "--quantize", "nf4").stdout
    assert "the language model's layers in nf4" in text and "batch that fits:" in text and "estimate" in text


def test_a_card_that_fits_no_picture_is_one_line_with_the_options_that_would(cli, granite_shape):
    result = cli("info", "--fit", "-m", str(granite_shape), "--card", "8")
    assert result.exit_code == 2 and "batch that fits: 0 pictures" in result.stdout
    line = one_error_line(result.stderr)
    assert "does not fit a card of 8 GiB" in line and "--max-tiles" in line and "--quantize int8" in line
    hopeless = cli("info", "--fit", "-m", str(granite_shape), "--card", "2")
    assert hopeless.exit_code == 2 and "not even with --quantize nf4 --max-tiles 2" in one_error_line(hopeless.stderr)
    wasteful = one_error_line(
        cli("info", "--fit", "-m", str(granite_shape), "--card", "4", "--dtype", "float32").stderr
    )
    assert "--dtype bfloat16" in wasteful


@pytest.mark.slow
def test_every_option_a_refusal_names_fits_as_it_says(cli, granite_shape):
    for given in (["--card", "8"], ["--card", "24", "--max-memory", "6"], ["--card", "4", "--dtype", "float32"]):
        refused = cli("info", "--fit", "-m", str(granite_shape), *given)
        assert refused.exit_code == 2
        ways = re.findall(r"(--[^()]+?) \((\d+) a batch\)", one_error_line(refused.stderr))
        assert ways, refused.stderr
        for way, count in ways:  # each option named fits, as many pictures as it says
            found = fit_json(cli, "-m", str(granite_shape), *given, *way.split())
            assert found["pictures"] == int(count), (given, way)


def test_fit_options_belong_to_fit(cli):
    result = cli("info", "--quantize", "nf4")
    assert result.exit_code == 2 and "--quantize: an option of `info --fit`" in one_error_line(result.stderr)
    for card in ("0.5", "inf", "nan"):
        assert cli("info", "--fit", "--card", card).exit_code == 2


@pytest.mark.slow
def test_the_readme_memory_table_is_the_formulas(granite_shape):
    from fit_table import table

    readme = (ROOT / "README.md").read_text()
    assert table(granite_shape) in readme


def test_a_run_on_a_gpu_says_what_fits_first_and_refuses_what_cannot(cli, inputs, real_loading, monkeypatch, tmp_path):
    """On a GPU (here: the CPU taken for a card of the given size) a line before the run says
    what the weights take and how many pictures a batch holds; a card too small for one picture
    is refused in one line before anything is read or written."""
    from granite_cli.engine import devices

    monkeypatch.setattr(devices, "card_label", lambda device: f"{device} (Test GPU, 1.0 GiB)")
    monkeypatch.setattr(devices, "card_bytes", lambda device: GIB)
    out = tmp_path / "out.jsonl"
    ran = cli("caption", str(inputs / "a.png"), "--device", "cpu", "-o", str(out))
    assert ran.exit_code == 0, ran.stderr
    assert (
        "memory: weights" in ran.stderr and "pictures fit the 0.92 GiB budget on cpu (Test GPU, 1.0 GiB)" in ran.stderr
    )
    monkeypatch.setattr(devices, "card_bytes", lambda device: 2**20)
    refused = cli("caption", str(inputs / "b.jpg"), "--device", "cpu", "-o", str(tmp_path / "new.jsonl"))
    assert refused.exit_code == 2 and not (tmp_path / "new.jsonl").exists()
    assert "does not fit cpu (Test GPU" in one_error_line(refused.stderr)


# --------------------------------------------------------------------------- Apple Silicon
@pytest.mark.parametrize(
    ("torch_version", "macos", "best"),
    [("2.11.0", "15.2", "bfloat16"), ("2.3.0", "14.0", "bfloat16"), ("2.2.2", "14.4", "float16"),
     ("2.11.0", "13.6.1", "float16"), ("2.11.0", "", "float16")],
)  # fmt: skip
def test_metal_runs_bfloat16_where_torch_and_macos_have_it(torch_version, macos, best):
    from granite_cli.engine.devices import mps_dtypes

    assert mps_dtypes(torch_version, macos)[0] == best
    assert mps_dtypes(torch_version, macos)[-2:] == ["float16", "float32"]


def test_auto_on_a_mac_is_metal_in_its_best_dtype_with_pictures_made_there(monkeypatch):
    import platform

    import torch

    from granite_cli.engine import devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(platform, "mac_ver", lambda: ("15.1", ("", "", ""), "arm64"))
    device = devices.resolve_device("auto")
    assert device.type == "mps"
    assert devices.resolve_dtype("auto", device) == torch.bfloat16
    monkeypatch.setattr(platform, "mac_ver", lambda: ("13.5", ("", "", ""), "arm64"))
    assert devices.resolve_dtype("auto", device) == torch.float16
    assert devices.prepare_device(device, torchvision=True) == device
    assert devices.prepare_device(device, torchvision=False) is None
    assert devices.prepare_device(torch.device("cpu"), torchvision=True) is None


def test_metal_refuses_int8_in_one_line():
    import torch

    from granite_cli.engine import quantize

    reason = quantize.problem("int8", torch.device("mps"))
    assert "no Apple Metal kernels for 8-bit layers" in reason and "--quantize nf4" in reason
    assert "8-bit" not in (quantize.problem("nf4", torch.device("mps")) or "")


@pytest.mark.mps
def test_ask_on_metal(tiny_model, inputs):
    import granite_cli

    record = granite_cli.ask(inputs / "a.png", "?", model=str(tiny_model), device="mps", max_new_tokens=3).record
    assert record.ok


@pytest.mark.mps
def test_nf4_on_metal(tiny_model, inputs):
    import granite_cli

    record = granite_cli.ask(inputs / "a.png", "?", model=str(tiny_model), device="mps", quantize="nf4").record
    assert record.ok and record.settings["quantize"] == "nf4"


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_on_a_gpu_answers_and_says_so(tiny_model, inputs, kind):
    import granite_cli

    record = granite_cli.ask(inputs / "a.png", "?", model=str(tiny_model), device="cuda", quantize=kind).record
    assert record.ok and record.settings["quantize"] == kind
