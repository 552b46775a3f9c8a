"""Turning whatever a person hands us (a path, PIL image of any mode, array) into RGB pixels."""
from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError


MAX_PIXELS = 40_000_000  # refuse larger images before decoding them (decompression bombs)
WARNINGS_KEY = "vlm_inspect_warnings"  # img.info entry: what was changed to make the image usable

_REPR = re.compile(r"<_io\.\w+ object at 0x[0-9a-fA-F]+>")


class ImageError(ValueError):
    """An input image could not be read or understood; the message says why."""


def image_warnings(img: Image.Image) -> list[str]:
    """The warnings :func:`load_image` / :func:`to_rgb` attached to ``img`` (one sentence each), e.g. that
    non-finite pixel values were drawn black; empty when the image was used as it came."""
    return list(img.info.get(WARNINGS_KEY, ()))


def _with_warnings(img: Image.Image, warnings: list[str]) -> Image.Image:
    # A new list each time: Image.convert shares the info values with its source, so the caller's
    # image must never see a list we append to later.
    if warnings:
        img.info[WARNINGS_KEY] = list(dict.fromkeys(warnings))
    return img


def _describe(source: object, name: str | None) -> str:
    """How a person knows the image: its name if given, else the path, else 'the uploaded image'."""
    if name:
        return f"image '{name}'"
    if isinstance(source, (str, Path)):
        return f"image '{source}'"
    return "the uploaded image" if isinstance(source, (bytes, bytearray, memoryview)) else "the image"


def _pillow_detail(e: BaseException, source: object) -> str | None:
    """The useful part of Pillow's message, or None when it only repeats the file (its path or a
    ``<_io.BytesIO object at 0x...>``), which our own message already names."""
    if isinstance(e, UnidentifiedImageError):
        return None  # "cannot identify image file '<path>'": says nothing ours does not
    msg = str(e)
    if isinstance(source, (str, Path)):
        for form in (repr(str(source)), f"'{source}'", f'"{source}"', str(source)):
            msg = msg.replace(form, "")
    msg = _REPR.sub("", msg).strip(" :'\"")
    return msg or None


def sniff_image(data: bytes) -> str | None:
    """Pillow's format name ("PNG", "JPEG", ...) if ``data`` starts like an image Pillow can open,
    else None. Reads the header only (nothing is decoded), so a truncated file or one over
    ``MAX_PIXELS`` still gets its format: :func:`load_image` reports those with a reason."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format
    except Image.DecompressionBombError:
        # Raised by Image.open before it returns the image; find which plugin accepted the header.
        Image.init()
        for fmt in list(Image.ID):
            try:
                with Image.open(io.BytesIO(data), formats=[fmt]) as img:
                    return img.format
            except Image.DecompressionBombError:
                return fmt
            except Exception:  # noqa: BLE001 - not this format
                continue
        return None
    except Exception:  # noqa: BLE001 - any failure to parse the header means "not an image"
        return None


def load_image(source: str | Path | bytes | Image.Image | np.ndarray, name: str | None = None) -> Image.Image:
    """Open an image from a path, raw bytes, a PIL image or an HxW(x3/4) array, as RGB.

    ``name`` is what a person knows the image by (say the original file name of an upload whose bytes
    or temporary copy are passed in); error messages use it. Otherwise they name the path, or say
    "the uploaded image" for bytes. Unreadable input raises :class:`ImageError`; what had to be
    changed to use the image (e.g. NaN pixels drawn black) is in :func:`image_warnings`.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        return to_rgb(_array_to_pil(source))
    what = _describe(source, name)
    is_bytes = isinstance(source, (bytes, bytearray, memoryview))
    try:
        img = Image.open(io.BytesIO(bytes(source)) if is_bytes else Path(source))
        if img.width * img.height > MAX_PIXELS:  # checked on the header, before any decoding
            raise ImageError(f"{what} is {img.width}x{img.height} pixels; the limit is "
                             f"{MAX_PIXELS / 1e6:g} megapixels: downscale it first")
        img.load()  # decode now, so truncation shows up here and not later (first frame if animated)
    except FileNotFoundError as e:
        raise ImageError(f"could not read {what}: file not found") from e
    except IsADirectoryError as e:
        raise ImageError(f"could not read {what}: it is a folder, not a file") from e
    except PermissionError as e:
        raise ImageError(f"could not read {what}: permission denied") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"{what} is too large to decode safely (over {MAX_PIXELS / 1e6:g} megapixels): "
                         f"downscale it first") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        try:
            size = len(source) if is_bytes else Path(source).stat().st_size
        except OSError:
            size = None
        if size == 0:
            raise ImageError(f"{what} is an empty file (0 bytes), not an image") from e
        detail = _pillow_detail(e, source)
        raise ImageError(f"could not read {what}: it is not an image file Pillow can read, or it is "
                         f"corrupt or truncated" + (f" (Pillow: {detail})" if detail else "")) from e
    return to_rgb(img)


