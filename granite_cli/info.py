"""What `granite-vision info` reports: versions, devices, dtypes, model defaults, renderers.

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
        lines.append(f"  {device['device']}: {device['name']}{memory} (dtypes: {', '.join(device['dtypes'])})")
    lines.append(f"default device: {facts['default_device']}")
    lines.append(f"default model: {facts['default_model']}")
    lines.append(f"model cache: {facts['model_cache']}{' (offline)' if facts['hub_offline'] else ''}")
    renderers = ", ".join(f"{name} ({'available' if ok else 'missing'})" for name, ok in facts["pdf_renderers"].items())
    lines.append(f"pdf renderers: {renderers}")
    return "\n".join(lines)
