"""`granite-vision info`: what it says about this machine, as text and as JSON, whatever the machine."""

from __future__ import annotations

import json

import pytest

from granite_cli import DEFAULT_MODEL, __version__
from granite_cli.info import render

CPU = {"device": "cpu", "name": "Test CPU", "dtypes": ["float32", "bfloat16"], "quantize": ["int8", "nf4"]}
GPU = {
    "device": "cuda:0",
    "name": "NVIDIA H200",
    "memory_gib": 139.8,
    "dtypes": ["bfloat16", "float16", "float32"],
    "quantize": ["int8", "nf4"],
}
GPU1 = {
    "device": "cuda:1",
    "name": "NVIDIA L4",
    "memory_gib": 22.0,
    "dtypes": ["float16", "float32"],
    "quantize": ["int8", "nf4"],
}
MPS = {"device": "mps", "name": "Apple Metal", "dtypes": ["bfloat16", "float16", "float32"], "quantize": ["nf4"]}


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """Set what `info` finds: its devices, the hub's cache and offline flag, poppler on the PATH."""

    def set_up(devices: list[dict], *, offline: bool, poppler: bool) -> str:
        from huggingface_hub import constants

        cache = str(tmp_path / "hub-cache")
        monkeypatch.setattr("granite_cli.engine.devices.describe_devices", lambda: [dict(d) for d in devices])
        monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setattr("granite_cli.info.poppler_available", lambda: poppler)
        return cache

    return set_up


@pytest.mark.parametrize(
    ("devices", "default"),
    [([CPU], "cpu"), ([CPU, GPU], "cuda:0"), ([CPU, GPU, GPU1], "cuda:0"), ([CPU, MPS], "mps")],
    ids=["cpu-only", "one-gpu", "two-gpus", "apple"],
)
def test_info_defaults_to_the_first_accelerator_and_lists_every_device(cli, machine, devices, default):
    machine(devices, offline=True, poppler=True)
    facts = json.loads(cli("info", "--json").ok().stdout)
    assert facts["devices"] == devices and facts["default_device"] == default
    text = cli("info").ok().stdout.splitlines()
    listed = text[text.index("devices:") + 1 : text.index(f"default device: {default}")]
    shown = {
        "cpu": "  cpu: Test CPU (dtypes: float32, bfloat16; --quantize: int8, nf4)",
        "cuda:0": "  cuda:0: NVIDIA H200, 139.8 GiB (dtypes: bfloat16, float16, float32; --quantize: int8, nf4)",
        "cuda:1": "  cuda:1: NVIDIA L4, 22.0 GiB (dtypes: float16, float32; --quantize: int8, nf4)",
        "mps": "  mps: Apple Metal (dtypes: bfloat16, float16, float32; --quantize: nf4)",
    }
    assert listed == [shown[device["device"]] for device in devices]


@pytest.mark.parametrize("offline", [True, False])
def test_info_shows_the_model_defaults_cache_and_pdf_renderers(cli, machine, monkeypatch, offline):
    """The default model is $GRANITE_VISION_MODEL where set; the cache says `(offline)` only when
    the hub is off; each PDF renderer is available or missing."""
    if offline:
        cache = machine([CPU], offline=True, poppler=True)
        model, renderers = DEFAULT_MODEL, "pypdfium2 (available), poppler (available)"
    else:
        cache = machine([CPU], offline=False, poppler=False)
        model, renderers = "acme/vision-7b", "pypdfium2 (available), poppler (missing)"
        monkeypatch.setenv("GRANITE_VISION_MODEL", model)
    facts = json.loads(cli("info", "--json").ok().stdout)
    assert facts["default_model"] == model and facts["model_cache"] == cache and facts["hub_offline"] is offline
    assert facts["pdf_renderers"] == {"pypdfium2": True, "poppler": offline}
    text = cli("info").ok().stdout.splitlines()
    assert text[-4:] == [
        "default device: cpu",
        f"default model: {model}",
        f"model cache: {cache}" + (" (offline)" if offline else ""),
        f"pdf renderers: {renderers}",
    ]
    assert text[:2] == [f"granite-vision {__version__}", "environment:"]
    assert facts["versions"]["granite-vision"] == __version__


