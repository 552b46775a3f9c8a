"""Tests of the shapes world against docs/SHAPES_WORLD.md (not just that the code runs).

Geometry and language are checked against independent brute-force recomputations from the spec's
definitions: exact pixel-centre sampling of each shape, answers recomputed from the scene.
"""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np
import pytest

from vlm_inspect.data import shapes as sw
from vlm_inspect.data.shapes import (
    CANVAS, COLOURS, COUNTS, DATASETS, HELD_OUT_PAIRS, PLURALS, SHAPES, SIZES, STYLES,
    Scene, ShapeObject, ShapesDataset, caption, object_masks, parse_spec, questions, render,
    sample_scene,
)

GREY = (128, 128, 128)


def obj(shape="circle", colour="red", size="small", x=10.0, y=20.0, side=12.0, rgb=None):
    return ShapeObject(shape, colour, size, float(x), float(y), float(side), rgb or COLOURS[colour])


def at_centre_x(cx, shape="circle", colour="red", size="small", side=12.0, y=20.0):
    return obj(shape, colour, size, cx - side / 2, y, side)


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(1234)
    return [sample_scene(rng) for _ in range(1500)]


# ------------------------------------------------------------------------------------------
# Constants
# ------------------------------------------------------------------------------------------

def test_constants_follow_spec():
    assert CANVAS == 64
    assert list(COLOURS) == ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    assert COLOURS["red"] == (220, 40, 40) and COLOURS["green"] == (40, 180, 60)
    assert COLOURS["blue"] == (40, 80, 220) and COLOURS["yellow"] == (230, 210, 40)
    assert COLOURS["purple"] == (150, 60, 190) and COLOURS["orange"] == (240, 140, 30)
    assert COLOURS["white"] == (245, 245, 245) and COLOURS["black"] == (20, 20, 20)
    assert SHAPES == ("circle", "square", "triangle", "diamond", "star", "cross")
    assert SIZES == ("small", "large") and COUNTS == ("one", "two", "three")
    assert STYLES == ("plain", "outline", "noisy")
    assert HELD_OUT_PAIRS == {(c, s) for c in ("red", "blue", "yellow", "white") for s in ("star", "cross")}
    assert len(sw.PAIRS) == 48 and len(sw.TRAIN_PAIRS) == 40
    # every colour and every shape still occurs in training with some partner
    assert {c for c, _ in sw.TRAIN_PAIRS} == set(COLOURS) and {s for _, s in sw.TRAIN_PAIRS} == set(SHAPES)
    assert PLURALS == {"circle": "circles", "square": "squares", "triangle": "triangles",
                       "diamond": "diamonds", "star": "stars", "cross": "crosses"}


# ------------------------------------------------------------------------------------------
# Scene sampling
# ------------------------------------------------------------------------------------------

def test_colours_within_jitter(scenes):
    jit = []
    for sc in scenes:
        for o in sc.objects:
            d = np.array(o.rgb) - np.array(COLOURS[o.colour])
            assert np.all(np.abs(d) <= 15), (o.colour, o.rgb)
            assert all(0 <= v <= 255 for v in o.rgb)
            if o.colour not in ("white", "black"):  # no clipping for these: the full range shows
                jit.append(d)
    jit = np.concatenate(jit)
    assert jit.min() == -15 and jit.max() == 15 and abs(jit.mean()) < 0.5


def test_background_range(scenes):
    bgs = np.array([sc.background for sc in scenes])
    assert bgs.min() >= 80 and bgs.max() <= 180            # grey [90,170] + tint [-10,10]
    assert np.ptp(bgs, axis=1).max() <= 20                  # channels differ only by the tints
    grey = bgs.mean(axis=1)
    assert grey.min() < 95 and grey.max() > 165             # the grey level spans its range


