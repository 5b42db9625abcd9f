"""granite-vision: ask questions about images and PDF pages, and caption folders, with IBM Granite Vision."""

__version__ = "0.1.0"
