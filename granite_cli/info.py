"""What `granite-vision info` reports: versions, devices, dtypes, model defaults, renderers.

The first thing to paste into a bug report, and the quickest way to see why `--device cuda`
is refused or which PDF renderers will work.
"""

from __future__ import annotations

import json
import sys
from importlib import metadata

from . import __version__
from .readers import poppler_available

PACKAGES = ("torch", "torchvision", "transformers", "accelerate", "pillow", "pypdfium2", "pdf2image", "typer", "rich")


def collect(default_model: str) -> dict:
    import os

    from huggingface_hub import constants

    from .engine.devices import describe_devices

    devices = describe_devices()
    versions = {"granite-vision": __version__, "python": sys.version.split()[0]}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "versions": versions,
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
    lines = ["versions:"]
    lines += [f"  {name}: {version or 'not installed'}" for name, version in facts["versions"].items()]
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
