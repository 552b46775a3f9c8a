"""The shapes world: a procedural image world the embedded models are trained and evaluated on.

This module implements the shapes world described in ``docs/SHAPES_WORLD.md``: scene sampling, rendering in
three styles, canonical captions, unambiguous VQA pairs, and the zero-shot classification datasets.
It imports only numpy and Pillow; :meth:`ShapesDataset.pixels` imports torch lazily.

All geometry is expressed in units of the reference canvas (``CANVAS = 64``) and scales linearly
with the rendered side, so a scene rendered at 128 px is the 64-px scene magnified.

Example::

    ds = ShapesDataset("shapes-combo@outline", split="test", length=480)
    item = ds[0]          # {"image": (64, 64, 3) uint8, "label": 0, "caption": ..., ...}
    ds.prompts[item["label"]]   # "a photo of a red circle"
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
from PIL import Image, ImageChops, ImageDraw

if TYPE_CHECKING:  # pragma: no cover - typing only; torch is imported lazily
    import torch

__all__ = [
    "CANVAS", "COLOURS", "SHAPES", "SIZES", "POSITIONS", "COUNTS", "STYLES", "SPLITS",
    "HELD_OUT_PAIRS", "PAIRS", "TRAIN_PAIRS", "PLURALS", "SIZE_RANGES", "NOISE_STD",
    "SPLIT_OFFSET", "DATASETS", "ShapeObject", "Scene", "sample_scene", "shape_polygon",
    "object_masks", "render", "caption", "questions", "parse_spec", "sample_rng", "ShapesDataset",
    "zero_shot_labels",
]

# --------------------------------------------------------------------------------------------
# Constants (every number below is listed in docs/SHAPES_WORLD.md, in units of the 64-px reference canvas)
# --------------------------------------------------------------------------------------------

CANVAS = 64

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "middle", "right")
COUNTS: tuple[str, ...] = ("one", "two", "three")
STYLES: tuple[str, ...] = ("plain", "outline", "noisy")
SPLITS: tuple[str, ...] = ("train", "val", "test")

# The spec writes the plural as `{shape}s`; "crosss" is not English, so cross -> "crosses".
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES} | {"cross": "crosses"}

SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (10.0, 14.0), "large": (20.0, 26.0)}
NOISE_STD: dict[str, float] = {"plain": 3.0, "outline": 3.0, "noisy": 25.0}  # pixel values, never scaled
OUTLINE_WIDTH = 3.0          # px at S = 64
BACKGROUND_GREY = (90.0, 170.0)
BACKGROUND_TINT = 10.0       # per channel, uniform in [-10, 10]
COLOUR_JITTER = 15           # per channel, uniform integer in [-15, 15]
MARGIN = 2.0                 # boxes lie this far inside the canvas ...
GAP = 2.0                    # ... and at least this far apart from each other
PLACEMENT_TRIES = 100        # per object; then the scene is resampled
STAR_INNER_RATIO = 0.45
CROSS_ARM = 1.0 / 3.0
MAX_OBJECTS = 3

# Colour-shape pairs, colour-major in the spec's orders. The held-out set is the spec's
# {red, blue, yellow, white} x {star, cross}; iterating PAIRS and filtering gives the spec's order.
PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    (c, s) for c in ("red", "blue", "yellow", "white") for s in ("star", "cross")
)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in PAIRS if p not in HELD_OUT_PAIRS)

# Train and evaluation streams come from disjoint seed ranges (spec: "Splits and determinism").
SPLIT_OFFSET: dict[str, int] = {"train": 0, "val": 10**9, "test": 2 * 10**9}
MAX_INDEX = 10**9

# Anti-aliasing: each output pixel averages SUPERSAMPLE**2 point samples (pixel-centre rule on a
# finer grid). Renders larger than 128 px (display only) use fewer, see _supersample.
SUPERSAMPLE = 8
_CIRCLE_VERTICES = 96        # circle drawn as a regular polygon: < 0.1 % radius error
_MAX_SCENE_TRIES = 10_000    # a 1-3 object scene always fits; this only guards against bugs

DATASETS: tuple[str, ...] = (
    "shapes-shape", "shapes-color", "shapes-size", "shapes-combo", "shapes-count",
    "shapes-heldout", "shapes-scenes",
)


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShapeObject:
    """One object. ``x, y`` is the top-left corner and ``side`` the bounding-box side, in
    ``CANVAS`` units; ``rgb`` is the jittered colour actually drawn."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    side: float
    rgb: tuple[int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x + self.side / 2.0, self.y + self.side / 2.0)

    @property
    def position(self) -> str:
        """``left`` if centre x < S/3, ``right`` if > 2S/3, else ``middle`` (spec)."""
        cx = self.centre[0]
        if cx < CANVAS / 3.0:
            return "left"
        if cx > 2.0 * CANVAS / 3.0:
            return "right"
        return "middle"

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    """Objects sorted left to right by centre x (enforced on construction), and the background."""

    objects: tuple[ShapeObject, ...]
    background: tuple[int, int, int]

    def __post_init__(self) -> None:
        # Captions and questions list objects left to right; sorting here makes that an
        # invariant even for hand-made scenes (ties broken by centre y).
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: o.centre)))
        object.__setattr__(self, "background", tuple(int(v) for v in self.background))


