"""Where and how a model runs: device and dtype choices, what each device supports (what
`granite-vision info` lists), how much of a GPU a batch may take, telling an out-of-memory error
from one that broke the device, a seeded stream and the current GPU scoped to our calls, and giving
memory back."""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..errors import UsageError, one_line
from . import DEVICE_CHOICES, DTYPES, QUANTIZE, quantize

if TYPE_CHECKING:
    import torch


def resolve_device(spec: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device must exist here."""
    import torch

    spec = spec.strip().lower()
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = torch.backends.mps.is_available()  # (False where torch was built without Metal)
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


def torchvision_problem() -> str | None:
    """Why torchvision cannot be used beside this torch, or None. Its version may say it fits
    and its build still not (a CPU torch beside a CUDA torchvision): it fails on import
    (`operator torchvision::nms does not exist`)."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return None  # not installed: the environment check says so
    except Exception as exc:  # noqa: BLE001 - RuntimeError from its C++ operators
        import torch

        return (
            f"torchvision does not load beside torch {torch.__version__} ({one_line(exc)}); install the"
            " torchvision built for this torch (see `granite-vision info`)"
        )
    return None


def supported_dtypes(device: torch.device) -> list[str]:
    """The dtypes a model runs in on this device, best first (what `info` lists): the CPU has no
    fast float16 kernels, Apple's MPS no bfloat16, older GPUs no bfloat16."""
    import torch

    if device.type == "cuda":
        # Native bfloat16 from compute capability 8 (Ampere) on, and on ROCm. Not torch's
        # is_bf16_supported(): it answers for the current card, and counts slow emulation.
        bf16 = torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] >= 8
        return ["bfloat16", "float16", "float32"] if bf16 else ["float16", "float32"]
    if device.type == "mps":
        return mps_dtypes(torch.__version__, platform.mac_ver()[0])
    return ["float32", "bfloat16"]


def mps_dtypes(torch_version: str, macos: str) -> list[str]:
    """Apple Metal's dtypes, best first: bfloat16 (Granite's own, float32's range) from torch 2.3
    on macOS 14 (Sonoma) or later, where Metal has it; float16 before that."""
    from ..environment import release

    bf16 = release(torch_version) >= (2, 3) and release(macos or "0") >= (14, 0)
    return ["bfloat16", "float16", "float32"] if bf16 else ["float16", "float32"]


def prepare_device(device: torch.device, torchvision: bool) -> torch.device | None:
    """Where the image processor resizes and normalises pictures: beside the model on a GPU or
    Apple's (the pixels made where they are used, not copied there), when it is torchvision's
    (the fast one; PIL's runs on the CPU only); None: on the CPU, as it would anyway."""
    return device if torchvision and device.type in ("cuda", "mps") else None


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """`auto`: the device's best (`supported_dtypes`' first): bfloat16 where the GPU (or Apple's,
    with macOS 14) supports it, else float16 on a GPU, float32 on the CPU. A dtype the device
    cannot run is refused here, before any weight is read."""
    import torch

    return getattr(torch, choose_dtype(spec, supported_dtypes(device), str(device)))


def choose_dtype(spec: str, supported: list[str], where: str) -> str:
    """`spec` ("auto": `supported`'s first, the best), or one line saying `where` cannot run it."""
    if spec not in DTYPES:
        raise UsageError(f"--dtype {spec!r}: expected one of {'|'.join(DTYPES)}")
    if spec == "auto":
        return supported[0]
    if spec not in supported:
        raise UsageError(
            f"--dtype {spec}: not supported on {where} (it runs {', '.join(supported)}; see `granite-vision info`)"
        )
    return spec


def describe_devices() -> list[dict]:
    """Every device this machine offers, with its name, memory, dtypes and quantizations (for `info`)."""
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
    if torch.backends.mps.is_available():
        devices.append({"device": "mps", "name": "Apple Metal", "dtypes": supported_dtypes(torch.device("mps"))})
    for entry in devices:  # what --quantize can run there (one tiny layer of each kind, tried)
        entry["quantize"] = [kind for kind in QUANTIZE if quantize.problem(kind, torch.device(entry["device"])) is None]
    return devices


@contextlib.contextmanager
def current(device: torch.device) -> Iterator[None]:
    """`device` as torch's current CUDA device while the model works, the caller's put back
    after: kernels and libraries that ask "which GPU" (Triton asks GPU 0 otherwise) agree with
    the model's, and the process's current device is not changed behind its back."""
    import torch

    if device.type != "cuda":
        yield
        return
    with torch.cuda.device(device):
        yield


class SeededStream:
    """A random stream of our own for `--seed`: each call runs with it as torch's generator state
    (CPU, and the model's GPU) and puts the caller's state back after, so a seeded run samples
    reproducibly, batch after batch, without reseeding the rest of the process."""

    def __init__(self, seed: int, device: torch.device):
        self.seed = seed
        self.device = device
        self.states: tuple | None = None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        import torch

        gpu = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=gpu):
            if self.states is None:
                torch.default_generator.manual_seed(self.seed)
                for index in gpu:
                    torch.cuda.default_generators[index].manual_seed(self.seed)
            else:
                torch.set_rng_state(self.states[0])
                for index, state in zip(gpu, self.states[1:], strict=True):
                    torch.cuda.set_rng_state(state, index)
            try:
                yield
            finally:
                self.states = (torch.get_rng_state(), *(torch.cuda.get_rng_state(index) for index in gpu))


def release_memory() -> None:
    """Free what a failed batch held, so the next attempt can use it: reference cycles through
    the failure's frames (collected only by the cycle collector), then the allocator's cache."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


#: Rows per batch at most on a GPU unless --batch-size says otherwise: decode steps are bound by
#: kernel launches, so rows are nearly free until the memory budget says stop.
GPU_ROWS = 128
CPU_ROWS = 8
#: Tokens per prefill chunk on a GPU: prefill activations no longer grow with the batch's prompts.
GPU_PREFILL_CHUNK = 2048


def card_label(device: torch.device) -> str:
    """A GPU as the memory lines name it: `cuda:0 (NVIDIA H200, 139.8 GiB)`."""
    import torch

    properties = torch.cuda.get_device_properties(device)
    return f"{device} ({properties.name}, {properties.total_memory / 2**30:.1f} GiB)"


def card_bytes(device: torch.device) -> int | None:
    """A GPU's memory in bytes; None elsewhere (no budget: the CPU runs by rows)."""
    import torch

    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


#: Messages of CUDA errors after which the device is unusable until the process ends.
_STICKY = ("device-side assert", "illegal memory access", "illegal instruction", "misaligned address",
           "unspecified launch failure", "cuda error: an illegal", "cublas_status_execution_failed",
           "cudnn_status_execution_failed", "nccl error")  # fmt: skip


def failure(exc: BaseException) -> str:
    """ "oom" (the batch was too big: split it), "device" (the GPU is broken: stop the run), or
    "item" (something in the batch: find the item)."""
    import torch

    text = str(exc).lower()
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text:
        return "oom"
    if any(marker in text for marker in _STICKY):
        return "device"
    return "item"