def test_info_json_is_one_object_indented_by_two_spaces(cli):
    """Readable as it is pasted into a bug report, and one `json.loads` away for a script."""
    out = cli("info", "--json").ok().stdout
    assert out.startswith('{\n  "versions": {\n    "granite-vision": ')
    assert out.endswith("\n}\n") and isinstance(json.loads(out), dict)


def test_a_torchvision_that_does_not_load_is_the_one_package_not_supported(cli, monkeypatch):
    """Its version fits, its build does not (a CUDA torchvision beside a CPU torch): `info` marks
    torchvision alone, and ends as a run would, one line and exit code 2."""
    problem = "torchvision does not load beside torch 2.0 (nms does not exist); install the torchvision built for it"
    monkeypatch.setattr("granite_cli.engine.devices.torchvision_problem", lambda: problem)
    result = cli("info", "--json")
    assert result.exit_code == 2 and result.stderr == f"error: {problem}\n"
    by_name = {entry["name"]: entry for entry in json.loads(result.stdout)["environment"]}
    assert by_name["torchvision"]["supported"] is False and by_name["torchvision"]["problem"] == problem
    others = [entry for name, entry in by_name.items() if name != "torchvision" and entry["installed"]]
    assert others and all(entry["supported"] and entry["problem"] is None for entry in others)
    text = cli("info").stdout
    assert [line for line in text.splitlines() if "NOT SUPPORTED" in line] == [
        f"  torchvision: {by_name['torchvision']['installed']} (needs >= {by_name['torchvision']['needed']}:"
        " NOT SUPPORTED)"
    ]


def test_info_text_shows_every_fact_on_its_own_line():
    """The human rendering of the facts, whole: a package missing or too old, one that only some
    options need, a device with and without memory, the hub offline, a renderer missing."""
    facts = {
        "versions": {"granite-vision": "9.9.9"},
        "environment": [
            {"name": "python", "installed": "3.12.1", "needed": "3.11", "supported": True, "problem": None},
            {"name": "torch", "installed": "2.1.0", "needed": "2.11.0", "supported": False, "problem": "old"},
            {
                "name": "xgrammar",
                "installed": None,
                "needed": "0.2.8",
                "supported": False,
                "problem": "missing",
                "only_for": "--schema",
            },
            {"name": "pdf2image", "installed": "1.17.0", "needed": "1.17.0", "supported": True, "problem": None}
            | {"only_for": "--pdf-renderer poppler"},
        ],
        "devices": [CPU, GPU],
        "default_device": "cuda:0",
        "default_model": "acme/vision-7b",
        "model_cache": "/cache/hub",
        "hub_offline": True,
        "pdf_renderers": {"pypdfium2": False, "poppler": True},
    }
    assert render(facts) == "\n".join(
        [
            "granite-vision 9.9.9",
            "environment:",
            "  python: 3.12.1 (needs >= 3.11: ok)",
            "  torch: 2.1.0 (needs >= 2.11.0: NOT SUPPORTED)",
            "  xgrammar: not installed (needs >= 0.2.8, for --schema: NOT SUPPORTED)",
            "  pdf2image: 1.17.0 (needs >= 1.17.0, for --pdf-renderer poppler: ok)",
            "devices:",
            "  cpu: Test CPU (dtypes: float32, bfloat16; --quantize: int8, nf4)",
            "  cuda:0: NVIDIA H200, 139.8 GiB (dtypes: bfloat16, float16, float32; --quantize: int8, nf4)",
            "default device: cuda:0",
            "default model: acme/vision-7b",
            "model cache: /cache/hub (offline)",
            "pdf renderers: pypdfium2 (missing), poppler (available)",
        ]
    )
    assert json.loads(render(facts, as_json=True)) == facts
