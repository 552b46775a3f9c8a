"""Reading what a person uploads: clean error messages, content sniffing, non-finite pixels, and
telling a shapes-world scene from a photo (vlm_inspect.images, vlm_inspect.data.scene_kind)."""
from __future__ import annotations

import importlib.util
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_inspect.data.scene_kind import check_shapes_scene, is_shapes_scene
from vlm_inspect.data.shapes import DATASETS, STYLES, ShapesDataset
from vlm_inspect.images import (
    ImageError, image_warnings, load_image, pil_to_pixels, sniff_image, to_rgb,
)

ROOT = Path(__file__).resolve().parents[1]
GOOD = (ROOT / "assets" / "shapes_plain_3.png").read_bytes()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels in a few bytes (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def huge_png() -> bytes:
    return encoded(Image.new("1", (7000, 7000)), "PNG")  # 49 megapixels in a few kB


BAD = {  # name -> (bytes, words the message must contain), the files of tests/test_app.py and more
    "corrupt.png": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "could not read image 'corrupt.png'"),
    "truncated.png": (GOOD[: len(GOOD) // 3], "truncated"),
    "empty.png": (b"", "empty file"),
    "notes.txt": (b"this is not an image\n", "could not read image 'notes.txt'"),
    "broken.png": (b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, "could not read image 'broken.png'"),
    "huge.png": (None, "megapixels"),
    "bomb.png": (png_header(20000, 20000), "megapixels"),
}


def bad_bytes(name: str) -> bytes:
    data = BAD[name][0]
    return huge_png() if data is None else data


def assert_clean(msg: str) -> None:
    assert "''" not in msg and '""' not in msg, msg
    assert "<_io." not in msg and "object at 0x" not in msg, msg
    assert "cannot identify image file" not in msg, msg  # Pillow's words around the path


# -------------------------------------------------------------------------------------------------
# load_image error messages
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(BAD))
def test_bad_upload_messages_name_the_file_once_and_read_cleanly(name, tmp_path):
    data, words = bad_bytes(name), BAD[name][1]
    path = tmp_path / "gradio-tmp" / name
    path.parent.mkdir()
    path.write_bytes(data)
    # what the server does: its temporary copy, or the bytes, with the name the client sent
    for source in (path, str(path), data):
        with pytest.raises(ImageError) as info:
            load_image(source, name=name)
        msg = str(info.value)
        assert words in msg, msg
        assert f"'{name}'" in msg and msg.count(name) == 1, msg
        assert str(tmp_path) not in msg, msg
        assert_clean(msg)
    # no name: bytes are "the uploaded image", a path is quoted once
    with pytest.raises(ImageError) as info:
        load_image(data)
    assert "the uploaded image" in str(info.value) and words.replace(f"image '{name}'", "").strip() in str(info.value)
    assert_clean(str(info.value))
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert f"image '{path}'" in str(info.value) and str(info.value).count(str(path)) == 1
    assert_clean(str(info.value))


def test_the_corrupt_file_message_is_exactly_this():
    with pytest.raises(ImageError) as info:
        load_image(bad_bytes("corrupt.png"), name="corrupt.png")
    assert str(info.value) == ("could not read image 'corrupt.png': it is not an image file Pillow can read, "
                               "or it is corrupt or truncated")


def test_useful_pillow_detail_is_kept():
    jpg = encoded(Image.open(ROOT / "assets" / "photo_coffee.jpg"), "JPEG")
    with pytest.raises(ImageError) as info:
        load_image(jpg[: len(jpg) // 2], name="half.jpg")
    msg = str(info.value)
    assert msg.startswith("could not read image 'half.jpg': ") and "(Pillow: image file is truncated" in msg
    assert_clean(msg)


def test_missing_files_and_folders(tmp_path):
    with pytest.raises(ImageError, match="not found") as info:
        load_image(tmp_path / "missing.jpg")
    assert str(info.value) == f"could not read image '{tmp_path / 'missing.jpg'}': file not found"
    with pytest.raises(ImageError, match="'upload.jpg': file not found"):
        load_image(tmp_path / "missing.jpg", name="upload.jpg")
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)


def test_good_images_load_from_every_kind_of_source(tmp_path):
    (tmp_path / "x.png").write_bytes(GOOD)
    ref = np.asarray(load_image(ROOT / "assets" / "shapes_plain_3.png"))
    for source in (GOOD, bytearray(GOOD), tmp_path / "x.png", str(tmp_path / "x.png")):
        img = load_image(source, name="x.png")
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), ref)
        assert image_warnings(img) == []


