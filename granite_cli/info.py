"""What `granite-vision info` reports: versions, devices, dtypes and quantizations, model
defaults, renderers; and `info --fit`, what a model needs on a GPU.

The first thing to paste into a bug report, and the quickest way to see why `--device cuda`
is refused or which PDF renderers will work.
"""

from __future__ import annotations

import json

from . import __version__, environment
from .readers import poppler_available


def collect(default_model: str) -> dict:
    """Every fact `info` shows; `environment` is the check every run makes first (see
    `environment.report`)."""
    import os

    from huggingface_hub import constants

    from .engine.devices import describe_devices, torchvision_problem

    devices = describe_devices()
    checked = environment.report()
    for entry in checked:  # a build that does not fit shows only on import
        if entry["name"] == "torchvision" and entry["supported"] and entry["installed"]:
            problem = torchvision_problem()
            entry.update(supported=problem is None, problem=problem)
    versions = {"granite-vision": __version__} | {entry["name"]: entry["installed"] for entry in checked}
    return {
        "versions": versions,
        "environment": checked,
        "devices": devices,
        "default_device": devices[1]["device"] if len(devices) > 1 else "cpu",
        "default_model": os.environ.get("GRANITE_VISION_MODEL") or default_model,
        "model_cache": str(constants.HF_HUB_CACHE),
        "hub_offline": bool(constants.HF_HUB_OFFLINE),
        "pdf_renderers": {"pypdfium2": versions["pypdfium2"] is not None, "poppler": poppler_available()},
    }


def render(facts: dict, as_json: bool = False) -> str:
    if as_json:
        return json.dumps(facts, indent=2)
    lines = [f"granite-vision {facts['versions']['granite-vision']}", "environment:"]
    for entry in facts["environment"]:
        verdict = "ok" if entry["supported"] else "NOT SUPPORTED"
        only = f", for {entry['only_for']}" if "only_for" in entry else ""
        installed = entry["installed"] or "not installed"
        lines.append(f"  {entry['name']}: {installed} (needs >= {entry['needed']}{only}: {verdict})")
    lines.append("devices:")
    for device in facts["devices"]:
        memory = f", {device['memory_gib']} GiB" if "memory_gib" in device else ""
        kinds = ", ".join(device["quantize"]) or "none"
        lines.append(f"  {device['device']}: {device['name']}{memory} (dtypes: {', '.join(device['dtypes'])};"
                     f" --quantize: {kinds})")  # fmt: skip
    lines.append(f"default device: {facts['default_device']}")
    lines.append(f"default model: {facts['default_model']}")
    lines.append(f"model cache: {facts['model_cache']}{' (offline)' if facts['hub_offline'] else ''}")
    renderers = ", ".join(f"{name} ({'available' if ok else 'missing'})" for name, ok in facts["pdf_renderers"].items())
    lines.append(f"pdf renderers: {renderers}")
    return "\n".join(lines)


def fit(job, card_gib: float | None):
    """`info --fit`: the memory formula for `job`'s model, dtype, quantization and tiles on its
    device (or, with `card_gib`, on a GPU of that size), from the model's config alone: no weight
    is read. Returns the `Fit` and the `check` that refuses a run of which not one picture fits."""
    import functools

    from .engine import devices, hf
    from .engine import fit as formula
    from .engine.hub import model_name
    from .jobs import DEFAULT_PROMPT

    if card_gib is not None:  # a GPU of that size, anywhere (not this machine's): it runs what GPUs run
        card, where = int(card_gib * formula.GIB), f"a card of {card_gib:g} GiB"
        dtypes = ["bfloat16", "float16", "float32"]
    else:
        device = devices.resolve_device(job.device)
        card, dtypes = devices.card_bytes(device), devices.supported_dtypes(device)
        where = str(device) if card is None else devices.card_label(device)
    dtype = devices.choose_dtype(job.dtype, dtypes, where)
    shape = hf.shape(model_name(job.model, job.model_origin), job.revision, job.max_tiles)
    found = formula.plan(
        shape, dtype=dtype, quantize_as=job.quantize, max_tiles=None, card=card, device=where,
        max_memory=job.max_memory, new_tokens=job.max_new_tokens, question=DEFAULT_PROMPT,
    )  # fmt: skip
    check = functools.partial(
        formula.check, found, shape, max_memory=job.max_memory, question=DEFAULT_PROMPT, dtypes=dtypes
    )
    return found, check
