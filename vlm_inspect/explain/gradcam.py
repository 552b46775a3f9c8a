"""Grad-CAM for CLIP ViTs through captum's ``LayerGradCam``.

captum's Grad-CAM wants a layer with a spatial (B, C, h, w) output, which a ViT does not have. For
the duration of the call we route the last residual block's patch tokens through an identity
module that sees them as a (B, C, grid, grid) map; captum hooks that module. The tokens are taken
at the *input* of the last block (the output of the one before): with class-token pooling the last
block's own patch outputs never reach the image feature, so their gradient is zero (the usual choice
for ViT Grad-CAM, e.g. ``blocks[-1].norm1`` in pytorch-grad-cam). The score is the zero-shot logit of
each image's text.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from captum.attr import LayerGradCam
from torch import nn

from ..models.base import model_guard
from ..models.base import as_text_list
from .attention import minmax_over_patches, upsample_grid


class TokenGrid(nn.Module):
    """Identity on a (B, C, g, g) view of ViT patch tokens; exists so captum can hook it."""

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return grid


def grad_cam(model, pixels: torch.Tensor, texts: str | Sequence[str]) -> torch.Tensor:
    """(B, H, W) Grad-CAM map in [0, 1] of each image's zero-shot logit for its text. A CNN image side
    (the ConSE model) names its layer with ``cam_layer()``; a ViT's patch tokens are viewed as a grid."""
    b = pixels.shape[0]
    texts = as_text_list(texts, b, "texts")
    with torch.no_grad():
        text_features = model.encode_text(texts)

    def score(px: torch.Tensor) -> torch.Tensor:
        return model.logit_scale * (model.encode_image(px) * text_features).sum(-1, keepdim=True)

    layer, handle = (model.cam_layer(), None) if hasattr(model, "cam_layer") else _vit_token_grid(model)
    try:
        with model_guard(model):
            cam = LayerGradCam(score, layer).attribute(pixels.detach(), target=0, relu_attributions=True)
    finally:
        if handle is not None:
            handle.remove()
    g = cam.shape[-1]
    return upsample_grid(minmax_over_patches(cam.detach().reshape(b, -1)), g, tuple(pixels.shape[-2:]))


def _vit_token_grid(model) -> tuple[TokenGrid, Any]:
    """A :class:`TokenGrid` fed the patch tokens at the input of the last block, and the hook's handle."""
    g = model.grid
    view = TokenGrid()

    def as_grid(_module, _inputs, out):
        # class token, g*g patch tokens, then any deep-prompt tokens (APD / CAPT models) left as they are
        cls, patches, extra = out[:, :1], out[:, 1:1 + g * g], out[:, 1 + g * g:]
        grid = view(patches.transpose(1, 2).reshape(out.shape[0], out.shape[2], g, g))
        return torch.cat([cls, grid.flatten(2).transpose(1, 2), extra], dim=1)

    # the adapter's own blocks (a transformers CLIP), else open_clip's
    blocks = model.vision_blocks() if hasattr(model, "vision_blocks") else model.model.visual.transformer.resblocks
    if len(blocks) < 2:
        raise ValueError("Grad-CAM needs a ViT with at least two blocks")
    return view, blocks[-2].register_forward_hook(as_grid)
