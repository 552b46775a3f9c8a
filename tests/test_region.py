"""The attacks without an epsilon: the typographic attack (a written word) and the adversarial patch, in
the attack layer, the service, ``inspect`` and ``evaluate``; their bad inputs get one sentence each."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import embedded
from vlm_inspect.attacks import ATTACKS, Patch, Typographic, is_bounded
from vlm_inspect.attacks.base import SettingError
from vlm_inspect.attacks.patch import load_patch, save_patch
from vlm_inspect.attacks.placement import CELLS
from vlm_inspect.images import ImageError, image_pixels
from vlm_inspect.objectives import caption_nll, zero_shot_ce

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "assets" / "shapes_plain_3.png"
CLASSES = ["purple triangle", "red star", "blue circle", "green square"]
PROMPTS = [f"a photo of a {c}" for c in CLASSES]


def scene(b: int = 2) -> torch.Tensor:
    return image_pixels(SCENE, 64).repeat(b, 1, 1, 1)


def clip_objective(b: int = 2):
    return zero_shot_ce(embedded("shapes-clip"), PROMPTS, [0] * b)


def test_registered_without_an_epsilon():
    assert not is_bounded("typographic") and not is_bounded("patch") and is_bounded("pgd")
    assert "word" in ATTACKS.parameters("typographic") and "patch_side" in ATTACKS.parameters("patch")


def test_the_search_keeps_the_worst_cell_for_each_image():
    x = torch.cat([scene(1), torch.rand(1, 3, 64, 64)])
    objective = clip_objective()
    res = Typographic(word="red star")(x, objective)
    assert res.info["position"][0] in CELLS and len(res.losses) == len(CELLS)
    with torch.no_grad():
        per_cell = torch.stack([objective(Typographic(word="red star", position=c)(x, objective).adv) for c in CELLS])
        chosen = objective(res.adv)
    assert torch.allclose(chosen, per_cell.max(0).values)
    for i in range(2):
        assert res.info["position"][i] == CELLS[int(per_cell[:, i].argmax())]
    targeted = Typographic(word="red star")(x, objective, targeted=True)  # a target: the lowest loss
    with torch.no_grad():
        assert torch.allclose(objective(targeted.adv), per_cell.min(0).values)


def test_letters_size_colour_opacity_and_fit():
    x = torch.zeros(1, 3, 64, 64)
    objective = clip_objective(1)
    small = Typographic(word="star", text_size=0.1, position="centre", colour="red")(x, objective)
    big = Typographic(word="star", text_size=0.3, position="centre", colour="red")(x, objective)
    assert big.info["region"].sum() > 3 * small.info["region"].sum()
    assert small.adv[0, 1:].abs().max() == 0 and small.adv[0, 0].max() == 1  # red ink on black
    half = Typographic(word="star", text_size=0.3, position="centre", colour="red", opacity=0.5)(x, objective)
    assert torch.allclose(half.adv, big.adv * 0.5, atol=1e-6)
    # a word too long for the image is drawn smaller until it fits inside the margins
    long = Typographic(word="typographic", text_size=0.5, position="top-left")(x, objective)
    assert long.info["font_px"][0] < 32
    cols = long.info["region"][0, 0].any(0).nonzero()
    assert cols.min() >= 1 and cols.max() <= 62
    with pytest.raises(SettingError, match="does not fit on a 64-pixel-wide image"):
        Typographic(word="a very long typographic label")(x, objective)
    top = Typographic(word="star", position="top-left")(x, objective).info["region"][0, 0]
    bottom = Typographic(word="star", position="bottom-right")(x, objective).info["region"][0, 0]
    assert top.any(1).nonzero().max() < bottom.any(1).nonzero().min()


def test_one_word_per_image_and_the_caption_objective():
    x = scene(2)
    objective = caption_nll(embedded("shapes-captioner"), ["a small purple triangle"] * 2)
    res = Typographic(word=["star", "diamond"], position="bottom")(x, objective)
    assert not torch.equal(res.info["region"][0], res.info["region"][1])
    with pytest.raises(ValueError, match="3 typographic words for a batch of 2"):
        Typographic(word=["a", "b", "c"])(x, objective)


@pytest.mark.parametrize("settings,message", [
    ({"word": "   "}, "needs a word to write"),
    ({"word": "x" * 41}, "at most 40 characters"),
    ({"word": "dog", "font": "ComicSans"}, "cannot be found among the fonts matplotlib ships"),
    ({"word": "dog", "font": "/etc/passwd"}, "cannot be found"),
    ({"word": "dog", "colour": "not-a-colour"}, "cannot read the colour"),
    ({"word": "dog", "opacity": 0}, "more than 0 and at most 1"),
    ({"word": "dog", "text_size": 2}, "more than 0 and at most 1"),
    ({"word": "dog", "position": "middle-earth"}, "unknown position"),
])
def test_typographic_bad_settings_are_one_sentence(settings, message):
    with pytest.raises(ValueError, match=message):
        Typographic(**settings)


def test_patch_stays_in_its_square_and_a_universal_patch_is_one_for_all():
    x = scene(3)
    objective = clip_objective(3)
    res = Patch(patch_side=0.25, steps=5, position="top-left")(x, objective, generator=torch.Generator().manual_seed(0))
    region = res.info["region"]
    assert int(region[0].sum()) == 16 * 16 and res.info["side_px"] == 16
    assert (res.delta.abs() * ~region).max() == 0 and res.adv.min() >= 0 and res.adv.max() <= 1
    uni = Patch(patch_side=0.25, steps=5, position="centre", universal=True)(
        x, objective, generator=torch.Generator().manual_seed(0))
    inside = uni.adv[:, :, uni.info["region"][0, 0]]
    assert torch.equal(inside[0], inside[1]) and torch.equal(inside[1], inside[2])
    assert uni.info["patch"].shape == (3, 16, 16)
    with torch.no_grad():
        assert (objective(uni.adv) > objective(x)).all()


def test_a_saved_patch_loads_back_exactly_and_applies_anywhere(tmp_path):
    x = scene(2)
    objective = clip_objective(2)
    uni = Patch(patch_side=0.25, steps=3, universal=True)(x, objective, generator=torch.Generator().manual_seed(1))
    path = save_patch(uni.info["patch"], tmp_path / "patch.png", 0.25)
    patch, side = load_patch(path)
    assert side == 0.25 and torch.allclose(patch, uni.info["patch"], atol=0.5 / 255)
    # applied (not optimised) at a fixed cell: only that square changes, to the patch's pixels
    applied = Patch(patch_side=0.25, patch=patch, position="bottom-right")(x, objective)
    region = applied.info["region"][0, 0]
    assert region[-1].sum() == 0 and region[:, -1].sum() == 0 and region[-16:].any() and region[:, -16:].any()
    for i in range(2):
        assert torch.allclose(applied.adv[i][:, region].view(3, 16, 16), patch, atol=1e-6)
    # a patch made at one size is resized to the side asked for
    assert int(Patch(patch_side=0.5, patch=patch, position="centre")(x, objective).info["region"][0].sum()) == 32 * 32


@pytest.mark.parametrize("side,message", [(0, "of size 0"), (1.5, "larger than the image"), (-0.1, "negative"),
                                          ("big", "fraction of the image side")])
def test_patch_sizes_that_cannot_be_placed(side, message):
    with pytest.raises(ValueError, match=message):
        Patch(patch_side=side)


def test_a_sub_pixel_patch_and_an_unreadable_patch_image(tmp_path):
    with pytest.raises(ValueError, match="less than a pixel"):
        Patch(patch_side=0.005)(scene(1), clip_objective(1))
    bad = tmp_path / "patch.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageError, match="could not read"):
        load_patch(bad)
    with pytest.raises(ValueError, match=r"\(3, s, s\)"):
        Patch(patch=torch.rand(16, 16))


# ---- the service: the page's, the API's and inspect's one computation ----

@pytest.fixture(scope="module")
def service():
    from vlm_inspect.service import InspectService

    return InspectService(suite="embedded")


def request(service, **kw):
    from vlm_inspect.service import InspectRequest

    fields = service.suite_fields("embedded", {"baseline": {"captioner": None, "vqa": None},
                                              "defended": {"captioner": None, "vqa": None}}, CLASSES, "", None)
    return InspectRequest(**{**fields, "question": "", **kw})


def test_service_typographic_writes_the_target_class_and_reports_the_threat(service):
    from vlm_inspect.service import InputError

    with pytest.raises(InputError, match="needs a word to write"):
        request(service, attack="typographic").validate()
    ins = service.inspect(SCENE, request(service, attack="typographic", target_text="red star"))
    a = ins.report["attack"]
    assert a["eps"] is None and a["threat"]["word"] == "red star" and a["targeted"]
    for side in ("baseline", "defended"):
        p = ins.report["perturbation"]["sides"][side]
        assert p["budget"] is None and p["position"] in CELLS and 0 < p["area"] < 0.2
    assert len(ins.report["transfer"]["cells"]) == 4  # the matrix works for every threat model
    for bad in (dict(font="Nope"), dict(colour="#12"), dict(position="under")):
        with pytest.raises(InputError):
            request(service, attack="typographic", word="dog", **bad).validate()
    # the curve and the AutoAttack check are epsilon sweeps: one sentence
    with pytest.raises(InputError, match="has no epsilon"):
        service.curve(SCENE, request(service, attack="typographic", word="dog"))
    with pytest.raises(InputError, match="has no epsilon"):
        service.check(SCENE, request(service, attack="patch"))


def test_service_applies_an_uploaded_patch_and_refuses_an_unreadable_one(service):
    from vlm_inspect.service import InputError

    patch = torch.zeros(3, 8, 8)
    patch[0] = 1.0  # a red square
    buf = io.BytesIO()
    Image.fromarray((patch.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(buf, format="PNG")
    ins = service.inspect(SCENE, request(service, attack="patch", patch=buf.getvalue(), patch_side=0.25,
                                         position="top-left"))
    adv = ins.images["adversarial/baseline"]
    assert ins.report["attack"]["threat"]["patch"] == "given"
    k = adv.shape[0] // 4  # the display image is a scaled copy: the top-left square is red
    corner = adv[k // 4: k, k // 4: k]
    assert corner[..., 0].min() > 200 and corner[..., 1:].max() < 60
    with pytest.raises(InputError, match="could not read the patch image"):
        request(service, attack="patch", patch=b"not a png").validate()
    with pytest.raises(InputError, match="larger than the image"):
        request(service, attack="patch", patch_side=3).validate()


def test_inspect_writes_the_patch_and_applies_it_again(tmp_path):
    from vlm_inspect.inspect import main

    common = [str(SCENE), "--baseline", "captioner=none,vqa=none", "--defended", "captioner=none,vqa=none",
              "--classes", ",".join(CLASSES), "--attack", "patch", "--patch-side", "0.25", "--steps", "3"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    saved = tmp_path / "a" / "patch_baseline.png"
    patch, side = load_patch(saved)
    assert side == 0.25 and patch.shape == (3, 16, 16)
    assert main([*common, "--patch", str(saved), "--position", "centre", "--out", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["attack"]["threat"]["patch"] == "given" and report["perturbation"]["sides"]["baseline"]["position"] == "centre"
    assert main([*common, "--patch", str(tmp_path / "missing.png"), "--out", str(tmp_path / "c")]) == 2


# ---- evaluate ----

def test_evaluate_typographic_and_a_universal_patch(tmp_path, capsys):
    from vlm_inspect.evaluate.cli import main

    out = tmp_path / "region.md"
    assert main(["--models", "shapes-clip", "--data", "shapes:shapes-combo", "--attack", "typographic,patch",
                 "--universal", "--fit-samples", "8", "--steps", "3", "--samples", "12", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    got = {(r["attack"], r["metric"]): r["value"] for r in rows}
    assert set(got) == {("none", "top1"), ("typographic", "top1"), ("typographic", "reads"),
                        ("universal patch 0.1", "top1")}
    assert all(0 <= v <= 1 for v in got.values())
    assert f"wrote {out}, {out.with_suffix('.json')}\n" in capsys.readouterr().out  # no epsilon: no plot
    assert not out.with_suffix(".png").exists()
    text = out.read_text()
    assert "**reads**" in text and "universal patch 0.1" in text and "python -m vlm_inspect.evaluate" in text
    saved = tmp_path / "region_shapes-clip_shapes-combo_patch.png"
    patch, side = load_patch(saved)
    assert side == 0.1 and patch.shape[-1] == round(0.1 * 64)


def test_evaluate_typographic_captions_count_the_word(tmp_path):
    from vlm_inspect.evaluate.region import RegionSpec, evaluate_region

    rows = evaluate_region(["shapes-captioner"], ["shapes:shapes-scenes"],
                           [RegionSpec("typographic", {"text_size": 0.25})], n=6, batch_size=6)
    got = {(r["attack"], r["metric"]) for r in rows}
    assert {("none", "mentions"), ("typographic", "mentions"), ("typographic", "mentions_decoy"),
            ("typographic", "cider")} <= got


@pytest.mark.parametrize("argv,message", [
    (["--attack", "patch", "--patch-side", "0"], "of size 0"),
    (["--attack", "typographic", "--font", "Nope"], "cannot be found"),
    (["--attack", "pgd", "--universal"], "--universal applies to --attack patch"),
])
def test_evaluate_bad_region_settings(argv, message, capsys):
    from vlm_inspect.evaluate.cli import main

    assert main(["--models", "shapes-clip", "--samples", "2", *argv]) == 2
    assert message in capsys.readouterr().err


def test_evaluate_refuses_vqa_for_region_attacks():
    from vlm_inspect.evaluate.region import RegionSpec, evaluate_region

    with pytest.raises(ValueError, match="VQA model"):
        evaluate_region(["shapes-vqa"], None, [RegionSpec("typographic")], n=2)


def test_evaluate_writes_the_word_it_is_given_or_a_wrong_class_per_image(monkeypatch):
    from vlm_inspect.evaluate import region as R

    seen: list = []
    build = R.RegionSpec.build

    def spy(self, **extra):
        seen.append(extra.get("word"))
        return build(self, **extra)

    monkeypatch.setattr(R.RegionSpec, "build", spy)
    rows = R.evaluate_region(["shapes-clip"], ["shapes:shapes-combo"], [R.RegionSpec("typographic", word="hello")], n=6)
    assert seen[-1] == ["hello"] * 6
    assert not [r for r in rows if r["metric"] == "reads"]  # no class is called hello: nothing to read
    R.evaluate_region(["shapes-clip"], ["shapes:shapes-combo"], [R.RegionSpec("typographic")], n=6)
    from vlm_inspect.data.sources import open_data

    ds = open_data("shapes:shapes-combo", "test", seed=0, length=6)
    own = [ds.classes[ds[i]["label"]] for i in range(6)]
    assert len(seen[-1]) == 6 and all(w in ds.classes and w != o for w, o in zip(seen[-1], own))