def _boxes_apart(x: float, y: float, side: float, other: ShapeObject) -> bool:
    # "At least 2 px apart": separated by >= GAP along x or along y (i.e. the boxes grown by
    # GAP/2 on every side do not overlap). This is the axis-aligned (Chebyshev) distance, which
    # is never smaller than the Euclidean distance, so the Euclidean reading holds as well.
    return (
        x + side + GAP <= other.x
        or other.x + other.side + GAP <= x
        or y + side + GAP <= other.y
        or other.y + other.side + GAP <= y
    )


def _first_object_pairs(
    pairs: Sequence[tuple[str, str]] | None, shape: str | None, colour: str | None,
    allow_held_out: bool,
) -> list[tuple[str, str]]:
    candidates = list(PAIRS if pairs is None else pairs)
    for c, s in candidates:
        if c not in COLOURS or s not in SHAPES:
            raise ValueError(f"unknown colour-shape pair {(c, s)!r}")
    if shape is not None:
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
        candidates = [p for p in candidates if p[1] == shape]
    if colour is not None:
        if colour not in COLOURS:
            raise ValueError(f"unknown colour {colour!r}; valid: {', '.join(COLOURS)}")
        candidates = [p for p in candidates if p[0] == colour]
    if not allow_held_out:
        candidates = [p for p in candidates if p not in HELD_OUT_PAIRS]
    if not candidates:
        raise ValueError("no colour-shape pair satisfies the constraints on the first object")
    return candidates