def test_sizes_margins_and_gaps(scenes):
    counts = np.zeros(4, int)
    sides = {"small": [], "large": []}
    for sc in scenes:
        objs = sc.objects
        counts[len(objs)] += 1
        for o in objs:
            sides[o.size].append(o.side)
            assert o.x >= 2 - 1e-9 and o.y >= 2 - 1e-9
            assert o.x + o.side <= CANVAS - 2 + 1e-9 and o.y + o.side <= CANVAS - 2 + 1e-9
        for i in range(len(objs)):
            for j in range(i + 1, len(objs)):
                a, b = objs[i], objs[j]
                gap_x = max(b.x - (a.x + a.side), a.x - (b.x + b.side))
                gap_y = max(b.y - (a.y + a.side), a.y - (b.y + b.side))
                assert max(gap_x, gap_y) >= 2 - 1e-9, (a, b)
        cxs = [o.centre[0] for o in objs]
        assert cxs == sorted(cxs)                           # stored left to right
    small, large = np.array(sides["small"]), np.array(sides["large"])
    assert small.min() >= 10 and small.max() <= 14 and large.min() >= 20 and large.max() <= 26
    assert small.min() < 10.2 and small.max() > 13.8 and large.min() < 20.3 and large.max() > 25.7
    assert abs(len(small) / (len(small) + len(large)) - 0.5) < 0.05
    frac = counts[1:] / counts.sum()                        # 1-3 objects, uniform
    assert np.all(np.abs(frac - 1 / 3) < 0.05), frac


def test_position_thresholds():
    assert at_centre_x(21.0).position == "left"             # < 64/3 = 21.33
    assert at_centre_x(64 / 3).position == "middle"
    assert at_centre_x(42.66).position == "middle"
    assert at_centre_x(128 / 3).position == "middle"
    assert at_centre_x(42.7).position == "right"            # > 2*64/3 = 42.67
    assert at_centre_x(30).centre == (30.0, 26.0)


def test_sample_scene_constraints():
    rng = np.random.default_rng(7)
    for _ in range(300):
        sc = sample_scene(rng, 3, allow_held_out=False, shape="star")
        assert len(sc.objects) == 3
        assert any(o.shape == "star" for o in sc.objects)
        assert all(o.pair not in HELD_OUT_PAIRS for o in sc.objects)
    for _ in range(100):
        (o,) = sample_scene(rng, 1, colour="white", size="large").objects
        assert o.colour == "white" and o.size == "large"
        (o,) = sample_scene(rng, 1, pairs=[("red", "cross")]).objects
        assert o.pair == ("red", "cross")
    with pytest.raises(ValueError):
        sample_scene(rng, 1, allow_held_out=False, pairs=[("red", "star")])
    with pytest.raises(ValueError):
        sample_scene(rng, 4)
    with pytest.raises(ValueError):
        sample_scene(rng, 1, shape="hexagon")


def test_three_large_objects_always_placed():
    rng = np.random.default_rng(3)
    for _ in range(200):
        sc = sample_scene(rng, 3, size="large")
        assert len(sc.objects) == 3


# ------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------

