"""The Gradio page (layout and listeners). Model work lives in :mod:`vlm_inspect.service`."""
from .layout import build_demo

__all__ = ["build_demo"]
