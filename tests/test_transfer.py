"""Transfer between the two sides (service/transfer.py): the matrix, crafting on the other side's model
or on both at once (objectives/ensemble.py), checked against attacks run by hand."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from test_service import COMBO, TEMPLATE
from vlm_inspect.attacks import PGD
from vlm_inspect.images import image_pixels, resize_pixels
from vlm_inspect.models import load
from vlm_inspect.objectives import Ensemble, zero_shot_ce
from vlm_inspect.service import InputError, InspectRequest, InspectService, matrix_markdown

CLIPS = {"baseline": "shapes-clip", "defended": "shapes-clip+tecoa"}
PROMPTS = [TEMPLATE.replace("{}", c) for c in COMBO]
CLASSES = list(COMBO)


@pytest.fixture(scope="module")
def service():
    return InspectService(model_dirs=[])


def request(crafted_on="own", **kw) -> InspectRequest:
    base = dict(baseline={"clip": CLIPS["baseline"], "captioner": None, "vqa": None},
                defended={"clip": CLIPS["defended"], "captioner": None, "vqa": None},
                classes=COMBO, template=TEMPLATE, eps_k=4, steps=10, crafted_on=crafted_on)
    base.update(kw)
    return InspectRequest(**base)


def by_hand(img, crafted_on: str, shown_to: str, eps_k=4, steps=10, seed=0):
    """The cell recomputed directly: PGD as the service builds it, the model's top-1 and probability."""
    models = {s: load(n) for s, n in CLIPS.items()}
    px = image_pixels(img, 64)
    top1 = {}
    for s, m in models.items():
        with torch.no_grad():
            top1[s] = int(m.zero_shot_logits(px, PROMPTS).argmax(-1))
    if crafted_on == "ensemble":
        obj = Ensemble([zero_shot_ce(models[s], PROMPTS, [top1[s]]) for s in models], [64, 64])
    else:
        obj = zero_shot_ce(models[crafted_on], PROMPTS, [top1[crafted_on]])
    adv = PGD(eps=eps_k / 255, steps=steps)(px, obj, generator=torch.Generator().manual_seed(seed)).adv
    with torch.no_grad():
        p = models[shown_to].zero_shot_logits(adv, PROMPTS).softmax(-1)[0]
    return CLASSES[int(p.argmax())], float(p.max()), CLASSES[top1[shown_to]]


def cells(report):
    return {(c["crafted_on"], c["shown_to"]): c for c in report["transfer"]["cells"]}


def test_the_matrix_of_white_box_inspection(service, scene):
    rep = json.loads(json.dumps(service.inspect(scene, request()).report))  # JSON-able
    t = rep["transfer"]
    assert t["rows"] == ["baseline", "defended"] and t["columns"] == ["baseline", "defended"]
    c = cells(rep)
    assert {k: v["threat"] for k, v in c.items()} == {
        ("baseline", "baseline"): "white-box", ("baseline", "defended"): "transfer",
        ("defended", "baseline"): "transfer", ("defended", "defended"): "white-box"}
    # the diagonal is what the sides show
    for side, name in CLIPS.items():
        adv = rep["models"][name]["adversarial"]["zero_shot"]
        assert c[side, side]["output"] == adv["labels"][0] and c[side, side]["p"] == pytest.approx(adv["probs"][0])
        assert c[side, side]["attention_shift"] == pytest.approx(rep["models"][name]["adversarial"]["attention_shift"])
    # an off-diagonal cell: the baseline's image shown to the defended model, recomputed by hand
    label, p, clean = by_hand(scene, "baseline", "defended")
    assert c["baseline", "defended"]["output"] == label
    assert c["baseline", "defended"]["p"] == pytest.approx(p, abs=1e-4)
    assert c["baseline", "defended"]["fooled"] == (label != clean)
    table = matrix_markdown(rep)
    assert "crafted on baseline (shapes-clip)" in table and "shown to defended (shapes-clip+tecoa)" in table


def test_crafted_on_the_other_side(service, scene):
    own = cells(service.inspect(scene, request()).report)
    rep = service.inspect(scene, request("other")).report
    for side, other in (("baseline", "defended"), ("defended", "baseline")):
        shown = rep["models"][CLIPS[side]]["adversarial"]["zero_shot"]["labels"][0]
        assert shown == own[other, side]["output"]  # each side shows the image crafted on the other's model
        assert rep["perturbation"]["sides"][side]["crafted_on"] == other
        assert rep["perturbation"]["sides"][side]["model"] == CLIPS[other]
        assert f"crafted on the {other} model" in rep["verdicts"][side]["text"]
        assert rep["models"][CLIPS[side]]["attacked"] is False
    assert rep["attack"]["crafted_on"] == "other"