def sample_scene(
    rng: np.random.Generator,
    n_objects: int | None = None,
    *,
    allow_held_out: bool = True,
    pairs: Sequence[tuple[str, str]] | None = None,
    shape: str | None = None,
    colour: str | None = None,
    size: str | None = None,
) -> Scene:
    """Sample a scene as the spec describes.

    Args:
        rng: the only source of randomness.
        n_objects: 1-3; ``None`` draws it uniformly from {1, 2, 3}.
        allow_held_out: if False no object is one of ``HELD_OUT_PAIRS`` (base training).
        pairs, shape, colour, size: constraints on the *first* object only (the classification
            datasets force the labelled object); its (colour, shape) is uniform over the pairs
            that satisfy them. Other objects are free: colour and shape uniform over the allowed
            pairs (which is independent uniform colour and shape when held-out pairs are allowed).

    Placement is rejection sampling: each object's top-left corner is uniform over positions that
    keep its box ``MARGIN`` inside the canvas; a position closer than ``GAP`` to an already
    placed box is rejected; after ``PLACEMENT_TRIES`` rejections for one object every object is
    resampled (the object count and the background are kept, so the count stays as drawn).
    """
    if n_objects is None:
        n = int(rng.integers(1, MAX_OBJECTS + 1))
    else:
        n = int(n_objects)
        if not 1 <= n <= MAX_OBJECTS:
            raise ValueError(f"n_objects must be in 1..{MAX_OBJECTS}, got {n_objects}")
    if size is not None and size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid: {', '.join(SIZES)}")
    first_pairs = _first_object_pairs(pairs, shape, colour, allow_held_out)
    free_pairs = PAIRS if allow_held_out else TRAIN_PAIRS

    grey = rng.uniform(*BACKGROUND_GREY)
    tint = rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, size=3)
    background = tuple(int(v) for v in np.clip(np.rint(grey + tint), 0, 255))

    for _ in range(_MAX_SCENE_TRIES):
        objects: list[ShapeObject] = []
        for k in range(n):
            candidates = first_pairs if k == 0 else free_pairs
            obj_colour, obj_shape = candidates[int(rng.integers(len(candidates)))]
            obj_size = size if (k == 0 and size is not None) else SIZES[int(rng.integers(len(SIZES)))]
            side = float(rng.uniform(*SIZE_RANGES[obj_size]))
            jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
            rgb = tuple(int(v) for v in np.clip(np.asarray(COLOURS[obj_colour]) + jitter, 0, 255))
            hi = CANVAS - MARGIN - side
            for _try in range(PLACEMENT_TRIES):
                x, y = (float(v) for v in rng.uniform(MARGIN, hi, size=2))
                if all(_boxes_apart(x, y, side, o) for o in objects):
                    objects.append(ShapeObject(obj_shape, obj_colour, obj_size, x, y, side, rgb))
                    break
            else:
                break  # give up on this layout: resample the whole scene
        else:
            return Scene(objects=tuple(objects), background=background)
    raise RuntimeError("could not place the objects of a scene")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# Geometry and rendering
# --------------------------------------------------------------------------------------------