def _inside_polygon(poly, px, py):
    poly = np.asarray(poly)
    inside = np.zeros(np.broadcast(px, py).shape, bool)
    for k in range(len(poly)):
        (x1, y1), (x2, y2) = poly[k], poly[(k + 1) % len(poly)]
        crosses = (y1 > py) != (y2 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            xi = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (px < xi)
    return inside


def _dist_to_boundary(poly, px, py):
    poly = np.asarray(poly)
    d = np.full(px.shape, np.inf)
    for k in range(len(poly)):
        a, b = poly[k], poly[(k + 1) % len(poly)]
        ab = b - a
        t = np.clip(((px - a[0]) * ab[0] + (py - a[1]) * ab[1]) / (ab @ ab), 0, 1)
        d = np.minimum(d, np.hypot(px - a[0] - t * ab[0], py - a[1] - t * ab[1]))
    return d


def _exact_polygon(o: ShapeObject):
    """The spec's geometry written out independently of the module."""
    x, y, s = o.x, o.y, o.side
    cx, cy, r = x + s / 2, y + s / 2, s / 2
    if o.shape == "square":
        return [(x, y), (x + s, y), (x + s, y + s), (x, y + s)]
    if o.shape == "triangle":
        h = s * math.sqrt(3) / 2
        return [(cx, cy - h / 2), (x + s, cy + h / 2), (x, cy + h / 2)]
    if o.shape == "diamond":
        return [(cx, y), (x + s, cy), (cx, y + s), (x, cy)]
    if o.shape == "star":
        return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5),
                 cy - (r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5)) for k in range(10)]
    if o.shape == "cross":
        a, b, c, d = x + s / 3, x + 2 * s / 3, y + s / 3, y + 2 * s / 3
        return [(a, y), (b, y), (b, c), (x + s, c), (x + s, d), (b, d), (b, y + s), (a, y + s),
                (a, d), (x, d), (x, c), (a, c)]
    raise AssertionError(o.shape)


def _exact_coverage(o: ShapeObject, size: int, style: str, ss: int = 8):
    """Fraction of ss x ss pixel-centre samples inside the shape (or its 3-px inner band)."""
    k = size / CANVAS
    lo = max(0, math.floor(o.x * k) - 1), max(0, math.floor(o.y * k) - 1)    # box window only
    hi = min(size, math.ceil((o.x + o.side) * k) + 1), min(size, math.ceil((o.y + o.side) * k) + 1)
    gx = (np.arange(lo[0] * ss, hi[0] * ss) + 0.5) / ss / k
    gy = (np.arange(lo[1] * ss, hi[1] * ss) + 0.5) / ss / k
    px, py = np.meshgrid(gx, gy)
    if o.shape == "circle":
        d = np.hypot(px - o.centre[0], py - o.centre[1])
        inside, to_edge = d < o.side / 2, o.side / 2 - d
    else:
        poly = _exact_polygon(o)
        inside, to_edge = _inside_polygon(poly, px, py), _dist_to_boundary(poly, px, py)
    if style == "outline":
        inside &= to_edge < 3.0
    cov = np.zeros((size, size))
    h, w = hi[1] - lo[1], hi[0] - lo[0]
    cov[lo[1]:hi[1], lo[0]:hi[0]] = inside.reshape(h, ss, w, ss).mean(axis=(1, 3))
    return cov


@pytest.mark.parametrize("style", ["plain", "outline"])
@pytest.mark.parametrize("shape", SHAPES)
def test_geometry_matches_spec(shape, style):
    # Each shape, small and large, at 64 and 128 px, against exact pixel-centre sampling of the
    # spec's definition (triangle centred vertically, star inner radius 0.45, cross arms 1/3,
    # 3-px inner outline): pixels may differ by anti-aliasing rounding only.
    rng = np.random.default_rng(SHAPES.index(shape))
    for size_word, side in (("small", 10.0 + 4 * rng.random()), ("large", 20.0 + 6 * rng.random())):
        o = obj(shape, "blue", size_word, 2 + 30 * rng.random(), 2 + 30 * rng.random(), side)
        for size in (64, 128):
            got = object_masks(Scene((o,), GREY), size, style)[0]
            want = _exact_coverage(o, size, style)
            assert np.abs(got - want).max() <= 0.25, (shape, size)
            assert abs(got.sum() - want.sum()) <= (0.05 if shape == "star" else 0.02) * want.sum()


def test_outline_is_3px_and_scales():
    o = obj("square", "green", "large", 10, 10, 24)
    for size, width in ((64, 3), (128, 6), (256, 12)):
        m = object_masks(Scene((o,), GREY), size, "outline")[0]
        k = size // CANVAS
        row = m[22 * k]                                      # mid-box row: crosses the two sides
        assert row.sum() == pytest.approx(2 * width, abs=0.01)
        assert row[10 * k: 10 * k + width].min() == 1.0 and row[10 * k + width] == 0.0
        assert row[34 * k - width: 34 * k].min() == 1.0 and row[34 * k - width - 1] == 0.0


