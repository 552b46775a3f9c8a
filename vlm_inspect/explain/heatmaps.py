"""The heatmap methods the page, ``inspect`` and the service offer: :data:`HEATMAPS`.

Each entry is a function ``(model, pixels, prompt, text_features, tokens=None) -> (B, H, W)`` map in
[0, 1] for a CLIP-family adapter: ``prompt`` is the class prompt the map explains, ``text_features``
its (1, D) embedding, and ``tokens`` the (B, 1+N, D) projected tokens of the forward pass that gave the
probabilities (for entries registered with ``uses_tokens=True``, which then cost no extra pass; the
service computes those inside its no-grad fp32 block, the others with gradients).

Adding a heatmap: a function registered here with ``@HEATMAPS.register("name", label=..., paper=...)``.
"""
from __future__ import annotations

from typing import Any

import torch

from ..registry import Registry
from .attention import text_guided_attention
from .gradcam import grad_cam

HEATMAPS: Registry = Registry("heatmap")


@HEATMAPS.register("attention", label="text-guided attention", paper="TGA-ZSR, Yu et al. 2024", uses_tokens=True)
def attention_heatmap(model: Any, pixels: torch.Tensor, prompt: str, text_features: torch.Tensor,
                      tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Where the model finds the prompt: patch tokens dotted with the prompt's embedding (docs/METHODS.md)."""
    if tokens is not None:
        return model.attention_map(tokens, text_features, tuple(pixels.shape[-2:]))
    return text_guided_attention(model, pixels, prompt, text_features=text_features)


@HEATMAPS.register("gradcam", label="Grad-CAM", paper="Selvaraju et al. 2017", uses_tokens=False)
def gradcam_heatmap(model: Any, pixels: torch.Tensor, prompt: str, text_features: torch.Tensor,
                    tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Grad-CAM of the zero-shot logit of the prompt (captum's LayerGradCam)."""
    return grad_cam(model, pixels, prompt)


def heatmap_help() -> str:
    """``attention: text-guided attention (TGA-ZSR, Yu et al. 2024), gradcam: ...`` for help texts."""
    return ", ".join(f"{name}: {HEATMAPS.describe(name)}" for name in HEATMAPS.list())
