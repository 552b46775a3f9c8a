"""The text-guided attention map computed from a CLIP adapter's projected tokens.

It lives with the adapters because each adapter knows how its tokens are to be read (a ViT's patch
tokens are L2-normalised; the ConSE model's locations are not): :meth:`ClipAdapter.attention_map`
calls :func:`attention_from_tokens`. :mod:`vlm_inspect.explain` builds the heatmaps on top of it.
The map follows TGA-ZSR (docs/METHODS.md, "Heatmaps").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TOKEN_NORMS = ("feature", "authors-code", "none")


def minmax_over_patches(scores: torch.Tensor) -> torch.Tensor:
    """(B, N) -> (B, N) scaled to [0, 1] per image."""
    lo = scores.amin(dim=1, keepdim=True)
    hi = scores.amax(dim=1, keepdim=True)
    return (scores - lo) / (hi - lo).clamp_min(1e-12)


def upsample_grid(values: torch.Tensor, grid: int, size: tuple[int, int]) -> torch.Tensor:
    """(B, grid*grid) -> (B, H, W) by bilinear interpolation."""
    maps = values.reshape(values.shape[0], 1, grid, grid)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0]


def attention_from_tokens(tokens: torch.Tensor, text_features: torch.Tensor, grid: int, size: tuple[int, int],
                          token_norm: str = "feature") -> torch.Tensor:
    """(B, H, W) map in [0, 1] from the (B, 1+N, D) projected tokens of ``ClipAdapter.projected_tokens``
    (so one forward pass can serve both the logits and the map) and (1 or B, D) text features.

    ``token_norm``: ``feature`` L2-normalises each patch token (the paper); ``authors-code`` normalises
    each channel over the token axis, class token included (what the TGA-ZSR code does); ``none`` keeps
    tokens whose norm carries meaning (the ConSE model's locations)."""
    if token_norm not in TOKEN_NORMS:
        raise ValueError(f"token_norm must be 'feature', 'authors-code' or 'none', got {token_norm!r}")
    b = tokens.shape[0]
    if text_features.shape[0] not in (1, b):
        raise ValueError(f"expected 1 or {b} text features, got {text_features.shape[0]}")
    if token_norm == "feature":
        patches = F.normalize(tokens[:, 1:], dim=-1)
    elif token_norm == "none":
        patches = tokens[:, 1:]
    else:
        patches = (tokens / tokens.norm(dim=1, keepdim=True).clamp_min(1e-12))[:, 1:]
    scores = torch.einsum("bnd,bd->bn", patches, text_features.expand(b, -1).to(patches.dtype))
    return upsample_grid(minmax_over_patches(scores), grid, size)