# -------------------------------------------------------------------------------------------------
# sniff_image
# -------------------------------------------------------------------------------------------------

def test_sniff_image_names_image_formats_from_the_header():
    img = Image.open(ROOT / "assets" / "photo_coffee.jpg").convert("RGB").resize((40, 30))
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"):
        assert sniff_image(encoded(img, fmt)) == fmt
    assert sniff_image(GOOD) == "PNG"
    # the header is enough: truncated and over-size images still are images (load_image says why not)
    assert sniff_image(bad_bytes("truncated.png")) == "PNG"
    assert sniff_image(huge_png()) == "PNG"
    assert sniff_image(png_header(20000, 20000)) == "PNG"  # Pillow refuses to open it at all


def test_sniff_image_refuses_what_is_not_an_image():
    rng = np.random.default_rng(0)
    others = [b"", b"this is not an image\n", b'{"a": 1}', b"<html><body>hi</body></html>",
              b"%PDF-1.4\n" + b"x" * 100, b"PK\x03\x04" + bytes(100), bad_bytes("corrupt.png"),
              bad_bytes("broken.png")]
    others += [rng.bytes(int(n)) for n in rng.integers(1, 2000, size=200)]
    assert [sniff_image(d) for d in others] == [None] * len(others)


# -------------------------------------------------------------------------------------------------
# Non-finite pixel values
# -------------------------------------------------------------------------------------------------

ONE_NAN = ("the image had 1 non-finite pixel value (NaN or infinite); it was ignored when scaling "
           "and drawn black")


def test_a_float_array_with_nan_and_inf_keeps_its_scaling_and_warns():
    clean = np.random.default_rng(0).uniform(0.1, 0.9, size=(8, 8, 3))
    bad = clean.copy()
    bad[0, 0, :] = np.nan
    bad[7, 7, :] = np.inf
    ref, img = np.asarray(load_image(clean)), np.asarray(load_image(bad))
    keep = np.ones((8, 8), dtype=bool)
    keep[0, 0] = keep[7, 7] = False
    assert np.array_equal(img[keep], ref[keep])          # [0, 1] floats still scaled by 255
    assert img[keep].max() > 200                         # not all black
    assert (img[0, 0] == 0).all() and (img[7, 7] == 255).all()
    (warning,) = image_warnings(load_image(bad))
    assert warning.startswith("the image had 6 non-finite pixel values (NaN or infinite)")
    assert "black" in warning and "white" in warning
    assert image_warnings(load_image(clean)) == []


def test_one_nan_gives_the_one_sentence_warning():
    a = np.linspace(0.0, 1.0, 16).reshape(4, 4)
    a[1, 2] = np.nan
    img = load_image(a)
    assert image_warnings(img) == [ONE_NAN]
    assert np.asarray(img)[3, 3, 0] == 255 and np.asarray(img)[1, 2, 0] == 0


def test_a_mode_F_image_with_nan_and_inf_is_scaled_over_its_finite_values():
    a = np.arange(16, dtype=np.float32).reshape(4, 4) * 10.0   # 0 .. 150
    a[0, 1], a[2, 2], a[3, 0] = np.nan, np.inf, -np.inf
    src = Image.fromarray(a, mode="F")
    img = load_image(src)
    px = np.asarray(img)[..., 0]
    finite = np.isfinite(a)
    expected = np.round((a[finite] - 0.0) / 150.0 * 255.0)
    assert np.array_equal(px[finite], expected)               # min -> 0, max -> 255: not all black
    assert px[0, 1] == 0 and px[3, 0] == 0 and px[2, 2] == 255
    (warning,) = image_warnings(img)
    assert warning.startswith("the image had 3 non-finite pixel values")
    assert "vlm_inspect_warnings" not in src.info                # the caller's image is untouched