@pytest.mark.parametrize("size", [64, 128])
def test_drawn_pixels_stay_inside_box_and_never_overlap(scenes, size):
    k = size / CANVAS
    for sc in scenes[:300]:
        for style in ("plain", "outline"):
            masks = object_masks(sc, size, style)
            assert masks.sum(axis=0).max() <= 1.0 + 1e-6          # no overlap
            for o, m in zip(sc.objects, masks):
                # every drawn pixel (pixel i spans [i, i+1) px) overlaps the object's box: this is
                # stricter than the +-1 px allowed for rasterisation
                ys, xs = np.nonzero(m > 0)
                assert xs.min() + 1 > o.x * k and xs.max() < (o.x + o.side) * k, (o, style)
                assert ys.min() + 1 > o.y * k and ys.max() < (o.y + o.side) * k, (o, style)
                assert m.sum() > 0


def test_rendered_colours_and_background(scenes):
    for sc in scenes[:200]:
        img = render(sc, noise=False).astype(int)
        masks = object_masks(sc)
        covered = masks.sum(axis=0)
        assert np.all(img[covered == 0] == sc.background)
        for o, m in zip(sc.objects, masks):
            interior = img[m == 1.0]
            assert len(interior) > 0
            mean = interior.mean(axis=0)
            assert np.allclose(mean, o.rgb, atol=0.5)
            assert np.all(np.abs(mean - COLOURS[o.colour]) <= 15.5)
        # anti-aliased edge pixels are mixtures of the object and the background colours
        for o, m in zip(sc.objects, masks):
            edge = (m > 0) & (m < 1)
            lo = np.minimum(o.rgb, sc.background) - 1
            hi = np.maximum(o.rgb, sc.background) + 1
            assert np.all((img[edge] >= lo) & (img[edge] <= hi))


def test_noise_std_per_style_and_not_scaled():
    sc = Scene((obj("square", "black", "large", 4, 4, 20),), (128, 128, 128))
    for style, std in (("plain", 3.0), ("outline", 3.0), ("noisy", 25.0)):
        for size in (64, 128):
            clean = render(sc, size, style, noise=False).astype(float)
            noisy = render(sc, size, style, rng=np.random.default_rng(0)).astype(float)
            bg = object_masks(sc, size, style)[0] == 0
            diff = (noisy - clean)[bg]
            assert abs(diff.mean()) < 0.3 * std / 3 + 0.1
            assert diff.std() == pytest.approx(std, rel=0.06), (style, size)
    assert render(sc, style="plain", noise=False).dtype == np.uint8
    white = Scene((obj("square", "white", "large", 4, 4, 24, rgb=(255, 255, 255)),), (170, 170, 170))
    img = render(white, style="noisy")
    assert img.max() == 255 and img.dtype == np.uint8       # clipped, not wrapped


def test_render_is_deterministic(scenes):
    for sc in scenes[:20]:
        for style in STYLES:
            assert np.array_equal(render(sc, style=style), render(sc, style=style))
    a = render(scenes[0], rng=np.random.default_rng(1))
    b = render(scenes[0], rng=np.random.default_rng(2))
    assert not np.array_equal(a, b)


def test_128px_is_the_64px_scene_scaled(scenes):
    for sc in scenes[:60]:
        for style in ("plain", "outline"):
            m64 = object_masks(sc, 64, style)
            m128 = object_masks(sc, 128, style)
            down = m128.reshape(len(sc.objects), 64, 2, 64, 2).mean(axis=(2, 4))
            assert np.abs(down - m64).max() <= 0.25
            assert np.abs(down - m64).mean() < 0.005
            assert np.allclose(down.sum(axis=(1, 2)), m64.sum(axis=(1, 2)), rtol=0.03)
        img64 = render(sc, 64, noise=False).astype(float)
        img128 = render(sc, 128, noise=False).astype(float)
        assert np.abs(img128.reshape(64, 2, 64, 2, 3).mean(axis=(1, 3)) - img64).mean() < 1.0