def test_crafted_on_both_at_once(service, scene):
    rep = service.inspect(scene, request("ensemble")).report
    assert rep["transfer"]["rows"] == ["ensemble"]
    c = cells(rep)
    assert {v["threat"] for v in c.values()} == {"ensemble"}
    assert c["ensemble", "baseline"]["crafted_on_models"] == "shapes-clip + shapes-clip+tecoa"
    for side in CLIPS:
        label, p, _ = by_hand(scene, "ensemble", side)
        assert c["ensemble", side]["output"] == label and c["ensemble", side]["p"] == pytest.approx(p, abs=1e-4)
        assert rep["models"][CLIPS[side]]["attacked"] is True  # both models were attacked, together


def test_caption_matrix_and_attention_of_each_side(service, scene):
    req = request(baseline={"clip": "shapes-clip", "captioner": "shapes-captioner", "vqa": None},
                  defended={"clip": "shapes-clip+tecoa", "captioner": "shapes-captioner+fgsm-decoder", "vqa": None},
                  target="caption", eps_k=8, steps=5)
    rep = service.inspect(scene, req).report
    c = cells(rep)
    assert len(c) == 4 and all(isinstance(v["output"], str) and v["output"] for v in c.values())
    assert c["baseline", "baseline"]["output"] == rep["models"]["shapes-captioner"]["adversarial"]["caption"]
    assert all(v["attention_shift"] is not None for v in c.values())  # from each side's CLIP
    assert "p" not in c["baseline", "defended"]


def test_ensemble_objective_guards_every_model_and_means_the_losses():
    a, b = load("shapes-clip"), load("shapes-clip+tecoa")
    px = torch.rand(2, 3, 96, 96)  # crafted larger than the models' input: each sees it at its own size
    pa, pb = zero_shot_ce(a, PROMPTS, [0, 1]), zero_shot_ce(b, PROMPTS, [0, 1])
    ens = Ensemble([pa, pb], [64, 64])
    with torch.no_grad():
        want = (pa(resize_pixels(px, 64)) + pb(resize_pixels(px, 64))) / 2
        assert torch.allclose(ens(px), want, atol=1e-6)
    a.train()
    res = PGD(eps=4 / 255, steps=2)(px, ens, generator=torch.Generator().manual_seed(0))
    assert a.training and not b.training  # modes restored
    assert all(p.grad is None and p.requires_grad for m in (a, b) for p in m.parameters())
    a.eval()
    assert (res.delta.abs() <= 4 / 255 + 1e-6).all()
    with torch.no_grad():
        ens(res.adv)
        assert torch.equal(ens.fooled(), pa.fooled() & pb.fooled())
    with pytest.raises(ValueError, match="at least one"):
        Ensemble([])


@pytest.mark.parametrize("change,message", [
    ({"crafted_on": "other", "defended": {"clip": None, "captioner": None, "vqa": None}},
     "needs a clip model on both sides; the defended side has none"),
    ({"crafted_on": "ensemble", "baseline": {"clip": None, "captioner": "shapes-captioner", "vqa": None},
      "defended": {"clip": None, "captioner": None, "vqa": None}}, "no clip model is selected on either side"),
    ({"crafted_on": "elsewhere"}, "unknown 'crafted on' choice"),
])
def test_bad_transfer_requests(change, message):
    req = request(**{k: v for k, v in change.items() if k != "crafted_on"}, crafted_on=change["crafted_on"])
    with pytest.raises(InputError, match=message):
        req.validate()


