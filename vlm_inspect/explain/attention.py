"""Text-guided attention, as TGA-ZSR computes it (Yu et al., NeurIPS 2024, arXiv 2410.21802).

Verified against the authors' code (github.com/zhyblue424/TGA-ZSR @ 5f2b31c, ``attention_map.py``):
every visual token goes through the final LayerNorm and the projection, the patch tokens are dotted
with the normalised embedding of the text, the map is min-max normalised over the patches, reshaped
to the patch grid and bilinearly upsampled (``align_corners=False``) to the input size. Nothing is
detached: TGA-ZSR trains through this map.

One difference, kept as an option: the authors' code normalises ``encode_image``'s (B, 1+N, D)
output with ``norm(dim=1)``, i.e. each *channel over the token axis* (class token included), where
the paper and DESIGN §3.4 describe L2-normalised patch tokens. ``token_norm="feature"`` (default)
follows the paper/DESIGN; ``token_norm="authors-code"`` reproduces the code. We also guard the
min-max against a constant map (the code divides by zero there).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..models.base import as_text_list


def minmax_over_patches(scores: torch.Tensor) -> torch.Tensor:
    """(B, N) -> (B, N) scaled to [0, 1] per image."""
    lo = scores.amin(dim=1, keepdim=True)
    hi = scores.amax(dim=1, keepdim=True)
    return (scores - lo) / (hi - lo).clamp_min(1e-12)


def upsample_grid(values: torch.Tensor, grid: int, size: tuple[int, int]) -> torch.Tensor:
    """(B, grid*grid) -> (B, H, W) by bilinear interpolation."""
    maps = values.reshape(values.shape[0], 1, grid, grid)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0]


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


def attention_from_tokens(tokens: torch.Tensor, text_features: torch.Tensor, grid: int, size: tuple[int, int],
                          token_norm: str = "feature") -> torch.Tensor:
    """The map of :func:`text_guided_attention` from the (B, 1+N, D) projected tokens of
    ``ClipAdapter.projected_tokens`` (so one forward pass can serve both the logits and the map)."""
    if token_norm not in ("feature", "authors-code", "none"):
        raise ValueError(f"token_norm must be 'feature', 'authors-code' or 'none', got {token_norm!r}")
    b = tokens.shape[0]
    if text_features.shape[0] not in (1, b):
        raise ValueError(f"expected 1 or {b} text features, got {text_features.shape[0]}")
    if token_norm == "feature":
        patches = F.normalize(tokens[:, 1:], dim=-1)
    elif token_norm == "none":  # tokens whose norm carries meaning (the ConSE model's locations)
        patches = tokens[:, 1:]
    else:
        patches = (tokens / tokens.norm(dim=1, keepdim=True).clamp_min(1e-12))[:, 1:]
    scores = torch.einsum("bnd,bd->bn", patches, text_features.expand(b, -1).to(patches.dtype))
    return upsample_grid(minmax_over_patches(scores), grid, size)


def attention_shift(clean_map: torch.Tensor, adv_map: torch.Tensor) -> torch.Tensor:
    """(B,) L2 distance between flattened maps, as TGA-ZSR's attention losses measure it."""
    return (adv_map - clean_map).flatten(1).norm(p=2, dim=1)