# ------------------------------------------------------------------------------------------
# Captions
# ------------------------------------------------------------------------------------------

def test_caption_single_object_positions():
    assert caption(Scene((at_centre_x(8),), GREY)) == "a small red circle on the left"
    assert caption(Scene((at_centre_x(32, "star", "white", "large", 22),), GREY)) \
        == "a large white star in the middle"
    assert caption(Scene((at_centre_x(52, "cross", "black"),), GREY)) == "a small black cross on the right"


def test_caption_multiple_objects():
    a = at_centre_x(50, "square", "blue", "large", 22, y=30)
    b = at_centre_x(10, "circle", "red", "small", 12, y=4)
    # listed left to right whatever the construction order, without position words
    assert caption(Scene((a, b), GREY)) == "a small red circle and a large blue square"
    c = at_centre_x(30, "triangle", "green", "small", 12, y=40)
    assert caption(Scene((a, c, b), GREY)) \
        == "a small red circle, a small green triangle and a large blue square"
    # all identical -> counted plural
    same3 = [at_centre_x(cx, "circle", "red", "small", side, y=y)
             for cx, side, y in ((10, 12, 5), (30, 11, 40), (50, 13, 5))]
    assert caption(Scene(tuple(same3), GREY)) == "three small red circles"
    same2 = [at_centre_x(cx, "cross", "blue", "large", 22, y=5) for cx in (15, 45)]
    assert caption(Scene(tuple(same2), GREY)) == "two large blue crosses"
    # two of three matching -> every object gets its own phrase
    mixed = same3[:2] + [at_centre_x(50, "square", "blue", "large", 20, y=5)]
    assert caption(Scene(tuple(mixed), GREY)) \
        == "a small red circle, a small red circle and a large blue square"
    # same colour and shape but different sizes -> not identical
    diff_size = [same2[0], at_centre_x(50, "cross", "blue", "small", 12, y=40)]
    assert caption(Scene(tuple(diff_size), GREY)) == "a large blue cross and a small blue cross"


def test_caption_grammar_on_sampled_scenes(scenes):
    phrase = r"a (small|large) (" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")"
    one = re.compile(rf"{phrase} (on the left|on the right|in the middle)")
    many = re.compile(rf"{phrase}(, {phrase})? and {phrase}")
    plural = re.compile(r"(two|three) (small|large) (" + "|".join(COLOURS) + r") ("
                        + "|".join(PLURALS.values()) + r")")
    for sc in scenes:
        cap = caption(sc)
        n = len(sc.objects)
        if n == 1:
            assert one.fullmatch(cap), cap
        elif len({(o.size, o.colour, o.shape) for o in sc.objects}) == 1:
            assert plural.fullmatch(cap) and cap.startswith(COUNTS[n - 1]), cap
        else:
            assert many.fullmatch(cap) and cap.count(" a ") + 1 == n, cap


# ------------------------------------------------------------------------------------------
# Questions
# ------------------------------------------------------------------------------------------

