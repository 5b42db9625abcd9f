"""granite-vision: ask questions about images and PDF pages, and caption folders, with IBM Granite Vision.

The library behind the command line (see `granite_cli.api`):

    import granite_cli

    answer = granite_cli.ask("chart.png", "What is shown?").record.answer
    result = granite_cli.caption(["photos/"], output="captions.jsonl")

    model = granite_cli.load_model(device="cuda")  # loaded once, for many calls
    model.ask("a.png", "What is shown?"); model.caption(["scans/"], output="scans.jsonl")
"""

__version__ = "0.1.0"

DEFAULT_MODEL = "ibm-granite/granite-vision-3.3-2b"
"""The newest Granite Vision 2B; overridable with --model or $GRANITE_VISION_MODEL."""

from .errors import DeviceError, InputError, OutputError, UsageError  # noqa: E402 - light, no third-party imports

__all__ = [
    "DEFAULT_MODEL",
    "AskResult",
    "CaptionResult",
    "DeviceError",
    "InputError",
    "OutputError",
    "Record",
    "UsageError",
    "Model",
    "ask",
    "caption",
    "load_model",
]


def __getattr__(name: str):
    """`granite_cli.ask` and friends, imported when first used (so `import granite_cli` and
    `granite-vision --help` stay instant)."""
    if name in ("ask", "caption", "load_model", "Model", "AskResult", "CaptionResult", "AskJob", "CaptionJob"):
        from . import api

        return getattr(api, name)
    if name == "Record":
        from .records import Record

        return Record
    raise AttributeError(f"module 'granite_cli' has no attribute {name!r}")
