"""Heatmap overlays as uint8 RGB arrays (what the app and the reports show)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image

from ..images import pixels_to_uint8


def _image_array(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        return pixels_to_uint8(image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    return arr.astype(np.uint8)


def overlay(image, heatmap, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend ``heatmap`` (H,W in [0,1], tensor or array; resized to the image) over ``image``
    (pixels (3,H,W)/(1,3,H,W), PIL image or HxWx3 uint8). Returns HxWx3 uint8."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = _image_array(image)
    h = torch.as_tensor(np.asarray(heatmap.detach().cpu() if isinstance(heatmap, torch.Tensor) else heatmap),
                        dtype=torch.float32)
    h = h.squeeze()
    if h.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (H, W), got shape {tuple(h.shape)}")
    if tuple(h.shape) != img.shape[:2]:
        h = F.interpolate(h[None, None], size=img.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    h = torch.nan_to_num(h).clamp(0, 1).numpy()
    colour = colormaps[cmap](h)[..., :3] * 255.0
    out = (1 - alpha) * img.astype(np.float32) + alpha * colour
    return np.clip(out, 0, 255).round().astype(np.uint8)