def _brute_answer(sc: Scene, q: str) -> str:
    """Recompute the answer from the scene by the spec; assert the question is unambiguous."""
    objs = sc.objects
    if q == "how many shapes are there?":
        return COUNTS[len(objs) - 1]
    if m := re.fullmatch(r"what color is the (\w+)\?", q):
        (o,) = [o for o in objs if o.shape == m[1]]
        return o.colour
    if m := re.fullmatch(r"what shape is the (\w+) object\?", q):
        (o,) = [o for o in objs if o.colour == m[1]]
        return o.shape
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", q):
        assert m[1] in COLOURS and m[2] in SHAPES
        return "yes" if any(o.colour == m[1] and o.shape == m[2] for o in objs) else "no"
    if m := re.fullmatch(r"what size is the (\w+) (\w+)\?", q):
        (o,) = [o for o in objs if o.colour == m[1] and o.shape == m[2]]
        return o.size
    if m := re.fullmatch(r"where is the (\w+) (\w+)\?", q):
        (o,) = [o for o in objs if o.colour == m[1] and o.shape == m[2]]
        cx = o.x + o.side / 2
        return "left" if cx < 64 / 3 else "right" if cx > 128 / 3 else "middle"
    raise AssertionError(f"unknown question {q!r}")


def test_questions_unambiguous_and_complete(scenes):
    rng = np.random.default_rng(5)
    for sc in scenes:
        qa = questions(sc, rng)
        qs = [q for q, _ in qa]
        assert len(qs) == len(set(qs))
        for q, a in qa:
            assert _brute_answer(sc, q) == a, (q, a, sc)
        assert sum(q.startswith("is there") for q in qs) == 1
        # every unambiguous question of the other five kinds is generated
        objs = sc.objects
        want = {"how many shapes are there?"}
        want |= {f"what color is the {o.shape}?" for o in objs if sum(p.shape == o.shape for p in objs) == 1}
        want |= {f"what shape is the {o.colour} object?" for o in objs
                 if sum(p.colour == o.colour for p in objs) == 1}
        for o in objs:
            if sum(p.pair == o.pair for p in objs) == 1:
                want |= {f"what size is the {o.colour} {o.shape}?", f"where is the {o.colour} {o.shape}?"}
        assert {q for q in qs if not q.startswith("is there")} == want


def test_yes_no_balanced(scenes):
    rng = np.random.default_rng(11)
    answers = [a for sc in scenes for _ in range(2)
               for q, a in questions(sc, rng) if q.startswith("is there")]
    assert len(answers) == 3000
    assert abs(np.mean([a == "yes" for a in answers]) - 0.5) < 0.04


def test_questions_refuse_held_out_scene_without_permission():
    sc = Scene((obj("star", "red"),), GREY)
    with pytest.raises(ValueError):
        questions(sc, np.random.default_rng(0), allow_held_out=False)
    assert questions(sc, np.random.default_rng(0))[0] == ("how many shapes are there?", "one")


# ------------------------------------------------------------------------------------------
# Datasets, splits, determinism
# ------------------------------------------------------------------------------------------

HELD_OUT_TEXT = [f"{c} {s}" for c, s in HELD_OUT_PAIRS] + [f"{c} {PLURALS[s]}" for c, s in HELD_OUT_PAIRS]


def _mentions_held_out(text: str) -> bool:
    return any(t in text for t in HELD_OUT_TEXT)


@pytest.mark.parametrize("name", [d for d in DATASETS if d != "shapes-heldout"])
def test_train_streams_never_show_held_out_pairs(name):
    ds = ShapesDataset(name, split="train", length=240)
    assert not any(_mentions_held_out(p) for p in ds.prompts)
    rng = np.random.default_rng(0)
    for i in range(len(ds)):
        item = ds[i]
        assert all(o.pair not in HELD_OUT_PAIRS for o in item["scene"].objects)
        assert not _mentions_held_out(item["caption"])
        assert not _mentions_held_out(item["question"])
        for _ in range(3):  # including the "no" questions, which name absent pairs
            for q, a in questions(item["scene"], rng, allow_held_out=False):
                assert not _mentions_held_out(q), q
        # a "what shape is the red object?" answer must not complete a held-out pair either
        if m := re.fullmatch(r"what shape is the (\w+) object\?", item["question"]):
            assert (m[1], item["answer"]) not in HELD_OUT_PAIRS
        if m := re.fullmatch(r"what color is the (\w+)\?", item["question"]):
            assert (item["answer"], m[1]) not in HELD_OUT_PAIRS