def test_api_and_headless_twin_return_the_matrix(service, scene, tmp_path):
    from vlm_inspect.inspect import main as inspect_main
    from vlm_inspect.ui import handlers as H

    args = {"attack": "pgd", "norm": "linf", "eps": 4, "steps": 3, "step_size": 0, "random_start": True, "seed": 0,
            "target": "zero-shot", "classes": "", "template": "", "question": "", "target_text": "",
            "heatmap": "attention", "suite": "embedded", "crafted_on": "other"}
    assert H.api_request(service, args).crafted_on == "other"
    path = tmp_path / "scene.png"
    Image.fromarray(scene).save(path)
    assert inspect_main([str(path), "--baseline", "clip=shapes-clip,captioner=none,vqa=none",
                         "--defended", "clip=shapes-clip+tecoa,captioner=none,vqa=none", "--steps", "3",
                         "--crafted-on", "other", "--out", str(tmp_path / "out")]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["transfer"]["crafted_on"] == "other" and len(rep["transfer"]["cells"]) == 4


def test_evaluate_transfer_from(tmp_path):
    """``evaluate --transfer-from``: the table of sources x targets, a cell recomputed by hand, and the
    diagonal no stronger than the white-box row (which stops each image at its first fooling iterate)."""
    from vlm_inspect.data.sources import open_data
    from vlm_inspect.evaluate.cli import main as evaluate_main
    from vlm_inspect.evaluate.run import _chunk_seed
    from vlm_inspect.images import to_pixels

    out = tmp_path / "t.md"
    assert evaluate_main(["--models", "shapes-clip,shapes-clip+tecoa", "--transfer-from", "shapes-clip",
                          "--data", "shapes:shapes-combo", "--eps", "4/255", "--steps", "5", "--samples", "12",
                          "--batch-size", "12", "--out", str(out)]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    rows = {(r.get("source"), r["model"], r["attack"]): r["value"] for r in doc["rows"]}
    assert "crafted on" in out.read_text() and "→ shapes-clip+tecoa" in out.read_text()
    assert all("source" not in r for r in doc["records"])
    # early stop counts an image fooled at any iterate, so the white-box row is at most the diagonal; one
    # image of slack: a batch that shrinks as images leave rounds differently, which can flip a sign step
    assert rows["shapes-clip", "shapes-clip", "pgd"] >= rows[None, "shapes-clip", "pgd"] - 1 / 12
    src, tgt = load("shapes-clip"), load("shapes-clip+tecoa")
    data = open_data("shapes:shapes-combo", "test", seed=0, length=12, image_size=64)
    px = to_pixels([data[i]["image"] for i in range(12)], 64)
    y = torch.tensor([data[i]["label"] for i in range(12)])
    adv = PGD(eps=4 / 255, steps=5)(px, zero_shot_ce(src, data.prompts, y),
                                    generator=torch.Generator().manual_seed(_chunk_seed(0, 0, 0))).adv
    with torch.no_grad():
        ok = (tgt.zero_shot_logits(px, data.prompts).argmax(-1) == y) & \
             (tgt.zero_shot_logits(adv, data.prompts).argmax(-1) == y)
    assert rows["shapes-clip", "shapes-clip+tecoa", "pgd"] == pytest.approx(float(ok.float().mean()), abs=1e-4)


@pytest.mark.parametrize("argv,message", [
    (["--transfer-from", "shapes-captioner"], "a source must be of the targets' family"),
    (["--transfer-from", "shapes-clip", "--models", "shapes-clip,shapes-vqa"], "give models of one family"),
    (["--transfer-from", "shapes-clip", "--attack", "autoattack"], "autoattack is an ensemble"),
])
def test_evaluate_transfer_bad_input(tmp_path, capsys, argv, message):
    from vlm_inspect.evaluate.cli import main as evaluate_main

    out = tmp_path / "t.md"
    models = [] if "--models" in argv else ["--models", "shapes-clip"]
    assert evaluate_main([*models, "--data", "shapes:shapes-combo", "--samples", "2", "--eps", "1/255", *argv,
                          "--out", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_evaluate_transfer_of_captions(tmp_path):
    """Captions: the defended captioner shown images crafted on the undefended one, with BLEU-4, CIDEr
    and ROUGE-L rows, the caption of the lowest CIDEr over two restarts."""
    from vlm_inspect.evaluate.cli import main as evaluate_main

    out = tmp_path / "c.md"
    assert evaluate_main(["--models", "shapes-captioner+fgsm-decoder", "--transfer-from", "shapes-captioner",
                          "--data", "shapes:shapes-scenes", "--eps", "4/255", "--steps", "2", "--restarts", "2",
                          "--samples", "4", "--out", str(out)]) == 0
    rows = [r for r in json.loads(out.with_suffix(".json").read_text())["rows"] if "source" in r]
    assert {r["metric"] for r in rows} == {"bleu4", "cider", "rouge_l"}
    assert all(r["source"] == "shapes-captioner" and 0 <= r["value"] for r in rows)
    assert "cider, pgd 4/255:" in out.read_text()
