"""Can granite-vision run right in this Python environment? Checked before any work, from package
metadata alone (nothing is imported), so that a transformers too old for the engine is one line
and exit code 2 instead of a failed record for every item, or worse, answers that are silently
wrong (transformers 5.18's chunked prefill).

`REQUIREMENTS` are pyproject.toml's floors (a test holds the two equal); each is the version the
floor lane (`.ci/floors`) tests. `granite-vision info` shows the same check, package by package.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from importlib import metadata

from .errors import UsageError

PYTHON = (3, 11)
#: Each dependency's lowest supported version: pyproject.toml's floors, in its order.
REQUIREMENTS = {
    "typer": "0.29.0",
    "rich": "13.8.0",
    "transformers": "5.24.0",
    "huggingface_hub": "1.31.0",
    "tokenizers": "0.23.1",
    "torch": "2.11.0",
    "torchvision": "0.26.0",
    "accelerate": "1.1.0",
    "numpy": "2.0.2",
    "pillow": "10.3.0",
    "pypdfium2": "4.30.0",
    "pdf2image": "1.17.0",
    "xgrammar": "0.2.8",
    "jsonschema": "4.20.0",
    "fastapi": "0.165.0",
    "uvicorn": "0.55.0",
    "bitsandbytes": "0.50.2",
}
#: Packages only some runs need, by what needs them; every other package every run needs.
FEATURES = {
    "schema": ("xgrammar", "jsonschema"),
    "poppler": ("pdf2image",),
    "serve": ("fastapi", "uvicorn"),
    "quantize": ("bitsandbytes",),  # (no wheel for Intel Macs: not installed there)
}
#: The options that need each feature, as `info` names them.
_OPTIONS = {"schema": "--schema", "poppler": "--pdf-renderer poppler", "serve": "serve", "quantize": "--quantize"}
#: torchvision 0.(m + 15) is built for torch 2.m, and fails beside any other (since torch 2.0).
_TORCHVISION_OFFSET = 15


@dataclass(frozen=True)
class Package:
    """One dependency as installed here, and whether the tool can run right with it."""

    name: str
    needed: str
    installed: str | None
    problem: str | None = None
    """Why the tool cannot run right with what is installed; None when it can."""

    @property
    def supported(self) -> bool:
        return self.problem is None


def packages() -> list[Package]:
    """Every dependency, installed version and verdict, in REQUIREMENTS order."""
    installed = {name: _version(name) for name in REQUIREMENTS}
    return [
        Package(name, needed, installed[name], _problem(name, needed, installed[name], installed))
        for name, needed in REQUIREMENTS.items()
    ]


def python_problem() -> str | None:
    if sys.version_info[:2] >= PYTHON:
        return None
    return f"Python {sys.version.split()[0]} is running; granite-vision needs >= {'.'.join(map(str, PYTHON))}"


def report() -> list[dict]:
    """Python and every dependency as `info --json` shows them: installed, needed (the floor),
    supported, the problem a run would stop on, and `only_for` the options that alone need it."""
    python = python_problem()
    entries = [
        {
            "name": "python",
            "installed": sys.version.split()[0],
            "needed": ".".join(map(str, PYTHON)),
            "supported": python is None,
            "problem": python,
        }
    ]
    for package in packages():
        entry = {
            "name": package.name,
            "installed": package.installed,
            "needed": package.needed,
            "supported": package.supported,
            "problem": package.problem,
        }
        for feature, names in FEATURES.items():
            if package.name in names:
                entry["only_for"] = _OPTIONS[feature]
        entries.append(entry)
    return entries


def check(features: tuple[str, ...] = ()) -> None:
    """Raise `UsageError` (one line) when this environment cannot run the tool right: a package
    missing, older than its floor, or a torchvision built for another torch. `features`
    ("schema", "poppler") adds the packages only those runs need."""
    optional = {name for feature, names in FEATURES.items() if feature not in features for name in names}
    problems = [package.problem for package in packages() if package.problem and package.name not in optional]
    problem = python_problem() or (problems[0] if problems else None)
    if problem is not None:
        more = f" (and {len(problems) - 1} more: see `granite-vision info`)" if len(problems) > 1 else ""
        raise UsageError(problem + more)


def _problem(name: str, needed: str, installed: str | None, everything: dict[str, str | None]) -> str | None:
    upgrade = f'(pip install -U "{name}>={needed}")'
    if installed is None:
        return f"{name} is not installed; granite-vision needs >= {needed} {upgrade}"
    if release(installed) < release(needed):
        return f"{name} {installed} is installed; granite-vision needs >= {needed} {upgrade}"
    torch = everything.get("torch")
    if name == "torchvision" and torch is not None and release(torch)[:1] == (2,):
        built_for = (2, release(installed)[1] - _TORCHVISION_OFFSET)
        if release(torch)[:2] != built_for:
            pair = f"0.{release(torch)[1] + _TORCHVISION_OFFSET}"
            return (
                f"torchvision {installed} is built for torch {built_for[0]}.{built_for[1]}, but torch {torch} is"
                f' installed (pip install "torchvision=={pair}.*")'
            )
    return None


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version ("2.11.0+cu130" -> (2, 11)), trailing zeros dropped, so
    that "5.24" and "5.24.0" compare equal."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    numbers = [int(part) for part in match.group(0).split(".")] if match else [0]
    numbers += [0] * (2 - len(numbers))
    while len(numbers) > 2 and numbers[-1] == 0:
        numbers.pop()
    return tuple(numbers)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