def _nonfinite_warning(a: np.ndarray) -> str:
    nan, pos, neg = int(np.isnan(a).sum()), int(np.isposinf(a).sum()), int(np.isneginf(a).sum())
    n = nan + pos + neg
    if pos and (nan or neg):
        drawn = "drawn black (NaN, -inf) or white (+inf)"
    else:
        drawn = "drawn white" if pos else "drawn black"
    return (f"the image had {n} non-finite pixel value{'s' if n != 1 else ''} (NaN or infinite); "
            f"{'it was' if n == 1 else 'they were'} ignored when scaling and {drawn}")


def _finite_range(a: np.ndarray) -> tuple[float, float] | None:
    """(min, max) over the finite values, None if there are none: one NaN must not blank the image."""
    finite = a[np.isfinite(a)]
    return (float(finite.min()), float(finite.max())) if finite.size else None


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ImageError(f"expected an HxW, HxWx3 or HxWx4 array, got shape {arr.shape}")
    warnings: list[str] = []
    if arr.dtype != np.uint8:
        a = arr.astype(np.float64)
        bad = ~np.isfinite(a)
        if bad.any():
            warnings.append(_nonfinite_warning(a))
        rng = _finite_range(a)
        if rng is not None and rng[1] <= 1.0 and rng[0] >= 0.0:
            a = a * 255.0
        if bad.any():  # NaN and -inf the darkest value, +inf the brightest
            a = np.where(np.isposinf(a), 255.0, np.where(bad, 0.0, a))
            if a.shape[-1] == 4:  # ... but a non-finite alpha keeps the pixel visible
                a[..., 3] = np.where(bad[..., 3], 255.0, a[..., 3])
        arr = np.clip(a, 0, 255).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return _with_warnings(Image.fromarray(arr), warnings)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of any PIL image: applies EXIF orientation, flattens alpha on white, and
    rescales 16-bit / float grey images to 8 bits instead of clipping them (ignoring NaN and
    infinite values when scaling). Warnings already on ``img`` and any added here are kept
    on the result (see :func:`image_warnings`)."""
    if img.width == 0 or img.height == 0:
        raise ImageError("the image is empty (0 pixels wide or high)")
    warnings = image_warnings(img)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not make the image unusable
        pass
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raw = np.asarray(img, dtype=np.float64)
        bad = ~np.isfinite(raw)
        rng = _finite_range(raw)
        a = (raw - rng[0]) / (rng[1] - rng[0]) * 255.0 if rng and rng[1] > rng[0] else np.zeros_like(raw)
        if bad.any():  # NaN and -inf the darkest value, +inf the brightest
            warnings.append(_nonfinite_warning(raw))
            a = np.where(np.isposinf(raw), 255.0, np.where(bad, 0.0, a))
        img = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))  # 2-D uint8: mode "L"
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out = Image.alpha_composite(bg, rgba).convert("RGB")  # alpha_composite drops info
    else:
        out = img.convert("RGB")
    out.info.pop(WARNINGS_KEY, None)  # convert copies info: replace, never share, the list
    return _with_warnings(out, warnings)


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


def image_pixels(image: Any, size: int, loaded: bool = False) -> torch.Tensor:
    """The one way an image becomes a model's input: any image :func:`load_image` reads -> (1, 3, size,
    size) pixels in [0, 1], shorter side resized (bicubic) and the centre square taken, as CLIP does.
    ``loaded``: ``image`` is what :func:`load_image` returned (a large photo is not converted again)."""
    return pil_to_pixels(resize_center_crop(image if loaded else load_image(image), size))


def to_pixels(images: Iterable[Any], size: int) -> torch.Tensor:
    """Stack images into (B, 3, size, size) pixels in [0, 1]; HxWx3 uint8 arrays already at ``size`` (a
    data set's renders) are taken as they are, anything else goes through :func:`image_pixels`."""
    out = []
    for img in images:
        if isinstance(img, np.ndarray) and img.shape[:2] == (size, size):
            out.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)[None])
        else:
            out.append(image_pixels(img, size))
    return torch.cat(out)


def pixels_to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(3,H,W) or (1,3,H,W) pixels in [0,1] -> HxWx3 uint8."""
    if pixels.ndim == 4:
        if pixels.shape[0] != 1:
            raise ValueError(f"expected a single image, got a batch of {pixels.shape[0]}")
        pixels = pixels[0]
    arr = pixels.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return np.ascontiguousarray(arr)


def resize_pixels(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """A batch of pixels at another model's input size (bilinear, antialiased; differentiable), e.g. one
    side's adversarial image shown to the other side's model."""
    if pixels.shape[-1] == size and pixels.shape[-2] == size:
        return pixels
    return F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).clamp(0, 1)
