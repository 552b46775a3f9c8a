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

from typing import Sequence

import torch
from captum.attr import LayerGradCam
from torch import nn

from ..attacks.base import model_guard
from ..models.base import as_text_list
from .attention import minmax_over_patches, upsample_grid


class TokenGrid(nn.Module):
    """Identity on a (B, C, g, g) view of ViT patch tokens; exists so captum can hook it."""

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return grid


def grad_cam(model, pixels: torch.Tensor, texts: str | Sequence[str]) -> torch.Tensor:
    """(B, H, W) Grad-CAM map in [0, 1] of each image's zero-shot logit for its text."""
    b = pixels.shape[0]
    texts = as_text_list(texts, b, "texts")
    if hasattr(model, "cam_layer"):  # a CNN image side (the ConSE model): its last feature map
        return _cnn_grad_cam(model, pixels, texts)
    visual = model.model.visual
    g = model.grid
    view = TokenGrid()

    def as_grid(_module, _inputs, out):
        # class token, g*g patch tokens, then any deep-prompt tokens (APD / CAPT models) left as they are
        cls, patches, extra = out[:, :1], out[:, 1:1 + g * g], out[:, 1 + g * g:]
        grid = view(patches.transpose(1, 2).reshape(out.shape[0], out.shape[2], g, g))
        return torch.cat([cls, grid.flatten(2).transpose(1, 2), extra], dim=1)

    with torch.no_grad():
        text_features = model.encode_text(texts)

    def score(px: torch.Tensor) -> torch.Tensor:
        return model.logit_scale * (model.encode_image(px) * text_features).sum(-1, keepdim=True)

    blocks = visual.transformer.resblocks
    if len(blocks) < 2:
        raise ValueError("Grad-CAM needs a ViT with at least two blocks")
    handle = blocks[-2].register_forward_hook(as_grid)
    try:
        with model_guard(model):
            cam = LayerGradCam(score, view).attribute(pixels.detach(), target=0, relu_attributions=True)
    finally:
        handle.remove()
    cam = cam.detach().reshape(b, g * g)
    return upsample_grid(minmax_over_patches(cam), g, tuple(pixels.shape[-2:]))


def _cnn_grad_cam(model, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) on ``model.cam_layer()``, a layer with a (B, C, h, w) output."""
    with torch.no_grad():
        text_features = model.encode_text(texts)

    def score(px: torch.Tensor) -> torch.Tensor:
        return model.logit_scale * (model.encode_image(px) * text_features).sum(-1, keepdim=True)

    with model_guard(model):
        cam = LayerGradCam(score, model.cam_layer()).attribute(pixels.detach(), target=0, relu_attributions=True)
    g = cam.shape[-1]
    return upsample_grid(minmax_over_patches(cam.detach().reshape(pixels.shape[0], -1)), g, tuple(pixels.shape[-2:]))