def test_warnings_survive_alpha_compositing_and_repeated_conversion():
    rgba = np.random.default_rng(1).uniform(0, 1, size=(6, 6, 4))
    rgba[2, 3, 0] = np.nan
    img = load_image(rgba)                                       # goes through alpha_composite
    assert img.mode == "RGB" and image_warnings(img) == [ONE_NAN]
    assert image_warnings(to_rgb(img)) == [ONE_NAN]              # not lost, not doubled
    assert image_warnings(load_image(img)) == [ONE_NAN]
    assert image_warnings(img.resize((12, 12)).crop((0, 0, 8, 8))) == [ONE_NAN]
    image_warnings(img).append("changed")                       # a copy: the image keeps its own
    assert image_warnings(img) == [ONE_NAN]
    assert pil_to_pixels(img).shape == (1, 3, 6, 6)
    alpha_nan = np.ones((2, 2, 4))
    alpha_nan[0, 0, 3] = np.nan                                  # a NaN alpha keeps the pixel visible
    assert np.asarray(load_image(alpha_nan))[0, 0].tolist() == [255, 255, 255]
    assert image_warnings(load_image(alpha_nan)) == [ONE_NAN]


def test_all_non_finite_is_black_with_a_warning():
    img = load_image(np.full((3, 3), np.nan))
    assert not np.asarray(img).any()
    assert image_warnings(img)[0].startswith("the image had 9 non-finite pixel values")


# -------------------------------------------------------------------------------------------------
# Shapes scene or photo
# -------------------------------------------------------------------------------------------------

def resaved(img: Image.Image, fmt: str, **kw) -> Image.Image:
    return Image.open(io.BytesIO(encoded(img, fmt, **kw))).convert("RGB")


@pytest.mark.parametrize("size", [64, 96, 224])
def test_every_rendered_scene_is_a_shapes_scene(size):
    misses = []
    for name in DATASETS:
        for style in STYLES:
            ds = ShapesDataset(name, split="test", style=style, image_size=size, length=100)
            for i in (0, 1, 2, 7):
                img = Image.fromarray(ds.image(i))
                for kind, im in (("raw", img), ("png", resaved(img, "PNG")), ("jpeg90", resaved(img, "JPEG", quality=90))):
                    check = check_shapes_scene(im)
                    if not check.is_scene:
                        misses.append((name, style, i, kind, check.reason))
    assert misses == []


def test_scenes_survive_other_upscalers_and_the_shipped_assets_are_scenes():
    ds = ShapesDataset("shapes-scenes", split="test", style="outline", length=10)
    for i in range(3):
        img = Image.fromarray(ds.image(i))
        for f in (Image.Resampling.NEAREST, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS):
            assert is_shapes_scene(img.resize((300, 300), f))
        assert is_shapes_scene(img.convert("RGBA"))
    for path in sorted((ROOT / "assets").glob("shapes_*.png")):
        assert is_shapes_scene(Image.open(path)), path


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.skip(f"{package} is not installed")
    return Path(spec.origin).parent.joinpath(*parts)


def photo_files() -> list[Path]:
    mpl = _package_file("matplotlib", "mpl-data", "sample_data")
    files = sorted((ROOT / "assets").glob("photo_*.jpg"))
    files += [mpl / "grace_hopper.jpg", mpl / "Minduka_Present_Blue_Pack.png"]
    files += sorted(_package_file("gradio", "test_data").glob("*.jpg"))
    missing = [f for f in files if not f.exists()]
    if missing:
        pytest.skip(f"sample photos missing: {missing}")
    return files


