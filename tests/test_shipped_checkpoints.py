"""The trained embedded baselines in checkpoints/ load offline and still do their job.

A small re-measurement on fresh test samples (the full figures are in docs/RESULTS.md); the bars
here sit a little under the README's, since 96 samples are noisier than 500.
"""
from __future__ import annotations

import pytest
import torch

from vlm_inspect.data.sources import open_data
from vlm_inspect.evaluate.quick import answer_accuracy, caption_bleu, zero_shot_accuracy
from vlm_inspect.models import checkpoints_dir, load

N = 96


def shipped(name: str):
    if not (checkpoints_dir() / name / "model.safetensors").is_file():
        pytest.fail(f"checkpoints/{name} is missing: the embedded suite must ship trained weights")
    model = load(name)
    assert model.weights.endswith(name) and model.checkpoint["steps"] > 0
    return model


@pytest.mark.parametrize("dataset,bar", [("shapes-color", 0.9), ("shapes-shape", 0.85), ("shapes-combo", 0.8)])
def test_shapes_clip_zero_shot(dataset, bar):
    model = shipped("shapes-clip")
    data = open_data(f"shapes:{dataset}", "test", seed=123, length=N)
    assert zero_shot_accuracy(model, data, N) >= bar


def test_shapes_captioner_bleu():
    model = shipped("shapes-captioner")
    data = open_data("shapes:shapes-scenes", "test", seed=123, length=N)
    assert caption_bleu(model, data, N)["bleu4"] >= 0.5


def test_shapes_vqa_exact_match():
    """Bar 0.85 in the issue (0.940 in docs/RESULTS.md, 500 test questions); an ungrounded model that answers
    from the question alone plateaus at ~0.38."""
    model = shipped("shapes-vqa")
    data = open_data("shapes:shapes-scenes", "test", seed=123, length=N)
    assert answer_accuracy(model, data, N) >= 0.8


def test_attacks_hurt_the_trained_clip():
    """On a trained model a small PGD moves the prediction: the suite is worth inspecting."""
    from vlm_inspect import PGD, zero_shot_ce

    model = shipped("shapes-clip")
    data = open_data("shapes:shapes-color", "test", seed=5, length=32)
    x = torch.cat([model.preprocess(data[i]["image"]) for i in range(32)])
    y = torch.tensor([data[i]["label"] for i in range(32)])
    adv = PGD(eps=8 / 255, alpha=2 / 255, steps=10)(x, zero_shot_ce(model, data.prompts, y),
                                                     generator=torch.Generator().manual_seed(0)).adv
    with torch.no_grad():
        clean = (model.zero_shot_logits(x, data.prompts).argmax(-1) == y).float().mean()
        robust = (model.zero_shot_logits(adv, data.prompts).argmax(-1) == y).float().mean()
    assert robust < clean - 0.3


DEFENDED = ["shapes-clip+tecoa", "shapes-clip+tga-zsr", "shapes-clip+fare", "shapes-clip+apd", "shapes-clip+capt"]


@pytest.fixture(scope="module")
def combo_batch():
    data = open_data("shapes:shapes-combo", "test", seed=321, length=96)
    model = shipped("shapes-clip")
    x = torch.cat([model.preprocess(data[i]["image"]) for i in range(96)])
    y = torch.tensor([data[i]["label"] for i in range(96)])
    return data.prompts, x, y


def robust_accuracy(model, prompts, x, y, eps: float) -> float:
    """PGD-20, step eps/4, early stop: worst case per sample over the iterates."""
    from vlm_inspect import PGD, zero_shot_ce

    res = PGD(eps=eps, alpha=eps / 4, steps=20)(x, zero_shot_ce(model, prompts, y), early_stop=True,
                                                generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        right = (model.zero_shot_logits(res.adv, prompts).argmax(-1) == y) & ~res.stopped
    return float(right.float().mean())


@pytest.mark.parametrize("name", DEFENDED)
def test_each_shipped_defense_is_more_robust_than_the_undefended_clip(name, combo_batch):
    """Under the attack each defense trained against (its own training eps, read from its checkpoint),
    on 96 fresh test images. The margins are in docs/REPRODUCTION.md."""
    prompts, x, y = combo_batch
    defended = shipped(name)
    assert defended.checkpoint["defense"] == name.split("+")[1] and defended.checkpoint["base"] == "shapes-clip"
    eps = defended.checkpoint["hyperparameters"]["defense"]["attack_eps"]
    with torch.no_grad():
        clean = float((defended.zero_shot_logits(x, prompts).argmax(-1) == y).float().mean())
    assert clean >= 0.8
    assert robust_accuracy(defended, prompts, x, y, eps) > robust_accuracy(shipped("shapes-clip"), prompts, x, y, eps)


@pytest.mark.parametrize("name,attack", [("shapes-captioner+fgsm-decoder", "fgsm"), ("shapes-captioner+prsl", "bim"),
                                         ("shapes-vqa+prsl", "bim")])
def test_each_shipped_captioning_and_vqa_defense_beats_the_undefended_model(name, attack):
    """Under the attack each defense is about (fgsm-decoder: FGSM at its training eps, 0.1 in normalised
    units = 12.75/255; PRSL: BIM-10 at 4/255), on 96 fresh test scenes, the defended model keeps more of
    its caption (BLEU-4) or answers (exact match) than the undefended one. docs/REPRODUCTION.md has the
    full tables."""
    from vlm_inspect.attacks.base import pixel_eps
    from vlm_inspect.evaluate.run import AttackSpec, evaluate_data

    defended = shipped(name)
    base_name = name.split("+")[0]
    assert defended.checkpoint["partial"] and defended.checkpoint["base"] == base_name
    undefended = shipped(base_name)
    options = defended.checkpoint["hyperparameters"]["defense"]
    eps = pixel_eps(options["attack_eps"], defended.pixel_std.flatten().tolist()) if attack == "fgsm" else 4 / 255
    data = open_data("shapes:shapes-scenes", "test", seed=123, length=N)
    metric = "bleu4" if defended.family == "captioner" else "exact_match"

    def robust(model) -> float:
        rows = evaluate_data(model, data, "shapes:shapes-scenes", [AttackSpec(attack, eps, steps=10)], N)
        return next(r["value"] for r in rows if r["attack"] == attack and r["metric"] == metric)

    assert robust(defended) > robust(undefended)
