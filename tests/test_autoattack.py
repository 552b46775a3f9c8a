"""The AutoAttack ensemble (vlm_inspect.evaluate.autoattack): the attacks in order on the images still
standing, the worst case per sample, the reference's checks (randomness, zero gradients, masking), the
"PGD overstates" flag in evaluate, and one sentence for each kind of bad input. Small models and small
budgets: the agreement with the reference at the standard budget is benchmarks/autoattack_reference.py."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from vlm_inspect.evaluate import autoattack as AA
from vlm_inspect.evaluate.autoattack import Budget, autoattack

SMALL = Budget(steps=10, targets=3, queries=60)


class TinyClip(nn.Module):
    """A zero-shot model in miniature: a conv image encoder against fixed class embeddings. ``masked`` puts
    a staircase in front (zero gradient almost everywhere); ``noisy`` adds noise to every output."""

    family, name, image_size = "clip", "tiny-clip", 16

    def __init__(self, classes: int = 6, masked: bool = False, noisy: bool = False) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, stride=2), nn.Tanh(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 8))
        self.register_buffer("text", torch.randn(classes, 8))
        self.masked, self.noisy = masked, noisy

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def encode_text(self, texts):
        return self.text[:len(texts)]

    def encode_image(self, x):
        if self.masked:
            x = torch.floor(x * 8) / 8
        out = self.net(x)
        return out + 0.05 * torch.randn_like(out) if self.noisy else out

    def logits(self, image, text):
        return 10 * image @ text.T


def classes(n: int) -> list[str]:
    return [f"class {i}" for i in range(n)]


def images(n: int = 12) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_each_attack_runs_on_the_images_still_standing():
    model, x = TinyClip(), images()
    res = autoattack(model, x, None, classes(6), 8 / 255, budget=SMALL)
    assert res.clean.all()  # labels=None: the clean predictions
    assert [s.attack for s in res.stages] == ["APGD-CE", "APGD-T", "Square"]
    standing = int(res.clean.sum())
    for s in res.stages:
        assert s.ran_on == standing and s.robust == pytest.approx((standing - s.broke) / len(x))
        standing -= s.broke
    assert standing == int(res.robust.sum()) and bool((res.robust <= res.clean).all())
    with torch.no_grad():
        pred = model.logits(model.encode_image(res.adv), model.text).argmax(1)
        clean = model.logits(model.encode_image(x), model.text).argmax(1)
    broken = res.clean & ~res.robust
    assert broken.any(), "the budget is meant to break some images"
    assert bool((pred[broken] != clean[broken]).all()) and torch.equal(res.adv[res.robust], x[res.robust])
    assert ((res.adv - x).abs().flatten(1).max(1).values <= 8 / 255 + 1e-6).all()
    assert [b is not None for b in res.broken_by] == broken.tolist()
    assert all(a is not None and 0 <= a <= 60 for a, b in zip(res.broken_at, res.broken_by) if b)
    assert AA.LEFT_OUT in res.skipped and "APGD-CE" in AA.summary(res, 8 / 255, "linf")


def test_apgd_t_pairs_stop_with_their_image():
    """One (image, target) pair that fools the model stops its siblings; only it counts as a success."""
    model = TinyClip()
    from vlm_inspect.objectives import ZeroShotTargetedDLR

    x = images(2)
    with torch.no_grad():
        y = model.logits(model.encode_image(x), model.text).argmax(1)
    owner = torch.tensor([0, 0, 1, 1])
    labels = y[owner].clone()
    labels[0] = (labels[0] + 1) % 6  # pair 0 "misclassified" from the start: its label is not the prediction
    inner = ZeroShotTargetedDLR(model, classes(6), labels, (labels + 2) % 6, text_features=model.text)
    sib = AA._Siblings(inner, owner, torch.zeros(2, dtype=torch.bool))
    sib(x[owner])
    assert sib.truly.tolist() == [True, False, False, False]
    assert sib.fooled().tolist() == [True, True, False, False]
    part = sib.subset(torch.tensor([1, 3]))
    part(x[owner][[1, 3]])
    assert part.fooled().tolist() == [True, False] and sib.truly.tolist() == [True, False, False, False]


def test_square_finds_what_masked_gradients_hide():
    res = autoattack(TinyClip(masked=True), images(16), None, classes(6), 16 / 255,
                     budget=Budget(steps=5, targets=2, queries=200))
    codes = [f.code for f in res.flags]
    assert "zero-gradients" in codes
    ce, t, sq = res.stages
    assert ce.broke == 0 and t.broke == 0 and sq.broke > 0
    assert "masking" in codes


def test_randomness_is_flagged():
    res = autoattack(TinyClip(noisy=True), images(4), None, classes(6), 1 / 255, budget=Budget(1, 1, 1))
    assert "randomness" in [f.code for f in res.flags]
    res = autoattack(TinyClip(), images(4), None, classes(6), 1 / 255, budget=Budget(1, 1, 1))
    assert "randomness" not in [f.code for f in res.flags]


def test_few_classes_are_said():
    res = autoattack(TinyClip(classes=3), images(4), None, classes(3), 1 / 255, budget=Budget(2, 9, 2))
    assert [s.attack for s in res.stages] == ["APGD-CE", "Square"]
    assert any("APGD-T needs at least 4 classes" in s for s in res.skipped)
    res = autoattack(TinyClip(classes=5), images(4), None, classes(5), 1 / 255, budget=Budget(2, 9, 2))
    assert any("used 4 target classes" in s for s in res.skipped)
    res = autoattack(TinyClip(), images(4), None, classes(6), 0.5, norm="l2", budget=Budget(2, 2, 2))
    assert [s.attack for s in res.stages] == ["APGD-CE", "APGD-T", "Square"]
    assert ((res.adv - images(4)).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()


@pytest.mark.parametrize("call, words", [
    (lambda m: autoattack(m, images(2), None, classes(6), 2.0), "more than the whole pixel range"),
    (lambda m: autoattack(m, images(2), None, classes(6), 1 / 255, budget=Budget(steps=0)), None),
    (lambda m: autoattack(m, images(2), None, classes(6), 1 / 255, norm="l1"), "linf or l2"),
    (lambda m: autoattack(m, images(2), [0], classes(6), 1 / 255), "1 labels for 2 images"),
])
def test_bad_input_is_one_sentence(call, words):
    with pytest.raises(ValueError) as e:
        call(TinyClip())
    assert "\n" not in str(e.value) and (words is None or words in str(e.value))
    with pytest.raises(ValueError, match="whole number >= 1"):
        Budget(queries=-5)


def test_a_captioner_is_refused_in_one_sentence(shapes_captioner):
    with pytest.raises(ValueError, match="--attack apgd --restarts"):
        autoattack(shapes_captioner, images(1), None, classes(6), 1 / 255)


def test_evaluate_runs_the_ensemble_and_flags_a_weaker_attack():
    from vlm_inspect.data.sources import open_data
    from vlm_inspect.evaluate.cli import markdown
    from vlm_inspect.evaluate.run import AttackSpec, evaluate_data, records
    from vlm_inspect.models import load

    shapes_clip = load("shapes-clip")  # the shipped weights: a model that is right on clean images
    data = open_data("shapes:shapes-combo", "test", seed=0, length=12, image_size=shapes_clip.image_size)
    weak = AttackSpec("fgsm", eps=4 / 255, alpha=0.1 / 255)  # a step far below the budget: it overstates
    ensemble = AttackSpec("autoattack", eps=4 / 255, budget=Budget(steps=10, targets=2, queries=20))
    rows = evaluate_data(shapes_clip, data, "shapes:shapes-combo", [weak, ensemble], 12, batch_size=8)
    by = {r["attack"]: r for r in rows}
    assert [s["attack"] for s in by["autoattack"]["stages"]] == ["APGD-CE", "APGD-T", "Square"]
    assert by["worst"]["value"] <= by["autoattack"]["value"] < by["fgsm"]["value"]
    assert "overstated" in [f["code"] for f in by["autoattack"]["flags"]]
    table = markdown(rows, "python -m vlm_inspect.evaluate ...", [weak, ensemble], None)
    assert "after APGD-T" in table and "FGSM overstates robustness" in table
    rec = records(rows, [weak, ensemble], seed=0, norm="linf")
    assert rec[0]["autoattack"]["stages"][0]["attack"] == "APGD-CE"
    assert {a["attack"] for a in rec[0]["attacks"]} == {"fgsm", "autoattack"}
    json.dumps(rec)


@pytest.mark.parametrize("argv, words", [
    (["--models", "shapes-captioner", "--attack", "autoattack"], "zero-shot classification ensemble"),
    (["--models", "shapes-clip", "--attack", "autoattack", "--eps", "300/255"], "whole pixel range"),
    (["--models", "shapes-clip", "--attack", "apgd", "--steps", "0"], ">= 1"),
    (["--models", "shapes-clip", "--attack", "squares"], "unknown attack 'squares'"),
])
def test_evaluate_bad_input_writes_nothing(argv, words, tmp_path, capsys):
    from vlm_inspect.evaluate.cli import main

    out = tmp_path / "t.md"
    assert main(argv + ["--samples", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and not list(tmp_path.iterdir())
