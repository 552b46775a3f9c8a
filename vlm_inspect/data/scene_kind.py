"""Is an image a shapes-world scene, or something else (a photo, a drawing)?

The app uses this to pick the zero-shot model for an upload: the shapes models only know the shapes
world, so anything else goes to the photo model. The test checks the image against the renderer
(:mod:`vlm_inspect.data.shapes`), step by step; the first step that fails is the answer's ``reason``:

1. **Square**: the renderer only draws squares (within 5 %, for a cropped screenshot).
2. **Not much noisier than the noisy style**: the noise level (a robust estimate from the Laplacian)
   is at most 35 pixel values; the noisy style adds 25. (Random noise fails here, or, once
   averaged down to the canvas, at step 5 as a flat grey.)
3. **A flat grey frame**: every object stays ``MARGIN`` canvas px inside the edge, so the outer
   2 px (of the image shrunk to the 64-px canvas) are background only. At least 75 % of them must
   be within a tolerance of their median colour, and that colour must be a tinted grey
   (``BACKGROUND_GREY`` +- ``BACKGROUND_TINT``, plus a little slack).
4. **Mostly background**: at most three objects of at most 26 px cover at most half the canvas,
   so at least 45 % of the pixels must be the background colour.
5. **Something on it**: at least 0.5 % of the pixels are not background (the smallest object,
   10 px, is ~1 %). A flat image, or noise that averages out to flat grey, is not a scene.
6. **Only palette colours and their edges**: every other pixel must be a ``COLOURS`` entry (with
   the renderer's colour jitter), or, within a pixel (two if averaged) of the background, a mix of the background
   and a palette colour (anti-aliased edges). Mixes are measured in YCbCr with brightness and
   colour mixed independently, because JPEG stores colour at half resolution. The mean distance
   by which the non-background pixels miss this model must be at most 6 pixel values.

Why this works: the grey frame and the half-background rule alone already reject every photo we
tried (natural photos rarely have a flat grey border); step 6 rejects pictures on a grey backdrop
(their residual was >= 10, against <= 4 for every rendered scene). Measured on renders of every
dataset and style at 48-512 px, re-saved as PNG or as JPEG quality 75-90, upscaled by other
resamplers, and on sample photos with crops and resizes (see tests/test_image_input.py).
Known misses: renders smaller than the 64-px canvas (32 px: about half are missed) and the noisy
style at JPEG quality 50 (its border no longer looks flat).

Noise: tolerances grow with the estimated noise, and above 6 pixel values the image is first
averaged over 3x3 pixels (the noisy style: objects >= 10 px, 2 px apart, survive that).
The work is done on the 64-px canvas, so the cost hardly depends on the input size: a few ms,
most of it the downscale of a large image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .shapes import BACKGROUND_GREY, BACKGROUND_TINT, CANVAS, COLOUR_JITTER, COLOURS, MARGIN

__all__ = ["SceneCheck", "check_shapes_scene", "is_shapes_scene"]

_N = CANVAS                                  # analysis size: the reference canvas
_FRAME = int(MARGIN * _N / CANVAS)           # px of the border that is background only
_PALETTE = np.asarray(list(COLOURS.values()), dtype=np.float32)
_YCC = np.array([[0.299, 0.587, 0.114],      # JPEG's (JFIF) RGB -> YCbCr, without the offsets
                 [-0.168736, -0.331264, 0.5],
                 [0.5, -0.418688, -0.081312]], dtype=np.float32)
_YCC_SCALE = 0.65                            # ~ length of a YCbCr row: RGB distance -> YCbCr distance

MAX_ASPECT = 0.05          # |w - h| / max(w, h)
MAX_NOISE = 35.0           # pixel values (the noisy style adds 25)
BLUR_NOISE = 6.0           # above this noise, average 3x3 first
NOISE_K = 3.5              # tolerance: + NOISE_K x the noise left after averaging
BG_TOL = 12.0              # RGB distance of a pixel to the background colour (JPEG, rounding)
LUMA_TOL = 8.0             # brightness distance for "background" next to an edge (JPEG colour halo)
PALETTE_TOL = COLOUR_JITTER * 3 ** 0.5 + 4.0   # the jitter's worst case (26) plus rounding/JPEG
MIX_TOL = 12.0             # YCbCr distance to a background/palette mix (anti-aliasing, JPEG)
MIN_FRAME = 0.75           # share of frame pixels that must be background (JPEG rings near objects)
GREY_SLACK = 5.0           # on the background's range, for noise and JPEG
MIN_BACKGROUND = 0.45      # share of all pixels
MIN_OBJECTS = 0.005        # share of all pixels
MAX_RESIDUAL = 6.0         # mean RGB distance by which non-background pixels miss the model


@dataclass(frozen=True)
class SceneCheck:
    """The answer of :func:`check_shapes_scene` and the statistics it came from (shares are of the
    64x64 analysis image; distances in pixel values)."""

    is_scene: bool
    reason: str                                  # why it is, or the first check that failed
    noise: float = 0.0
    background: tuple[int, int, int] | None = None
    frame_share: float = 0.0
    background_share: float = 0.0
    object_share: float = 0.0
    residual: float = 0.0


def is_shapes_scene(img: Image.Image) -> bool:
    """True if ``img`` looks like a shapes-world render (any style, size, PNG or JPEG); see the
    module docstring for how it decides."""
    return check_shapes_scene(img).is_scene


def check_shapes_scene(img: Image.Image) -> SceneCheck:
    """:func:`is_shapes_scene` with its reason and measurements (for logs and reports)."""
    w, h = img.size
    if w == 0 or h == 0:
        return SceneCheck(False, "the image is empty")
    if abs(w - h) > MAX_ASPECT * max(w, h):
        return SceneCheck(False, f"not square ({w}x{h}); shapes scenes are")
    a = np.asarray(_canvas(img), dtype=np.float32)
    noise = _noise(a)
    if noise > MAX_NOISE:
        return SceneCheck(False, f"much noisier ({noise:.0f}) than any shapes style", noise)
    r = 1 if noise > BLUR_NOISE else 0
    a, count = _box_mean(a, r)
    tol = NOISE_K * noise / np.sqrt(count)   # per pixel: windows are clipped at the border

    frame = np.ones((_N, _N), dtype=bool)
    frame[_FRAME:-_FRAME, _FRAME:-_FRAME] = False
    bg = np.median(a[frame], axis=0)
    background = tuple(int(round(v)) for v in bg)
    is_bg = np.linalg.norm(a - bg, axis=2) <= BG_TOL + tol
    frame_share = float(is_bg[frame].mean())
    stats = dict(noise=noise, background=background, frame_share=frame_share)
    if frame_share < MIN_FRAME:
        return SceneCheck(False, "the border is not one flat colour", **stats)
    lo, hi = BACKGROUND_GREY[0] - BACKGROUND_TINT - GREY_SLACK, BACKGROUND_GREY[1] + BACKGROUND_TINT + GREY_SLACK
    if bg.min() < lo or bg.max() > hi or bg.max() - bg.min() > 2 * BACKGROUND_TINT + 2 * GREY_SLACK:
        return SceneCheck(False, f"the border colour {background} is not a shapes-world grey", **stats)
    stats["background_share"] = background_share = float(is_bg.mean())
    stats["object_share"] = object_share = 1.0 - background_share
    if background_share < MIN_BACKGROUND:
        return SceneCheck(False, "too little of the image is background", **stats)
    if object_share < MIN_OBJECTS:
        return SceneCheck(False, "there is nothing on the background", **stats)

    # Edge pixels: next to background, where background is judged by brightness only (JPEG smears
    # colour across an edge, so the background just outside an object is tinted by it).
    luma = a @ _YCC[0]
    near_bg = np.abs(luma - float(bg @ _YCC[0])) <= LUMA_TOL + _YCC_SCALE * tol
    edge = _dilate(near_bg | is_bg, 1 + r)
    fg = ~is_bg
    p, t = a[fg], tol[fg]
    miss = np.linalg.norm(p[:, None] - _PALETTE, axis=2).min(1) - (PALETTE_TOL + t)
    mix_miss = (_mix_distance(p, bg).min(1) - (MIX_TOL + _YCC_SCALE * t)) / _YCC_SCALE
    miss = np.where(edge[fg], np.minimum(miss, mix_miss), miss)
    stats["residual"] = residual = float(np.maximum(miss, 0.0).mean())
    if residual > MAX_RESIDUAL:
        return SceneCheck(False, f"its colours are not the shapes palette (residual {residual:.1f})", **stats)
    return SceneCheck(True, "a grey background with palette-coloured objects", **stats)


def _canvas(img: Image.Image) -> Image.Image:
    """``img`` as a 64x64 RGB image, box-averaged (undoes the renderer's upscaling; averages noise),
    alpha flattened on white as :func:`vlm_inspect.images.to_rgb` does."""
    if img.mode not in ("RGB", "RGBA", "L"):
        has_alpha = img.mode in ("LA", "PA", "La", "RGBa") or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
    if img.size != (_N, _N):
        img = img.resize((_N, _N), Image.Resampling.BOX)
    if img.mode == "RGBA":
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    return img.convert("RGB")


def _noise(a: np.ndarray) -> float:
    """Noise std from the median absolute Laplacian (Immerkaer's mask, robust to edges)."""
    lap = (a[:-2, :-2] + a[:-2, 2:] + a[2:, :-2] + a[2:, 2:]
           - 2 * (a[:-2, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:] + a[2:, 1:-1]) + 4 * a[1:-1, 1:-1])
    return float(np.median(np.abs(lap))) / (0.6745 * 6.0)  # the mask's gain is sqrt(36) = 6


def _shifts(r: int):
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]


def _box_mean(a: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean over (2r+1)^2 windows clipped to the image, and the number of pixels in each."""
    if r == 0:
        return a, np.ones(a.shape[:2], dtype=np.float32)
    h, w = a.shape[:2]
    pa = np.pad(a, ((r, r), (r, r), (0, 0)))
    pn = np.pad(np.ones((h, w), dtype=np.float32), r)
    total, count = np.zeros_like(a), np.zeros((h, w), dtype=np.float32)
    for dy, dx in _shifts(r):
        total += pa[r + dy:r + dy + h, r + dx:r + dx + w]
        count += pn[r + dy:r + dy + h, r + dx:r + dx + w]
    return total / count[..., None], count


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Pixels within ``r`` (Chebyshev) of a True pixel."""
    h, w = mask.shape
    pm = np.pad(mask, r)
    out = np.zeros_like(mask)
    for dy, dx in _shifts(r):
        out |= pm[r + dy:r + dy + h, r + dx:r + dx + w]
    return out


def _mix_distance(p: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """(n, 8) YCbCr distance of pixels ``p`` (n, 3) to ``bg + s * dY + t * dC``, s, t in [0, 1]: the
    background mixed with each palette colour, brightness (dY) and colour (dC) independently."""
    q = (p - bg) @ _YCC.T
    d = (_PALETTE - bg) @ _YCC.T
    dy, dc = d[:, 0], d[:, 1:]
    s = np.clip(q[:, :1] / np.where(np.abs(dy) < 1e-3, 1e-3, dy), 0.0, 1.0)
    t = np.clip((q[:, 1:] @ dc.T) / np.maximum((dc * dc).sum(1), 1e-3), 0.0, 1.0)
    luma_miss = q[:, :1] - s * dy
    chroma_miss = q[:, None, 1:] - t[..., None] * dc
    return np.sqrt(luma_miss ** 2 + (chroma_miss ** 2).sum(-1))