def test_held_out_pairs_do_occur_in_eval_streams():
    ds = ShapesDataset("shapes-scenes", split="val", length=200)
    assert any(o.pair in HELD_OUT_PAIRS for i in range(len(ds)) for o in ds.scene(i).objects)


def test_heldout_has_no_train_split():
    with pytest.raises(ValueError):
        ShapesDataset("shapes-heldout", split="train")
    with pytest.raises(ValueError):
        ShapesDataset("shapes-heldout@noisy", split="train")


def test_classification_datasets_labels_and_prompts():
    expect = {
        "shapes-shape": (6, "a photo of a circle"),
        "shapes-color": (8, "a photo of a red object"),
        "shapes-size": (2, "a photo of a small object"),
        "shapes-combo": (48, "a photo of a red circle"),
        "shapes-count": (3, "a photo of one shapes"),
        "shapes-heldout": (8, "a photo of a red star"),
    }
    for name, (n, first_prompt) in expect.items():
        ds = ShapesDataset(name, split="test", length=2 * n)
        assert len(ds.classes) == n and len(ds.prompts) == n and ds.prompts[0] == first_prompt
        for i in range(len(ds)):
            item = ds[i]
            label, objs = item["label"], item["scene"].objects
            assert label == i % n
            cls = ds.classes[label]
            if name == "shapes-count":
                assert COUNTS[len(objs) - 1] == cls
                assert ds.prompts[label] == f"a photo of {cls} shapes"
                continue
            (o,) = objs
            got = {"shapes-shape": o.shape, "shapes-color": o.colour, "shapes-size": o.size,
                   "shapes-combo": f"{o.colour} {o.shape}", "shapes-heldout": f"{o.colour} {o.shape}"}[name]
            assert got == cls
            assert ds.prompts[label] == ds.template.format(shape=o.shape, colour=o.colour, size=o.size)
    heldout = ShapesDataset("shapes-heldout")
    assert heldout.classes == ["red star", "red cross", "blue star", "blue cross", "yellow star",
                               "yellow cross", "white star", "white cross"]
    combo_train = ShapesDataset("shapes-combo", split="train")
    assert len(combo_train.classes) == 40 and not set(heldout.classes) & set(combo_train.classes)
    assert set(heldout.classes) <= set(ShapesDataset("shapes-combo", split="val").classes)
    scenes_ds = ShapesDataset("shapes-scenes", length=3)
    assert scenes_ds.classes == [] and scenes_ds[0]["label"] == -1


def test_item_keys_and_types():
    item = ShapesDataset("shapes-scenes@noisy", split="val", length=5, image_size=96)[4]
    assert set(item) == {"image", "label", "caption", "question", "answer", "scene", "index"}
    assert item["image"].shape == (96, 96, 3) and item["image"].dtype == np.uint8
    assert item["index"] == 4 and item["caption"] == caption(item["scene"])
    assert _brute_answer(item["scene"], item["question"]) == item["answer"]


def test_same_pixels_on_repeated_calls_and_fresh_objects():
    for spec in ("shapes-combo@outline", "shapes-scenes", "shapes-count@noisy"):
        a = ShapesDataset(spec, split="val", seed=3, length=10)
        b = ShapesDataset(spec, split="val", seed=3, length=10)
        for i in (0, 7, -1):
            x, y = a[i], b[i]
            assert np.array_equal(x["image"], a[i]["image"]) and np.array_equal(x["image"], y["image"])
            assert x["scene"] == y["scene"] and x["caption"] == y["caption"]
            assert (x["question"], x["answer"]) == (y["question"], y["answer"])


