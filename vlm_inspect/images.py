"""Turning whatever a person hands us (a path, PIL image of any mode, array) into RGB pixels."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


MAX_PIXELS = 40_000_000  # refuse larger images before decoding them (decompression bombs)


class ImageError(ValueError):
    """An input image could not be read or understood; the message says why."""


def load_image(source: str | Path | bytes | Image.Image | np.ndarray) -> Image.Image:
    """Open an image from a path, raw bytes, a PIL image or an HxW(x3/4) array, as RGB.

    Corrupt or unreadable files raise :class:`ImageError` naming the file.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        return to_rgb(_array_to_pil(source))
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        if isinstance(source, (bytes, bytearray)):
            img = Image.open(io.BytesIO(source))
        else:
            img = Image.open(Path(source))
        if img.width * img.height > MAX_PIXELS:  # checked on the header, before any decoding
            raise ImageError(f"{name} is {img.width}x{img.height} pixels; the limit is "
                             f"{MAX_PIXELS / 1e6:g} megapixels: downscale it first")
        img.load()  # decode now, so truncation shows up here and not later (first frame if animated)
    except FileNotFoundError as e:
        raise ImageError(f"image file not found: {source}") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name} is too large to decode safely: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        size = len(source) if isinstance(source, (bytes, bytearray)) else Path(source).stat().st_size
        if size == 0:
            raise ImageError(f"{name} is an empty file (0 bytes), not an image") from e
        raise ImageError(f"could not read image {name}: it is not an image file Pillow can read, or it is "
                         f"corrupt or truncated ({type(e).__name__}: {e})") from e
    return to_rgb(img)


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ImageError(f"expected an HxW, HxWx3 or HxWx4 array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        a = arr.astype(np.float64)
        if a.size and a.max() <= 1.0 and a.min() >= 0.0:
            a = a * 255.0
        arr = np.clip(a, 0, 255).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return Image.fromarray(arr)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of any PIL image: applies EXIF orientation, flattens alpha on white, and
    rescales 16-bit / float grey images to 8 bits instead of clipping them."""
    if img.width == 0 or img.height == 0:
        raise ImageError("the image is empty (0 pixels wide or high)")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not make the image unusable
        pass
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.round().astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic) and take the centre square, as CLIP does."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def pil_to_pixels(img: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float32 in [0, 1]."""
    arr = np.asarray(to_rgb(img), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def pixels_to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(3,H,W) or (1,3,H,W) pixels in [0,1] -> HxWx3 uint8."""
    if pixels.ndim == 4:
        if pixels.shape[0] != 1:
            raise ValueError(f"expected a single image, got a batch of {pixels.shape[0]}")
        pixels = pixels[0]
    arr = pixels.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return np.ascontiguousarray(arr)
