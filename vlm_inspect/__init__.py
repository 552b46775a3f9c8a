"""vlm_inspect: see how FGSM/BIM/PGD perturbations change what vision-language models predict,
say and look at - for an undefended and a defended model side by side.

The public API is re-exported here lazily (``import vlm_inspect.data.shapes`` stays torch-free):

>>> from vlm_inspect import load, PGD, zero_shot_ce, text_guided_attention
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "models", "list_presets": "models", "ClipAdapter": "models", "CaptionerAdapter": "models",
    "VqaAdapter": "models",
    "FGSM": "attacks", "BIM": "attacks", "PGD": "attacks", "AttackResult": "attacks", "ATTACKS": "attacks",
    "zero_shot_ce": "objectives", "caption_nll": "objectives", "answer_nll": "objectives",
    "embedding_cosine": "objectives", "OBJECTIVES": "objectives",
    "text_guided_attention": "explain", "grad_cam": "explain", "overlay": "explain", "attention_shift": "explain",
    "save_adapter": "checkpoints", "CheckpointError": "checkpoints",
    "load_image": "images", "ImageError": "images",
    "Registry": "registry",
}

__all__ = ["__version__", *_EXPORTS.keys()]  # noqa: PLE0604 - the lazy exports are strings


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'vlm_inspect' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