def photo_variants(img: Image.Image):
    """The photo, its centre square, four half-size square crops, square resizes and a half-size copy."""
    w, h = img.size
    s = min(w, h)
    square = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    yield "as is", img
    yield "centre square", square
    for fx, fy in ((0, 0), (0.5, 0.5), (1, 1), (0, 1)):
        c = s // 2
        x, y = int(fx * (w - c)), int(fy * (h - c))
        yield f"crop at {fx},{fy}", img.crop((x, y, x + c, y + c))
    for n in (64, 224):
        yield f"square {n}", square.resize((n, n), Image.Resampling.BICUBIC)
    yield "half size", img.resize((max(1, w // 2), max(1, h // 2)))
    yield "jpeg 50", resaved(img.convert("RGB"), "JPEG", quality=50)


def test_photos_and_their_crops_are_not_shapes_scenes():
    wrong, n = [], 0
    for path in photo_files():
        raw = Image.open(path)
        versions = [("", raw), ("flattened", to_rgb(raw))]
        if raw.mode == "RGBA":  # the gift box: also on black and on mid grey
            for grey in (0, 128):
                bg = Image.new("RGBA", raw.size, (grey, grey, grey, 255))
                versions.append((f"on {grey}", Image.alpha_composite(bg, raw).convert("RGB")))
        for how, img in versions:
            for variant, im in photo_variants(img):
                n += 1
                check = check_shapes_scene(im)
                if check.is_scene:
                    wrong.append((path.name, how, variant, check))
    assert n > 100 and wrong == []


def test_pictures_on_a_grey_backdrop_are_not_shapes_scenes():
    # the hard case: frame and background rules pass; the palette rule must refuse them
    for path in photo_files():
        photo = to_rgb(Image.open(path))
        w, h = photo.size
        s = min(w, h)
        square = photo.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        for grey in (100, 140):
            for mode in ("RGB", "L"):
                canvas = Image.new("RGB", (256, 256), (grey, grey + 5, grey - 5))
                canvas.paste(square.resize((200, 200)).convert(mode).convert("RGB"), (28, 28))
                check = check_shapes_scene(canvas)
                assert not check.is_scene, (path.name, grey, mode, check)
            thumb = Image.new("RGB", (256, 256), (grey,) * 3)
            thumb.paste(square.resize((64, 64)), (96, 96))
            check = check_shapes_scene(thumb)
            assert not check.is_scene and "palette" in check.reason, (path.name, grey, check)


def test_flat_images_and_noise_are_not_scenes():
    # decided: a scene has at least one object, so a flat image is not one (whatever its colour),
    # and noise, grey on average, has no object either
    for colour in ((128, 128, 128), (120, 125, 118), (0, 0, 255), (255, 255, 255), (0, 0, 0)):
        check = check_shapes_scene(Image.new("RGB", (64, 64), colour))
        assert not check.is_scene
    assert "nothing on the background" in check_shapes_scene(Image.new("RGB", (224, 224), (128,) * 3)).reason
    rng = np.random.default_rng(0)
    for size in (64, 256):
        noise = Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))
        assert not is_shapes_scene(noise)
    for std in (10, 25, 40):  # the noisy style's background without its objects
        grey = np.clip(rng.normal(128, std, size=(64, 64, 3)), 0, 255).astype(np.uint8)
        assert not is_shapes_scene(Image.fromarray(grey))
    assert not is_shapes_scene(Image.new("RGB", (0, 0)))
    assert "not square" in check_shapes_scene(Image.new("RGB", (64, 80), (128,) * 3)).reason


def test_a_megapixel_image_is_judged_like_its_small_self():
    """Large inputs are shrunk to the canvas first (its speed is not a test's business)."""
    photo = to_rgb(Image.open(ROOT / "assets" / "photo_coffee.jpg")).resize((1000, 1000))
    scene = Image.fromarray(ShapesDataset("shapes-scenes", image_size=64).image(3)).resize(
        (1000, 1000), Image.Resampling.NEAREST)
    assert is_shapes_scene(scene) and not is_shapes_scene(photo)
