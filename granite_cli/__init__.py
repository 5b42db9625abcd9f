"""granite-vision: ask questions about images and PDF pages, and caption folders, with IBM Granite Vision."""

__version__ = "0.1.0"

DEFAULT_MODEL = "ibm-granite/granite-vision-3.3-2b"
"""The newest Granite Vision 2B; overridable with --model or $GRANITE_VISION_MODEL."""
