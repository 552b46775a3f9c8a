"""The inspection service (what the page and `python -m vlm_inspect.inspect` show), on the shipped
embedded models, and the page's handlers without a browser."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_inspect.service import CURVE_EPS_K, InputError, InspectRequest, InspectService, label_sets

ROOT = Path(__file__).resolve().parents[1]
BASELINES = {"clip": "shapes-clip", "captioner": "shapes-captioner", "vqa": "shapes-vqa"}
COMBO, TEMPLATE = label_sets()["shapes: colour + shape (48)"]


@pytest.fixture(scope="module")
def service():
    return InspectService(model_dirs=[])


def request(**kw) -> InspectRequest:
    base = dict(baseline=dict(BASELINES), defended=dict(BASELINES), classes=COMBO, template=TEMPLATE,
                question="what shape is the green object?", eps_k=8, steps=5)
    base.update(kw)
    return InspectRequest(**base)


def test_report_has_the_design_keys(service, scene):
    ins = service.inspect(scene, request())
    rep = json.loads(json.dumps(ins.report))  # JSON-able
    assert {"name", "eps", "steps", "alpha", "norm"} <= set(rep["attack"])
    assert rep["attack"]["eps"] == pytest.approx(8 / 255)
    assert {"linf", "l2"} <= set(rep["perturbation"])
    assert rep["perturbation"]["linf"] <= 8 / 255 + 1e-6
    clip = rep["models"]["shapes-clip"]
    assert clip["clean"]["zero_shot"]["labels"][0] == "green square"
    assert len(clip["clean"]["zero_shot"]["probs"]) == 5
    assert "attention_shift" in clip["adversarial"]
    assert rep["models"]["shapes-captioner"]["clean"]["caption"].startswith("a large green square")
    assert rep["models"]["shapes-vqa"]["clean"]["answer"] == "square"
    assert "answer" in rep["models"]["shapes-vqa"]["adversarial"]
    # the same models on both sides: the defended side is reported under its own key
    assert rep["models"]["shapes-clip (defended)"]["role"] == "defended"
    for key in ("clean", "adversarial/baseline", "perturbation/baseline", "heatmap/baseline/clean",
                "heatmap/baseline/adversarial", "adversarial/defended", "heatmap/defended/adversarial"):
        assert ins.images[key].dtype == np.uint8 and ins.images[key].shape[-1] == 3, key


def test_pgd_hurts_the_baseline_and_eps_zero_changes_nothing(service, scene):
    hit = service.inspect(scene, request(eps_k=8)).report["models"]["shapes-clip"]["adversarial"]
    assert hit["confidence_change"] < -0.2 and hit["attention_shift"] > 0
    same = service.inspect(scene, request(eps_k=0)).report
    assert same["perturbation"]["linf"] == 0
    for entry in same["models"].values():
        for task in ("zero_shot", "caption", "answer"):
            if task in entry["clean"]:
                assert entry["adversarial"][task] == entry["clean"][task]


def test_each_side_is_attacked_white_box(service, scene):
    """Defended side = another model: it gets its own adversarial image, crafted against it."""
    rep = service.inspect(scene, request(defended={"clip": "shapes-clip", "captioner": None, "vqa": None},
                                         target="caption", eps_k=4)).report
    assert rep["models"]["shapes-captioner"]["attacked"] is True
    assert "baseline" in rep["perturbation"]["sides"]
    assert "defended" not in rep["perturbation"]["sides"]  # no captioner on the defended side: no attack
    assert "adversarial" not in rep["models"]["shapes-clip (defended)"]


def test_targeted_zero_shot_pulls_towards_the_target(service, scene):
    rep = service.inspect(scene, request(target_text="red circle", eps_k=16, steps=10)).report
    adv = rep["models"]["shapes-clip"]["adversarial"]["zero_shot"]
    assert rep["attack"]["targeted"] and adv["labels"][0] == "red circle"


def test_clean_results_are_cached(service, scene, monkeypatch):
    cap = service.model("shapes-captioner")
    batches = []
    real = type(cap).generate
    monkeypatch.setattr(type(cap), "generate", lambda self, px, **kw: batches.append(len(px)) or real(self, px, **kw))
    service.inspect(scene, request(defended={}, top_k=4))  # top_k=4: a clean-cache key no other test uses
    service.inspect(scene, request(defended={}, top_k=4, eps_k=2))  # only the adversarial side again
    assert batches == [2, 1]  # clean + adversarial in one batch, then the adversarial image alone


def test_captions_and_answers_are_generated_in_one_batch_per_model(service, scene, monkeypatch):
    """Every caption (answer) of a request comes from one batched call per model: the clean image once
    and each side's adversarial image when both sides use the model. Each equals the caption (answer)
    of that image generated alone."""
    seen: dict[str, list[tuple[torch.Tensor, list[str]]]] = {"generate": [], "answer": []}
    for name, method in (("shapes-captioner", "generate"), ("shapes-vqa", "answer")):
        cls = type(service.model(name))
        real = getattr(cls, method)

        def spy(self, px, *a, _real=real, _key=method, **kw):
            out = _real(self, px, *a, **kw)
            seen[_key].append((px.clone(), out))
            return out
        monkeypatch.setattr(cls, method, spy)
    rep = service.inspect(scene, request(top_k=6, steps=3)).report  # top_k=6: not cached by another test
    assert [len(px) for px, _ in seen["generate"]] == [3] and [len(px) for px, _ in seen["answer"]] == [3]
    (caps_px, caps), (ans_px, answers) = seen["generate"][0], seen["answer"][0]
    cap, vqa = service.model("shapes-captioner"), service.model("shapes-vqa")
    alone_caps = [cap.generate(caps_px[i:i + 1])[0] for i in range(3)]
    alone_ans = [vqa.answer(ans_px[i:i + 1], [rep["question"]])[0] for i in range(3)]
    assert caps == alone_caps and answers == alone_ans
    reported_caps = [rep["models"]["shapes-captioner"]["clean"]["caption"],
                     rep["models"]["shapes-captioner"]["adversarial"]["caption"],
                     rep["models"]["shapes-captioner (defended)"]["adversarial"]["caption"]]
    assert reported_caps == caps
    assert rep["models"]["shapes-captioner (defended)"]["clean"]["caption"] == caps[0]
    reported_ans = [rep["models"]["shapes-vqa"]["clean"]["answer"], rep["models"]["shapes-vqa"]["adversarial"]["answer"],
                    rep["models"]["shapes-vqa (defended)"]["adversarial"]["answer"]]
    assert reported_ans == answers


def test_caption_target_batches_the_adversarial_captions(service, scene, monkeypatch):
    """With the caption as the attack's target the clean caption is needed before the attack; the two
    sides' adversarial captions (each side's image, and each shown to the other side's captioner for the
    transfer matrix) still come from one batch, and a cached clean caption is reused only at the
    precision it was computed at."""
    cap = service.model("shapes-captioner")
    batches = []
    real = type(cap).generate
    monkeypatch.setattr(type(cap), "generate", lambda self, px, **kw: batches.append(len(px)) or real(self, px, **kw))
    service.inspect(scene, request(target="caption", top_k=7, steps=2))  # top_k=7: not cached by another test
    assert batches == [1, 4]  # clean (before the attacks), then the matrix's four images together
    monkeypatch.setattr(InspectService, "precision_for", lambda self, models: "bf16")
    service.inspect(scene, request(target="caption", top_k=7, steps=1))
    assert batches == [1, 4, 1, 4]  # the fp32 clean caption is not served to a bf16 request


def test_every_heatmap_and_attack_runs(service, scene):
    for attack, norm, heatmap, target in (("fgsm", "linf", "gradcam", "vqa"), ("bim", "l2", "attention", "caption"),
                                          ("pgd", "l2", "gradcam", "embedding")):
        rep = service.inspect(scene, request(attack=attack, norm=norm, heatmap=heatmap, target=target, eps_k=4)).report
        side = rep["perturbation"]["sides"]["baseline"]
        radius = 4 / 255 * (1 if norm == "linf" else (3 * 64 * 64) ** 0.5)  # L2: same RMS change as L-inf
        assert side["budget"] == pytest.approx(radius) and 0 < side[norm] <= radius + 1e-5, (attack, norm)
        assert rep["heatmap"] == heatmap


@pytest.mark.parametrize("change, message", [
    ({"eps_k": 99}, "epsilon (k/255) must be from 0 to 32"),
    ({"eps_k": None}, "epsilon (k/255) is missing"),
    ({"steps": 0}, "steps must be from 1 to 100"),
    ({"steps": 2.5}, "steps must be a whole number"),
    ({"seed": -1}, "seed must be from 0"),
    ({"attack": "cw"}, "unknown attack 'cw'"),
    ({"classes": ""}, "needs at least two class names"),
    ({"classes": "red circle"}, "needs at least two class names"),
    ({"question": ""}, "the VQA model needs a question"),
    ({"baseline": {"clip": "shapes-clip"}, "defended": {}}, "no VQA model is selected"),
    ({"target_text": "purple unicorn"}, "is not among the classes"),
    ({"target": "embedding", "target_text": "x"}, "the embedding attack has no target"),
    ({"baseline": {}, "defended": {}, "question": ""}, "no model is selected"),
    ({"template": "a photo"}, "must contain {} exactly once"),
    ({"target": "caption", "baseline": {"clip": "shapes-clip"}, "defended": {}, "question": ""},
     "no captioner model is selected"),
])
def test_bad_requests_say_what_is_wrong(service, scene, change, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        service.inspect(scene, request(**change))


def test_unknown_words_are_flagged(service, scene):
    ins = service.inspect(scene, request(classes="green square, unicorn", question="what color is the zebra?",
                                         eps_k=1, steps=1))
    text = " ".join(ins.warnings)
    assert "'unicorn'" in text and "'zebra'" in text


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "I;16", "CMYK", "gif-animated", "exif-rotated"])
def test_odd_images_are_inspected(service, scene, mode):
    img = Image.fromarray(scene)
    buf = io.BytesIO()
    if mode == "gif-animated":
        img.save(buf, "GIF", save_all=True, append_images=[Image.new("RGB", img.size, "red")], duration=100)
    elif mode == "exif-rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90° on display
        img.save(buf, "JPEG", exif=exif)
    elif mode == "I;16":
        Image.fromarray((np.asarray(img.convert("L"), dtype=np.uint16) * 257)).save(buf, "PNG")
    else:
        img.convert(mode).save(buf, "TIFF" if mode == "CMYK" else "PNG")
    rep = service.inspect(buf.getvalue(), request(eps_k=1, steps=1)).report
    assert rep["models"]["shapes-clip"]["clean"]["zero_shot"]["labels"]


def test_curve_is_one_batched_run_per_side(service, scene):
    curve = service.curve(scene, request(defended={"clip": "shapes-clip"}, steps=5))
    assert curve["eps_k255"] == list(CURVE_EPS_K) and len(CURVE_EPS_K) == 8
    base = curve["series"]["baseline"]["values"]
    clean_p = service.inspect(scene, request(eps_k=0, steps=1)).report["models"]["shapes-clip"]["clean"]["zero_shot"]
    assert base[0] == pytest.approx(clean_p["probs"][0], abs=1e-4)
    assert base[-1] < base[0] - 0.3
    assert curve["series"]["defended"]["values"] == pytest.approx(base, abs=1e-4)  # same model, same seed


def test_embedding_attack_without_a_random_start_warns(service, scene):
    ins = service.inspect(scene, request(defended={}, steps=1, attack="bim", target="embedding"))
    assert any("needs an attack with a random start" in w and "BIM" in w for w in ins.warnings), ins.warnings


@pytest.mark.parametrize("target", ["caption", "vqa", "embedding"])
def test_curve_of_every_task(service, scene, target):
    """The curve of a caption, an answer or the embedding: one batched attack per side over the repeated
    image (the caption and answer curves used to fail: one clean text for several images)."""
    curve = service.curve(scene, request(defended={}, steps=2, target=target), eps_k=[0, 4, 16])
    values = curve["series"]["baseline"]["values"]
    assert len(values) == 3 and all(0 <= v <= 1 + 1e-6 for v in values)
    assert values[0] > values[2]  # the attack lowers the metric
    if target == "embedding":
        assert values[0] == pytest.approx(1.0, abs=1e-5)


def test_models_appear_and_reload_when_their_checkpoint_changes(tmp_path, scene):
    runs = tmp_path / "runs"
    (runs / "mine").mkdir(parents=True)
    for f in ("model.safetensors", "config.json"):
        shutil.copy(ROOT / "checkpoints" / "shapes-clip" / f, runs / "mine" / f)
    svc = InspectService(model_dirs=[runs])
    name = str(runs / "mine")
    assert name in svc.models("clip") and name not in svc.models("vqa")
    first = svc.model(name)
    assert svc.model(name) is first
    from safetensors.torch import load_file, save_file

    weights = load_file(runs / "mine" / "model.safetensors")
    save_file({k: v * 0.5 if v.is_floating_point() else v for k, v in weights.items()},
              str(runs / "mine" / "model.safetensors"), metadata={"format": "pt"})
    second = svc.model(name)
    assert second is not first
    assert not torch.equal(next(second.parameters()), next(first.parameters()))


def test_defaults_pick_a_defended_checkpoint_when_one_exists(tmp_path, monkeypatch):
    for name in ("shapes-clip", "shapes-captioner", "shapes-vqa"):
        (tmp_path / name).symlink_to(ROOT / "checkpoints" / name)
    (tmp_path / "shapes-clip+tecoa").symlink_to(ROOT / "checkpoints" / "shapes-clip")
    monkeypatch.setenv("VLM_INSPECT_CHECKPOINTS", str(tmp_path))
    d = InspectService(model_dirs=[]).defaults()
    assert d["baseline"] == BASELINES
    assert d["defended"] == {"clip": "shapes-clip+tecoa", "captioner": None, "vqa": None}
    (tmp_path / "shapes-clip+tga-zsr").symlink_to(ROOT / "checkpoints" / "shapes-clip")
    assert InspectService(model_dirs=[]).defaults()["defended"]["clip"] == "shapes-clip+tga-zsr"  # a paper first


def test_report_png_and_headless_twin(tmp_path):
    from vlm_inspect.inspect import main

    img = ROOT / "assets" / "shapes_plain_3.png"
    assert main([str(img), "--out", str(tmp_path / "one"), "--eps", "8/255", "--steps", "3", "--curve"]) == 0
    rep = json.loads((tmp_path / "one" / "report.json").read_text())
    assert rep["attack"]["name"] == "pgd" and rep["attack"]["eps"] == pytest.approx(8 / 255)
    assert rep["models"]["shapes-clip"]["clean"]["zero_shot"]["labels"][0] == "purple triangle"
    for f in ("report.png", "curve.png"):
        assert (tmp_path / "one" / f).stat().st_size > 10_000
    assert json.loads((tmp_path / "one" / "curve.json").read_text())["series"]["baseline"]["values"][0] > 0.5
    assert Image.open(tmp_path / "one" / "report.png").size[0] > 1000
    # two images: a folder each; a bad option is one line on stderr and exit status 2
    assert main([str(img), str(ROOT / "assets" / "photo_coffee.jpg"), "--out", str(tmp_path / "two"),
                 "--steps", "1", "--baseline", "vqa=none", "--defended", "vqa=none", "--question", ""]) == 0
    assert (tmp_path / "two" / "photo_coffee" / "report.json").is_file()
    assert main([str(img), "--out", str(tmp_path / "bad"), "--eps", "64/255"]) == 2
    assert main([str(tmp_path / "missing.png"), "--out", str(tmp_path / "bad")]) == 2


def test_handlers_lay_out_an_inspection_and_export_it(service, scene):
    import gradio as gr

    from vlm_inspect.ui import handlers as H

    ins = service.inspect(scene, request(defended={}, eps_k=4, steps=2))
    out = H.inspection_outputs(ins)
    assert len(out) == len(H.OUTPUT_IMAGES) + 1 + 4 * 2 + 2
    assert out[0].shape == (256, 256, 3)                       # clean
    assert out[H.OUTPUT_IMAGES.index("adversarial/defended")] is None
    assert ins.report["verdicts"]["baseline"]["text"] in out[len(H.OUTPUT_IMAGES) + 1]  # the verdict first
    base_clean = out[len(H.OUTPUT_IMAGES) + 2]
    assert max(base_clean, key=base_clean.get) == "green square"
    assert "No defended model selected" in out[-3]
    assert out[-2] == ""  # no transfer matrix with one side: its only cell is the panel
    png, js = H.export(ins)
    assert Path(png).stat().st_size > 10_000 and json.loads(Path(js).read_text())["attack"]["name"] == "pgd"
    with pytest.raises(gr.Error, match="run an inspection first"):
        H.export(None)
    assert H.label_set_values("shapes: count (3)") == ("one, two, three", "a photo of {} shapes")
    ups = H.dropdown_updates(service, "embedded", ["shapes-clip", "gone", None, None, None, None])
    assert ups[0]["value"] == "shapes-clip" and ups[2]["value"] == "shapes-vqa"  # unset -> default
    assert ups[1]["value"] == "gone"  # a typed-in name is kept (loading it says what is wrong)
    assert ups[3]["value"] == (service.defaults()["defended"]["clip"] or H.NONE) and H.NONE in ups[3]["choices"]


def test_guarded_handlers_turn_mistakes_into_messages():
    import gradio as gr

    from vlm_inspect.ui.handlers import guarded

    def boom(kind):
        raise {"input": InputError("epsilon (k/255) must be from 0 to 32"), "bug": KeyError("x")}[kind]

    with pytest.raises(gr.Error, match="epsilon"):
        guarded(boom)("input")
    with pytest.raises(gr.Error, match="failed unexpectedly"):
        guarded(boom)("bug")


@pytest.mark.parametrize("defended", ["shapes-clip+tecoa", "shapes-clip+tga-zsr", "shapes-clip+fare", "shapes-clip+apd",
                                      "shapes-clip+capt"])
def test_each_shipped_defense_is_offered_and_inspected(service, scene, defended):
    """The five shipped defended CLIPs (two of them prompt-only checkpoints) are in the model list and run
    a whole inspection with either heatmap."""
    assert defended in service.models("clip")
    for heatmap in ("attention", "gradcam"):
        rep = service.inspect(scene, request(baseline={"clip": "shapes-clip"}, defended={"clip": defended},
                                             question="", heatmap=heatmap, eps_k=2)).report
        entry = rep["models"][defended]
        assert entry["role"] == "defended" and len(entry["adversarial"]["zero_shot"]["probs"]) == 5
        assert rep["heatmap"] == heatmap


@pytest.mark.parametrize("family,defended", [("captioner", "shapes-captioner+fgsm-decoder"),
                                             ("captioner", "shapes-captioner+prsl"), ("vqa", "shapes-vqa+prsl")])
def test_shipped_captioning_and_vqa_defenses_are_offered_and_inspected(service, scene, family, defended):
    """The defended captioners and VQA model (partial checkpoints on their base) are listed, are the
    defended side by default, and run a whole inspection attacked through their own task."""
    assert defended in service.models(family)
    assert service.defaults()["defended"][family] in {"captioner": {"shapes-captioner+fgsm-decoder"},
                                                      "vqa": {"shapes-vqa+prsl"}}[family]
    target = "caption" if family == "captioner" else "vqa"
    rep = service.inspect(scene, request(defended={**BASELINES, family: defended}, target=target, eps_k=4)).report
    entry = rep["models"][defended]
    key = "caption" if family == "captioner" else "answer"
    assert entry["role"] == "defended" and entry["clean"][key] and key in entry["adversarial"]
    assert rep["models"][BASELINES[family]]["role"] == "baseline"


@pytest.mark.parametrize("precision, expect", [("auto", False), ("bf16", True)])
def test_auto_precision_generates_text_in_fp32_on_the_cpu(scene, monkeypatch, precision, expect):
    """Under ``auto`` a request that runs its attacks in bf16 still decodes captions and answers in fp32
    on a CPU (autocast re-casts frozen weights for every token), while the image encoders feeding the
    decoders keep bf16; an explicit bf16 is obeyed everywhere."""
    service = InspectService(model_dirs=[], precision=precision)
    monkeypatch.setattr(InspectService, "precision_for", lambda self, models: "bf16")  # as for a big model
    cap, vqa, clip = (service.model(n) for n in ("shapes-captioner", "shapes-vqa", "shapes-clip"))
    seen: dict[str, list[bool]] = {k: [] for k in ("decode caption", "decode answer", "caption encoder",
                                                   "answer encoder", "attack")}
    for key, cls, method in (("decode caption", type(cap.model), "generate"),
                             ("decode answer", type(vqa.model.text_decoder), "generate"),
                             ("caption encoder", type(cap.model.encoder), "forward"),
                             ("answer encoder", type(vqa.model.vision_model), "forward"),
                             ("attack", type(clip), "encode_image")):
        real = getattr(cls, method)

        def spy(self, *a, _real=real, _key=key, **kw):
            seen[_key].append(torch.is_autocast_enabled("cpu"))
            return _real(self, *a, **kw)
        monkeypatch.setattr(cls, method, spy)
    ins = service.inspect(scene, request(defended={}, steps=1))
    assert ins.report["runtime"] == {"device": "cpu", "precision": "bf16",
                                     "generation_precision": "bf16" if expect else "fp32"}
    assert seen["decode caption"] and set(seen["decode caption"]) == {expect}
    assert seen["decode answer"] and set(seen["decode answer"]) == {expect}
    for key in ("caption encoder", "answer encoder", "attack"):  # bf16 either way
        assert seen[key] and set(seen[key]) == {True}, key