def shape_polygon(shape: str, x: float, y: float, side: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` in the box with top-left ``(x, y)`` and side ``side`` (y down).

    circle: the inscribed circle (a fine regular polygon); square: the box; triangle: equilateral,
    apex up, base = side, height = side*sqrt(3)/2, centred vertically; diamond: vertices at the
    midpoints of the box sides; star: five points apex up, outer radius side/2, inner radius 0.45
    of it, centred; cross: plus sign spanning the box with arm width side/3.
    """
    cx, cy, r = x + side / 2.0, y + side / 2.0, side / 2.0
    if shape == "circle":
        t = np.arange(_CIRCLE_VERTICES) * (2.0 * math.pi / _CIRCLE_VERTICES)
        return list(zip((cx + r * np.cos(t)).tolist(), (cy + r * np.sin(t)).tolist()))
    if shape == "square":
        return [(x, y), (x + side, y), (x + side, y + side), (x, y + side)]
    if shape == "triangle":
        h = side * math.sqrt(3.0) / 2.0
        top = y + (side - h) / 2.0
        return [(cx, top), (x + side, top + h), (x, top + h)]
    if shape == "diamond":
        return [(cx, y), (x + side, cy), (cx, y + side), (x, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * STAR_INNER_RATIO
            a = -math.pi / 2.0 + k * math.pi / 5.0  # k = 0 is the top point
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "cross":
        a, b = x + side * CROSS_ARM, x + side * (1.0 - CROSS_ARM)
        c, d = y + side * CROSS_ARM, y + side * (1.0 - CROSS_ARM)
        e, f = x + side, y + side
        return [(a, y), (b, y), (b, c), (e, c), (e, d), (b, d), (b, f), (a, f), (a, d), (x, d),
                (x, c), (a, c)]
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; valid: {', '.join(STYLES)}")


# Pillow rasterises a polygon with integer vertices (truncated) and fills every pixel whose
# integer corner lies inside or on it, i.e. about half a sub-pixel beyond the exact edge on
# every side (measured against exact pixel-centre sampling: no shift, area too large by ~0.4 x
# the perimeter). Every polygon is therefore drawn inset by half a sub-pixel. Measured after
# that, at 64 and 128 px, against exact pixel-centre sampling of the spec's shapes: axis-aligned
# edges are exact, areas agree within 1 % (the star within ~3 %: its 36-degree tips lose a
# fraction of a pixel) and no pixel's coverage is off by more than ~0.16. tests/test_shapes.py
# checks this.
_PILLOW_DILATION = 0.5
_DISC_VERTICES = 24


def _inward_normals(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit edge directions and inward unit normals; edge k runs from vertex k to k + 1."""
    e = np.roll(pts, -1, axis=0) - pts
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    x, y = pts[:, 0], pts[:, 1]
    orientation = np.sign(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))
    return e, orientation * np.stack([-e[:, 1], e[:, 0]], axis=1)


@dataclass(frozen=True)
class _Geometry:
    """A shape's polygon for the unit box [0, 1]^2, precomputed once because the inset direction
    of each vertex does not depend on the box: inset(x + side * unit, d) = x + side * unit + d * miter."""

    unit: np.ndarray      # (V, 2) vertices
    miter: np.ndarray     # (V, 2) vertex displacement per unit of inward offset
    normals: np.ndarray   # (V, 2) inward normal of edge k (vertex k -> k + 1)
    reflex: np.ndarray    # (V,) bool, reflex vertices (where the boundary turns outward)
    collapse: float       # a convex polygon's inset by d exists iff d < side * collapse


def _geometry(shape: str) -> _Geometry:
    unit = np.asarray(shape_polygon(shape, 0.0, 0.0, 1.0), dtype=np.float64)
    e, n = _inward_normals(unit)
    n_prev = np.roll(n, 1, axis=0)  # normal of the edge arriving at each vertex
    miter = (n_prev + n) / (1.0 + np.sum(n_prev * n, axis=1, keepdims=True))
    reflex = np.sum(e * n_prev, axis=1) < 0.0  # the outgoing edge heads outward
    # Edge k of the inset keeps its direction while length_k + d * shrink_k > 0.
    length = np.sum((np.roll(unit, -1, axis=0) - unit) * e, axis=1)
    shrink = np.sum((np.roll(miter, -1, axis=0) - miter) * e, axis=1)
    collapse = float(np.min(length[shrink < 0] / -shrink[shrink < 0]))
    return _Geometry(unit, miter, n, reflex, collapse)


_GEOMETRY: dict[str, _Geometry] = {s: _geometry(s) for s in SHAPES}
_DISC_ANGLES = np.arange(_DISC_VERTICES) * (2.0 * math.pi / _DISC_VERTICES)
_DISC = np.stack([np.cos(_DISC_ANGLES), np.sin(_DISC_ANGLES)], axis=1)  # unit circle polygon


def _supersample(size: int) -> int:
    """Sub-pixels per pixel side: SUPERSAMPLE up to 128 px, fewer for large renders (cost)."""
    return max(2, min(SUPERSAMPLE, 1024 // size))


def _coverage(obj: ShapeObject, size: int, style: str) -> tuple[slice, slice, np.ndarray]:
    """Anti-aliased coverage in [0, 1] of one object, on the pixel window holding its box.

    A sub-pixel is covered when its centre is inside the shape (filled styles) or inside the
    shape within ``OUTLINE_WIDTH`` of its boundary (outline style: the outline is drawn inward,
    so it never leaves the bounding box); coverage is the covered fraction of the
    ``SUPERSAMPLE x SUPERSAMPLE`` sub-pixels of each pixel.
    """
    scale = size / CANVAS
    x0 = max(0, math.floor(obj.x * scale) - 1)
    y0 = max(0, math.floor(obj.y * scale) - 1)
    x1 = min(size, math.ceil((obj.x + obj.side) * scale) + 1)
    y1 = min(size, math.ceil((obj.y + obj.side) * scale) + 1)
    ss = _supersample(size)
    sub = scale * ss  # sub-pixels per CANVAS unit
    geom = _GEOMETRY[obj.shape]
    side = obj.side * sub
    # Sub-pixel coordinates of the window: sub-pixel i covers [i, i + 1) (Pillow's convention).
    pts = np.array([obj.x * sub - x0 * ss, obj.y * sub - y0 * ss]) + side * geom.unit
    wh = ((x1 - x0) * ss, (y1 - y0) * ss)
    fill = Image.new("L", wh, 0)
    draw = ImageDraw.Draw(fill)
    # (the cap only matters for renders a few pixels wide, where the inset could invert)
    dilation = min(_PILLOW_DILATION, 0.5 * side * geom.collapse)
    draw.polygon((pts + dilation * geom.miter).ravel().tolist(), fill=255)
    if style == "outline":
        w = OUTLINE_WIDTH * sub
        if obj.shape in ("star", "cross"):
            # Non-convex: the band is the shape AND (the inward strips along each edge, plus
            # discs at the reflex vertices), i.e. exactly the points within w of the boundary.
            band = Image.new("L", wh, 0)
            band_draw = ImageDraw.Draw(band)
            h = w - dilation
            nxt = np.roll(pts, -1, axis=0)
            strips = np.stack([pts, nxt, nxt + h * geom.normals, pts + h * geom.normals], axis=1)
            for strip in strips:
                band_draw.polygon(strip.ravel().tolist(), fill=255)
            for vertex in pts[geom.reflex]:
                band_draw.polygon((vertex + h * _DISC).ravel().tolist(), fill=255)
            fill = ImageChops.darker(fill, band)
        elif w + dilation < side * geom.collapse:
            # Convex: the inset polygon is exactly the part farther than w from the boundary
            # (when it does not exist, the shape is thinner than the outline: all of it is drawn).
            draw.polygon((pts + (w + dilation) * geom.miter).ravel().tolist(), fill=0)
    cov = np.asarray(fill.reduce(ss), dtype=np.float32) * (1.0 / 255.0)
    return slice(y0, y1), slice(x0, x1), cov


def object_masks(scene: Scene, size: int = CANVAS, style: str = "plain") -> np.ndarray:
    """Per-object coverage masks, ``(n_objects, size, size)`` float32 in [0, 1], in scene order.

    Exactly the alpha used by :func:`render` (useful for attention/heatmap evaluation)."""
    _check_style(style)
    masks = np.zeros((len(scene.objects), size, size), dtype=np.float32)
    for i, obj in enumerate(scene.objects):
        ys, xs, cov = _coverage(obj, size, style)
        masks[i, ys, xs] = cov
    return masks


def render(
    scene: Scene,
    size: int = CANVAS,
    style: str = "plain",
    rng: np.random.Generator | None = None,
    noise: bool = True,
) -> np.ndarray:
    """Render ``scene`` as a ``(size, size, 3)`` uint8 image.

    Geometry (and the outline width) scales with ``size / CANVAS``; edges are anti-aliased by
    supersampling (``SUPERSAMPLE`` x ``SUPERSAMPLE`` samples per pixel up to 128 px). Gaussian
    noise of std ``NOISE_STD[style]`` pixel values (not scaled with size) is added to the whole
    image unless ``noise=False``. ``rng`` drives only the noise; ``None`` uses a fixed seed so
    the call is deterministic.
    """
    _check_style(style)
    size = int(size)
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    img = np.empty((size, size, 3), dtype=np.float32)
    img[...] = np.asarray(scene.background, dtype=np.float32)
    for obj in scene.objects:
        ys, xs, cov = _coverage(obj, size, style)
        alpha = cov[..., None]
        window = img[ys, xs]
        img[ys, xs] = window + alpha * (np.asarray(obj.rgb, dtype=np.float32) - window)
    if noise:
        if rng is None:
            rng = np.random.default_rng(0)
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(NOISE_STD[style])
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Language: captions and questions
# --------------------------------------------------------------------------------------------

def _phrase(obj: ShapeObject) -> str:
    return f"a {obj.size} {obj.colour} {obj.shape}"


def caption(scene: Scene) -> str:
    """The canonical caption (spec, "Captions"); objects are listed left to right."""
    objs = scene.objects
    if not 1 <= len(objs) <= MAX_OBJECTS:
        raise ValueError(f"a scene has 1-{MAX_OBJECTS} objects, got {len(objs)}")
    if len(objs) == 1:
        o = objs[0]
        where = "in the middle" if o.position == "middle" else f"on the {o.position}"
        return f"{_phrase(o)} {where}"
    if len({(o.size, o.colour, o.shape) for o in objs}) == 1:
        o = objs[0]
        return f"{COUNTS[len(objs) - 1]} {o.size} {o.colour} {PLURALS[o.shape]}"
    phrases = [_phrase(o) for o in objs]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def questions(
    scene: Scene, rng: np.random.Generator, *, allow_held_out: bool = True,
) -> list[tuple[str, str]]:
    """Every unambiguous (question, answer) pair of the spec's six kinds for ``scene``.

    Order: count; colour of each shape that occurs once; shape of each colour that occurs once;
    one ``is there a {colour} {shape}?`` (answer ``yes`` or ``no`` with probability 1/2 each: a
    ``yes`` asks about a pair in the scene, a ``no`` about a pair absent from it, uniformly);
    size and then position of each colour-shape pair that occurs once. Objects are visited left
    to right. ``rng`` is used only for the yes/no question. With ``allow_held_out=False`` no
    question or answer names a held-out pair; a scene that contains one is then a ValueError.
    """
    objs = scene.objects
    if not 1 <= len(objs) <= MAX_OBJECTS:
        raise ValueError(f"a scene has 1-{MAX_OBJECTS} objects, got {len(objs)}")
    present = [o.pair for o in objs]
    if not allow_held_out and any(p in HELD_OUT_PAIRS for p in present):
        raise ValueError("scene contains a held-out pair but allow_held_out=False")
    shape_counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    colour_counts = {c: sum(o.colour == c for o in objs) for c in COLOURS}
    pair_counts = {p: present.count(p) for p in present}

    qa: list[tuple[str, str]] = [("how many shapes are there?", COUNTS[len(objs) - 1])]
    qa += [(f"what color is the {o.shape}?", o.colour) for o in objs if shape_counts[o.shape] == 1]
    qa += [(f"what shape is the {o.colour} object?", o.shape)
           for o in objs if colour_counts[o.colour] == 1]

    if rng.random() < 0.5:
        distinct = list(dict.fromkeys(present))
        c, s = distinct[int(rng.integers(len(distinct)))]
        qa.append((f"is there a {c} {s}?", "yes"))
    else:
        absent = [p for p in PAIRS if p not in pair_counts
                  and (allow_held_out or p not in HELD_OUT_PAIRS)]
        c, s = absent[int(rng.integers(len(absent)))]
        qa.append((f"is there a {c} {s}?", "no"))

    unique = [o for o in objs if pair_counts[o.pair] == 1]
    qa += [(f"what size is the {o.colour} {o.shape}?", o.size) for o in unique]
    qa += [(f"where is the {o.colour} {o.shape}?", o.position) for o in unique]
    return qa


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------

def parse_spec(spec: str) -> tuple[str, str]:
    """``"shapes-combo@outline"`` -> ``("shapes-combo", "outline")``; the style defaults to plain."""
    name, sep, style = spec.partition("@")
    if not sep:
        style = "plain"
    if name not in DATASETS:
        raise ValueError(f"unknown shapes dataset {name!r} in {spec!r}; valid: {', '.join(DATASETS)}")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r} in {spec!r}; valid: {', '.join(STYLES)}")
    return name, style


_STREAMS = {"scene": 0, "question": 1, "noise": 2}


def sample_rng(
    dataset: str, split: str, index: int, seed: int = 0, stream: str = "scene", style: str = "plain",
) -> np.random.Generator:
    """The generator for one random stream of one sample: a pure function of its arguments.

    The entropy is ``(crc32(dataset), SPLIT_OFFSET[split] + index, stream, style, seed)``: every
    word but the seed is below 2**32 and has a fixed position, and the seed (any size) comes
    last, so two different (split, index, stream, style, seed) of one dataset never share a
    SeedSequence (numpy zero-pads entropy shorter than 4 words, so [1] and [1, 0] would collide;
    hence the fixed layout). Train indices map to [0, 1e9), val to [1e9, 2e9), test to
    [2e9, 3e9): disjoint ranges. ``style`` only enters the noise stream, so the scene is the
    same in every style. crc32 (not ``hash``) keeps this identical across processes.
    """
    if split not in SPLIT_OFFSET:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if not 0 <= index < MAX_INDEX:
        raise ValueError(f"index must be in [0, {MAX_INDEX}), got {index}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    _check_style(style)
    style_id = STYLES.index(style) if stream == "noise" else 0
    entropy = [zlib.crc32(dataset.encode("utf-8")), SPLIT_OFFSET[split] + int(index),
               _STREAMS[stream], style_id, int(seed)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


_TEMPLATES = {
    "shapes-shape": "a photo of a {shape}",
    "shapes-color": "a photo of a {colour} object",
    "shapes-size": "a photo of a {size} object",
    "shapes-combo": "a photo of a {colour} {shape}",
    "shapes-count": "a photo of {count} shapes",
    "shapes-heldout": "a photo of a {colour} {shape}",
    "shapes-scenes": "",
}


class ShapesDataset:
    """A torch-free, indexable, deterministic shapes-world dataset.

    Args:
        name: one of ``DATASETS``, optionally with ``@style`` (``"shapes-combo@outline"``).
        split: ``train`` | ``val`` | ``test``. ``train`` never shows a held-out pair (images,
            captions, questions, class prompts); ``shapes-heldout`` has no train split.
        style: ``plain`` | ``outline`` | ``noisy``; must agree with a style given in ``name``.
        seed: user seed (non-negative); samples are a pure function of
            (dataset, style, split, index, seed), and the scene does not depend on the style.
        length: number of samples (indices are < 10**9).
        image_size: rendered side in pixels.

    Classification datasets label sample ``i`` with class ``i % len(classes)`` and force the
    first (or only) object to that class; ``shapes-count`` forces the number of objects.
    ``shapes-combo`` has 40 classes on train (no held-out pair) and all 48 on val/test.

    Item keys: ``image`` (H, W, 3) uint8, ``label`` (int, -1 for shapes-scenes), ``caption``,
    ``question``, ``answer`` (one pair picked deterministically from :func:`questions`),
    ``scene``, ``index``.
    """

    def __init__(
        self, name: str, split: str = "test", style: str | None = None, seed: int = 0,
        length: int = 1000, image_size: int = CANVAS,
    ) -> None:
        base, spec_style = parse_spec(name)
        if style is None:
            style = spec_style
        else:
            _check_style(style)
            if "@" in name and style != spec_style:
                raise ValueError(f"style {style!r} contradicts the style in {name!r}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        if base == "shapes-heldout" and split == "train":
            raise ValueError("shapes-heldout has no train split: its pairs are held out of training")
        if not 0 <= length <= MAX_INDEX:
            raise ValueError(f"length must be in [0, {MAX_INDEX}], got {length}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.name, self.split, self.style = base, split, style
        self.seed, self.length, self.image_size = int(seed), int(length), int(image_size)
        self.allow_held_out = split != "train"
        self.template = _TEMPLATES[base]

        self._pairs: list[tuple[str, str]] = []
        if base == "shapes-shape":
            self.classes = list(SHAPES)
            self.prompts = [self.template.format(shape=s) for s in SHAPES]
        elif base == "shapes-color":
            self.classes = list(COLOURS)
            self.prompts = [self.template.format(colour=c) for c in COLOURS]
        elif base == "shapes-size":
            self.classes = list(SIZES)
            self.prompts = [self.template.format(size=s) for s in SIZES]
        elif base == "shapes-count":
            self.classes = list(COUNTS)
            self.prompts = [self.template.format(count=n) for n in COUNTS]
        elif base in ("shapes-combo", "shapes-heldout"):
            if base == "shapes-heldout":
                self._pairs = [p for p in PAIRS if p in HELD_OUT_PAIRS]
            else:
                self._pairs = list(TRAIN_PAIRS if split == "train" else PAIRS)
            self.classes = [f"{c} {s}" for c, s in self._pairs]
            self.prompts = [self.template.format(colour=c, shape=s) for c, s in self._pairs]
        else:  # shapes-scenes
            self.classes, self.prompts = [], []

    def __repr__(self) -> str:
        return (f"ShapesDataset({self.name}@{self.style}, split={self.split}, seed={self.seed}, "
                f"length={self.length}, image_size={self.image_size})")

    def __len__(self) -> int:
        return self.length

    def _index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"index out of range for a dataset of length {self.length}")
        return i

    def scene(self, i: int) -> Scene:
        """The scene of sample ``i`` (identical in every style)."""
        i = self._index(i)
        rng = sample_rng(self.name, self.split, i, self.seed, "scene")
        label = self.label(i)
        kw: dict = {"allow_held_out": self.allow_held_out}
        if self.name == "shapes-scenes":
            return sample_scene(rng, None, **kw)
        if self.name == "shapes-count":
            return sample_scene(rng, label + 1, **kw)
        if self.name == "shapes-shape":
            kw["shape"] = self.classes[label]
        elif self.name == "shapes-color":
            kw["colour"] = self.classes[label]
        elif self.name == "shapes-size":
            kw["size"] = self.classes[label]
        else:  # combo / heldout
            kw["pairs"] = [self._pairs[label]]
        return sample_scene(rng, 1, **kw)

    def label(self, i: int) -> int:
        """Class index of sample ``i`` (balanced and deterministic), -1 for shapes-scenes."""
        i = self._index(i)
        return i % len(self.classes) if self.classes else -1

    def image(self, i: int) -> np.ndarray:
        """The ``(image_size, image_size, 3)`` uint8 image of sample ``i``."""
        i = self._index(i)
        noise_rng = sample_rng(self.name, self.split, i, self.seed, "noise", self.style)
        return render(self.scene(i), self.image_size, self.style, rng=noise_rng)

    def __getitem__(self, i: int) -> dict:
        i = self._index(i)
        scene = self.scene(i)
        noise_rng = sample_rng(self.name, self.split, i, self.seed, "noise", self.style)
        q_rng = sample_rng(self.name, self.split, i, self.seed, "question")
        qa = questions(scene, q_rng, allow_held_out=self.allow_held_out)
        question, answer = qa[int(q_rng.integers(len(qa)))]
        return {
            "image": render(scene, self.image_size, self.style, rng=noise_rng),
            "label": self.label(i),
            "caption": caption(scene),
            "question": question,
            "answer": answer,
            "scene": scene,
            "index": i,
        }

    def images(self, indices: Iterable[int] | slice | int) -> np.ndarray:
        """``(B, H, W, 3)`` uint8 images of ``indices`` (an int, a slice or an iterable)."""
        idx = self._indices(indices)
        out = np.empty((len(idx), self.image_size, self.image_size, 3), dtype=np.uint8)
        for k, i in enumerate(idx):
            out[k] = self.image(i)
        return out

    def pixels(self, indices: Iterable[int] | slice | int) -> "torch.Tensor":
        """``(B, 3, H, W)`` float32 tensor in [0, 1] of the images of ``indices``."""
        import torch  # lazy: the shapes world itself does not need torch

        arr = self.images(indices)
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0).contiguous()

    def _indices(self, indices: Iterable[int] | slice | int) -> list[int]:
        if isinstance(indices, slice):
            return list(range(self.length)[indices])
        if isinstance(indices, (int, np.integer)):
            return [self._index(indices)]
        return [self._index(i) for i in indices]


def zero_shot_labels(name: str, split: str = "test") -> tuple[list[str], str]:
    """A zero-shot data set's class names and its prompt template written with one ``{}`` where the
    class name goes (``shapes-combo``: ``["red circle", ...]``, ``"a photo of a {}"``)."""
    data = ShapesDataset(name, split=split, length=0)
    if not data.classes:
        raise ValueError(f"{name} is not a zero-shot classification data set")
    template = re.sub(r"\{\w+\}(?: \{\w+\})*", "{}", data.template)
    return list(data.classes), template
