"""Text-guided attention, as TGA-ZSR computes it (Yu et al., NeurIPS 2024, arXiv 2410.21802).

Verified against the authors' code (github.com/zhyblue424/TGA-ZSR @ 5f2b31c, ``attention_map.py``):
every visual token goes through the final LayerNorm and the projection, the patch tokens are dotted
with the normalised embedding of the text, the map is min-max normalised over the patches, reshaped
to the patch grid and bilinearly upsampled (``align_corners=False``) to the input size. Nothing is
detached: TGA-ZSR trains through this map.

One difference, kept as an option: the authors' code normalises ``encode_image``'s (B, 1+N, D)
output with ``norm(dim=1)``, i.e. each *channel over the token axis* (class token included), where
the paper describes L2-normalised patch tokens. ``token_norm="feature"`` (default)
follows the paper; ``token_norm="authors-code"`` reproduces the code. We also guard the
min-max against a constant map (the code divides by zero there).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..models.attention import attention_from_tokens, minmax_over_patches, upsample_grid
from ..models.base import as_text_list

__all__ = ["attention_from_tokens", "attention_shift", "minmax_over_patches", "text_guided_attention",
           "upsample_grid"]


def text_guided_attention(model, pixels: torch.Tensor, texts: str | Sequence[str],
                          token_norm: str = "feature", text_features: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, W) map in [0, 1]: where the CLIP ``model`` finds each image's ``texts``.

    ``texts``: one string per image (TGA-ZSR uses the true class prompt) or one string for all.
    ``text_features`` (B or 1, D), if given, skip encoding ``texts`` (reuse across calls).
    Differentiable with respect to ``pixels`` and the model's weights.
    """
    b = pixels.shape[0]
    if text_features is None:
        texts = as_text_list(texts, b, "texts")
        text_features = model.encode_text(texts)
    tokens = model.projected_tokens(pixels)
    if token_norm == "feature" and hasattr(model, "attention_map"):  # the model's own map (ConSE has another)
        return model.attention_map(tokens, text_features, tuple(pixels.shape[-2:]))
    return attention_from_tokens(tokens, text_features, model.grid, tuple(pixels.shape[-2:]), token_norm)


def attention_shift(clean_map: torch.Tensor, adv_map: torch.Tensor) -> torch.Tensor:
    """(B,) L2 distance between flattened maps, as TGA-ZSR's attention losses measure it."""
    return (adv_map - clean_map).flatten(1).norm(p=2, dim=1)