def test_golden_sample_is_stable_across_machines():
    # "The same call returns the same pixels on every machine": pin one sample. If the renderer
    # is changed on purpose, update these values (and say so: it changes every dataset).
    item = ShapesDataset("shapes-scenes", split="test", length=1)[0]
    assert (caption(item["scene"]), item["scene"].background) == GOLDEN_SCENE
    assert hashlib.sha256(item["image"].tobytes()).hexdigest()[:16] == GOLDEN_PIXELS


GOLDEN_SCENE = ("a small blue diamond and a small purple square", (132, 134, 132))
GOLDEN_PIXELS = "3151b2a5b9ffd022"  # numpy 2.4.6, Pillow 12.3.0 (pinned in requirements.txt)


def test_splits_seeds_and_styles():
    test = ShapesDataset("shapes-combo", split="test", length=20)
    val = ShapesDataset("shapes-combo", split="val", length=20)
    other_seed = ShapesDataset("shapes-combo", split="test", seed=1, length=20)
    for i in range(20):
        assert not np.array_equal(test[i]["image"], val[i]["image"])
        assert test[i]["scene"] != val[i]["scene"]
        assert test[i]["scene"] != other_seed[i]["scene"]
    train = ShapesDataset("shapes-scenes", split="train", length=20)
    scn_val = ShapesDataset("shapes-scenes", split="val", length=20)
    assert all(train.scene(i) != scn_val.scene(i) for i in range(20))
    # the style changes only rendering: the scene (and label) is paired across styles
    styled = {s: ShapesDataset(f"shapes-combo@{s}", split="test", length=20) for s in STYLES}
    for i in range(20):
        items = [styled[s][i] for s in STYLES]
        assert items[0]["scene"] == items[1]["scene"] == items[2]["scene"] == test[i]["scene"]
        assert items[0]["label"] == items[1]["label"] == items[2]["label"]
        assert not np.array_equal(items[0]["image"], items[1]["image"])
    # the style argument and the @style suffix agree
    assert ShapesDataset("shapes-shape", style="noisy").style == "noisy"
    assert ShapesDataset("shapes-shape@noisy", style="noisy").style == "noisy"
    with pytest.raises(ValueError):
        ShapesDataset("shapes-shape@noisy", style="outline")
    with pytest.raises(ValueError):
        ShapesDataset("shapes-shape", split="dev")


def test_index_bounds():
    ds = ShapesDataset("shapes-shape", length=5)
    assert ds[-1]["index"] == 4
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(ValueError):
        ShapesDataset("shapes-shape", length=10**9 + 1)
    with pytest.raises(ValueError):
        sw.sample_rng("shapes-shape", "test", 10**9)
    assert len(ds.images(slice(1, 4))) == 3


def test_parse_spec():
    assert parse_spec("shapes-combo@outline") == ("shapes-combo", "outline")
    assert parse_spec("shapes-shape") == ("shapes-shape", "plain")
    for name in DATASETS:
        assert parse_spec(f"{name}@noisy") == (name, "noisy")
    with pytest.raises(ValueError, match="shapes-combo"):       # lists the valid datasets
        parse_spec("shapes-combos")
    with pytest.raises(ValueError, match="outline"):            # lists the valid styles
        parse_spec("shapes-combo@sketch")
    for bad in ("shapes-combo@", "@plain", "", "shapes-combo@outline@noisy"):
        with pytest.raises(ValueError):
            parse_spec(bad)


def test_pixels_tensor():
    torch = pytest.importorskip("torch")
    ds = ShapesDataset("shapes-color", length=4)
    x = ds.pixels([0, 3])
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(x[1], torch.from_numpy(ds[3]["image"]).permute(2, 0, 1).float() / 255)


def test_module_does_not_import_torch():
    # Load the file on its own (not through the package, whose __init__ is not ours to judge).
    import subprocess
    import sys

    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('shapes_alone', {sw.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['shapes_alone'] = m\n"
        "spec.loader.exec_module(m)\n"
        "m.ShapesDataset('shapes-scenes')[0]\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
