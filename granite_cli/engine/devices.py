"""Where and how a model runs: device and dtype choices, what each device supports (what
`granite-vision info` lists), seeding, and giving memory back."""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING

from ..errors import UsageError
from . import DEVICE_CHOICES, DTYPES

if TYPE_CHECKING:
    import torch


def resolve_device(spec: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device must exist here."""
    import torch

    spec = spec.strip().lower()
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if spec == "auto":
        return torch.device("cuda:0" if cuda_count else "mps" if mps else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not mps:
            raise UsageError("--device mps: Apple Metal (MPS) is not available on this machine. Hint: use --device cpu")
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        index_text = spec.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise UsageError(f"--device {spec}: expected cuda or cuda:N with N a GPU number")
        index = int(index_text)
        if index >= cuda_count:
            found = f"{cuda_count} CUDA device(s)" if cuda_count else "no CUDA device"
            raise UsageError(
                f"--device {spec}: this machine has {found}. Hint: see `granite-vision info`, or use --device cpu"
            )
        return torch.device(f"cuda:{index}")
    raise UsageError(f"--device {spec!r}: expected one of {DEVICE_CHOICES}")


def supported_dtypes(device: torch.device) -> list[str]:
    """The dtypes a model runs in on this device, best first (what `info` lists): the CPU has no
    fast float16 kernels, Apple's MPS no bfloat16, older GPUs no bfloat16."""
    import torch

    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        return ["bfloat16", "float16", "float32"] if bf16 else ["float16", "float32"]
    if device.type == "mps":
        return ["float16", "float32"]
    return ["float32", "bfloat16"]


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 where the GPU supports it, else float16 on a GPU, float32 on the CPU.
    A dtype the device cannot run is refused here, before any weight is read."""
    import torch

    if spec not in DTYPES:
        raise UsageError(f"--dtype {spec!r}: expected one of {'|'.join(DTYPES)}")
    supported = supported_dtypes(device)
    if spec == "auto":
        return getattr(torch, "float32" if device.type == "cpu" else supported[0])
    if spec not in supported:
        raise UsageError(
            f"--dtype {spec}: not supported on {device} (it runs {', '.join(supported)}; see `granite-vision info`)"
        )
    return getattr(torch, spec)


def describe_devices() -> list[dict]:
    """Every device this machine offers, with its name, memory and dtypes (for `info`)."""
    import torch

    devices = [
        {
            "device": "cpu",
            "name": platform.processor() or platform.machine(),
            "dtypes": supported_dtypes(torch.device("cpu")),
        }
    ]
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        properties = torch.cuda.get_device_properties(index)
        devices.append(
            {
                "device": f"cuda:{index}",
                "name": properties.name,
                "memory_gib": round(properties.total_memory / 2**30, 1),
                "dtypes": supported_dtypes(torch.device("cuda", index)),
            }
        )
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.append({"device": "mps", "name": "Apple Metal", "dtypes": supported_dtypes(torch.device("mps"))})
    return devices


def seed(value: int) -> None:
    """Seed every random generator sampling uses."""
    from transformers import set_seed

    set_seed(value)


def release_memory() -> None:
    """Return cached device memory after a batch failed, so the next attempt can use it."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
