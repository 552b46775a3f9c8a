"""The Gradio page (layout and listeners). Model work lives in :mod:`vlm_inspect.service`.

Imported lazily: ``python app.py`` sets Gradio's upload folder before Gradio is first imported.
"""

__all__ = ["build_demo"]


def __getattr__(name: str):
    if name == "build_demo":
        from .layout import build_demo

        return build_demo
    raise AttributeError(name)
