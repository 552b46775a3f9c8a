"""What a new user sees: a photo upload goes to the photo model, a model on random weights says so, a
broken float image says it was repaired, and each side gets a verdict. Service and handlers, no browser
(tests/test_browser.py drives the page)."""
from __future__ import annotations

import shutil
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from vlm_inspect.data.shapes import ShapesDataset
from vlm_inspect.models.presets import PHOTO_CLIP
from vlm_inspect.service import InspectRequest, InspectService, side_verdict
from vlm_inspect.ui import handlers as H

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
GRACE = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"  # not in assets/


@pytest.fixture(scope="module")
def service():
    return InspectService(model_dirs=[])


def in_upload_folder(src: Path, tmp_name: str) -> str:
    """A copy where Gradio keeps uploads (the page only ever holds such paths)."""
    from gradio.utils import get_upload_folder

    folder = Path(get_upload_folder()) / "test-first-upload"
    folder.mkdir(parents=True, exist_ok=True)
    return shutil.copy(src, folder / tmp_name)


def test_a_photo_upload_switches_zero_shot_to_the_photo_model(service, tmp_path):
    shapes_default = service.defaults("embedded")["baseline"]["clip"]
    preset = H.suite_defaults("embedded")[0]
    classes = H.label_set_values(preset)[0]
    photo = in_upload_folder(GRACE, "my photo.jpg")
    ups = H.on_image(service, ASSETS, photo, "embedded", shapes_default, service.defaults()["defended"]["clip"],
                     preset, classes)
    assert ups[0]["value"] == PHOTO_CLIP and ups[1]["value"] == H.NONE
    assert ups[2]["value"] == H.PHOTO_LABEL_SET and "cat" in ups[3]
    # chosen models and typed classes are kept
    ups = H.on_image(service, ASSETS, photo, "embedded", "shapes-clip+apd", H.NONE, preset, classes)
    assert ups[:2] == [gr.skip()] * 2 and ups[2]["value"] == H.PHOTO_LABEL_SET
    ups = H.on_image(service, ASSETS, photo, "embedded", shapes_default, H.NONE, preset, "zebra, horse")
    assert ups[0]["value"] == PHOTO_CLIP and ups[2:] == [gr.skip()] * 3
    # a shapes scene the user rendered and uploaded goes back to the shapes models
    scene = tmp_path / "scene.png"
    Image.fromarray(ShapesDataset("shapes-scenes", split="test", style="noisy", image_size=224).image(5)).save(scene)
    back = H.on_image(service, ASSETS, in_upload_folder(scene, "scene.png"), "embedded", PHOTO_CLIP, H.NONE,
                      H.PHOTO_LABEL_SET, H.label_set_values(H.PHOTO_LABEL_SET)[0])
    assert back[0]["value"] == shapes_default and back[2]["value"] == preset
    # the pretrained suite is left alone
    assert H.on_image(service, ASSETS, photo, "pretrained", "openai/ViT-B-32", None, preset, classes) == [gr.skip()] * 5


def test_the_shapes_captioner_and_vqa_say_they_know_only_the_shapes_world_on_a_photo(service):
    fields = service.suite_fields("embedded", {"baseline": {"clip": PHOTO_CLIP}, "defended": {"clip": None}},
                                  label_set=H.PHOTO_LABEL_SET)
    rep = service.inspect(GRACE, InspectRequest(**fields, steps=1)).report
    assert rep["image"]["kind"] == "photo"
    text = H.side_markdown(rep, "baseline")
    assert "shapes-captioner knows only the shapes world" in text and "pretrained" in text
    assert "shapes-vqa knows only the shapes world" in text
    rep = service.inspect(ASSETS / "shapes_plain_3.png", InspectRequest(**service.suite_fields(), steps=1)).report
    assert rep["image"]["kind"] == "shapes" and "knows only" not in H.side_markdown(rep, "baseline")


def test_models_on_random_weights_say_so(monkeypatch, tmp_path):
    monkeypatch.setenv("VLM_INSPECT_CHECKPOINTS", str(tmp_path / "no-checkpoints"))
    service = InspectService(model_dirs=[])
    ins = service.inspect(ASSETS / "shapes_plain_3.png", InspectRequest(**service.suite_fields(), steps=1))
    assert any("shapes-clip runs on random weights" in w for w in ins.warnings)
    assert ins.report["warnings"] == ins.warnings
    assert "shapes-captioner runs on random weights" in H.warnings_markdown(ins)
    trained = InspectService(model_dirs=[])
    monkeypatch.delenv("VLM_INSPECT_CHECKPOINTS")
    ok = trained.inspect(ASSETS / "shapes_plain_3.png", InspectRequest(**trained.suite_fields(), steps=1))
    assert not any("random weights" in w for w in ok.warnings)


def test_a_float_image_with_nan_is_scaled_and_the_report_says_so(service):
    img = ShapesDataset("shapes-scenes", split="test", image_size=64).image(2).astype(np.float32) / 255.0
    img[0, 0, 0], img[1, 1, 1] = np.nan, np.inf
    ins = service.inspect(img, InspectRequest(**service.suite_fields(), steps=1))
    assert any("non-finite" in w for w in ins.report["warnings"])
    assert ins.images["clean"].mean() > 40  # not all black


def test_each_side_gets_a_verdict(service):
    req = InspectRequest(**service.suite_fields(), steps=10, eps_k=16)
    rep = service.inspect(ASSETS / "shapes_plain_3.png", req).report
    for side in ("baseline", "defended"):
        v = rep["verdicts"][side]
        clip = next(e for e in rep["models"].values() if e["role"] == side and e["family"] == "clip")
        before, after = clip["clean"]["zero_shot"]["labels"][0], clip["adversarial"]["zero_shot"]["labels"][0]
        assert v["fooled"] == (before != after)
        assert v["text"] == (f"fooled: {before} → {after}" if before != after else f"held: {after}")
        assert v["text"] in H.verdict_markdown(rep, side)
    held = InspectRequest(**service.suite_fields(), steps=1, eps_k=0)
    assert service.inspect(ASSETS / "shapes_plain_3.png", held).report["verdicts"]["baseline"]["text"].startswith("held")
    rep["attack"]["target_text"] = "no such class"  # targeted: fooled only when the target is reached
    v = side_verdict(rep, "baseline")
    assert not v["fooled"] and v["text"].endswith("(target “no such class” not reached)")
    clip = next(e for e in rep["models"].values() if e["role"] == "baseline" and e["family"] == "clip")
    rep["attack"]["target_text"] = clip["adversarial"]["zero_shot"]["labels"][0]
    assert side_verdict(rep, "baseline")["fooled"]
