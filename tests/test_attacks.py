"""Attacks and objectives: the contract of docs/ARCHITECTURE.md ("Attacks", "Objectives"), for every
registered attack, on every family of embedded model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import embedded
from vlm_inspect.attacks import ATTACKS, BIM, FGSM, NORMS, PGD, is_bounded
from vlm_inspect.objectives import OBJECTIVES, answer_nll, caption_nll, embedding_cosine, zero_shot_ce

PROMPTS = ["a photo of a red star", "a photo of a blue circle", "a photo of a green square"]
EPS = {"linf": 8 / 255, "l2": 1.0}


def make_objective(family: str, pixels: torch.Tensor, target: bool = False):
    b = pixels.shape[0]
    if family == "clip":
        return zero_shot_ce(embedded("shapes-clip"), PROMPTS, [2] * b if target else list(range(b)))
    if family == "captioner":
        caption = "two large white crosses" if target else "a small red star on the left"
        return caption_nll(embedded("shapes-captioner"), [caption] * b)
    return answer_nll(embedded("shapes-vqa"), ["what color is the star?"] * b, ["black" if target else "red"] * b)


def build(attack: str, norm: str):
    """Any registered attack from one set of settings (each takes the ones it has)."""
    eps = EPS[norm]
    # a gradient attack rises in 4 steps; a random search (no gradient: Square) gets 8 queries per step
    steps = 32 if ATTACKS.meta(attack).get("gradient_free") else 4
    bounded = is_bounded(attack)  # an attack without an epsilon takes its own step size (pixel values)
    return ATTACKS.build(attack, eps=eps, alpha=eps / 2 if bounded else 0.25, steps=steps, norm=norm, word="star",
                         patch_side=0.25)


def threat_models():
    """Every attack with every norm it supports; an attack without an epsilon has no norm: once."""
    return [(a, n) for a in ATTACKS.list() for n in (ATTACKS.meta(a).get("norms", NORMS) if is_bounded(a) else NORMS[:1])]


@pytest.mark.parametrize("family", ["clip", "captioner", "vqa"])
@pytest.mark.parametrize("attack,norm", threat_models())
def test_attack_contract(attack, norm, family):
    pixels = torch.rand(2, 3, 64, 64)
    objective = make_objective(family, pixels)
    model = objective.model
    model.zero_grad(set_to_none=True)  # the session-shared model may carry grads from other tests
    atk = build(attack, norm)
    res = atk(pixels, objective, generator=torch.Generator().manual_seed(1))
    eps = EPS[norm]
    assert res.adv.shape == pixels.shape and res.delta.shape == pixels.shape
    if is_bounded(attack):
        assert (res.size(norm) <= eps + 1e-6).all()
    else:  # the region is the budget: nothing changes outside it, and it is a part of the image only
        region = res.info["region"]
        assert region.shape == (2, 1, 64, 64) and region.any() and not region.all()
        assert (res.delta.abs() * ~region).max() == 0
    assert res.adv.min() >= 0 and res.adv.max() <= 1
    assert torch.allclose(res.adv, pixels + res.delta, atol=1e-7)
    assert len(res.losses) == atk.steps
    assert not res.adv.requires_grad
    with torch.no_grad():
        clean, adv = objective(pixels), objective(res.adv)
    if ATTACKS.meta(attack).get("rises", True):  # a written word is the attack, whatever the loss does
        assert (adv > clean).all(), (clean, adv)  # untargeted: every image's loss rises
    assert all(p.grad is None for p in model.parameters()), "attack left gradients on weights"
    assert all(p.requires_grad for p in model.parameters())
    assert not model.training


@pytest.mark.parametrize("family", ["clip", "captioner", "vqa"])
def test_targeted_attack_descends(family):
    pixels = torch.rand(2, 3, 64, 64)
    objective = make_objective(family, pixels, target=True)
    res = PGD(eps=8 / 255, alpha=2 / 255, steps=5)(pixels, objective, targeted=True,
                                                   generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (objective(res.adv) < objective(pixels)).all()


@pytest.mark.parametrize("family", ["clip", "captioner", "vqa"])
def test_embedding_attack_every_family(family):
    model = {"clip": "shapes-clip", "captioner": "shapes-captioner", "vqa": "shapes-vqa"}[family]
    pixels = torch.rand(2, 3, 64, 64)
    objective = embedding_cosine(embedded(model), pixels)
    with torch.no_grad():
        assert torch.allclose(objective(pixels), torch.zeros(2), atol=1e-5)
    # the gradient vanishes at the clean image (cosine is maximal there): a random start is needed
    res = PGD(eps=4 / 255, alpha=1 / 255, steps=4)(pixels, objective, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (objective(res.adv) > 1e-3).all()
    assert res.losses[-1] > res.losses[0]


def test_same_generator_same_result():
    pixels = torch.rand(2, 3, 64, 64)
    objective = make_objective("clip", pixels)
    atk = PGD(eps=4 / 255, alpha=1 / 255, steps=3)
    a = atk(pixels, objective, generator=torch.Generator().manual_seed(7))
    b = atk(pixels, objective, generator=torch.Generator().manual_seed(7))
    c = atk(pixels, objective, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.adv, b.adv) and a.losses == b.losses
    assert not torch.equal(a.adv, c.adv)
    l2 = PGD(eps=1.0, steps=2, norm="l2")
    assert torch.equal(l2(pixels, objective, generator=torch.Generator().manual_seed(3)).adv,
                       l2(pixels, objective, generator=torch.Generator().manual_seed(3)).adv)


def test_bim_and_fgsm_are_deterministic_without_generator():
    pixels = torch.rand(1, 3, 64, 64)
    objective = make_objective("clip", pixels)
    for atk in (FGSM(eps=2 / 255), BIM(eps=2 / 255, steps=2)):
        assert torch.equal(atk(pixels, objective).adv, atk(pixels, objective).adv)


def test_model_flags_restored_exactly(shapes_clip):
    model = shapes_clip
    model.train()
    model.model.visual.transformer.resblocks[0].eval()
    frozen = list(model.model.transformer.parameters())
    for p in frozen:
        p.requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        pixels = torch.rand(1, 3, 64, 64)
        PGD(eps=2 / 255, steps=2)(pixels, zero_shot_ce(model, PROMPTS, [0]))
        assert {n: m.training for n, m in model.named_modules()} == modes
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()
        model.requires_grad_(True)


def test_attack_runs_model_in_eval_mode(shapes_clip):
    seen = []
    handle = shapes_clip.model.visual.transformer.resblocks[0].register_forward_pre_hook(lambda m, i: seen.append(m.training))
    shapes_clip.train()
    try:
        FGSM(eps=1 / 255)(torch.rand(1, 3, 64, 64), zero_shot_ce(shapes_clip, PROMPTS, [0]))
    finally:
        handle.remove()
        shapes_clip.eval()
    assert seen and not any(seen)


class Linear:
    """loss_b = <w, x_b>: the gradient is w everywhere, so FGSM has a closed form."""

    def __init__(self, w):
        self.w = w

    def __call__(self, pixels):
        return (pixels * self.w).flatten(1).sum(1)


def test_fgsm_closed_form_on_linear_model():
    torch.manual_seed(0)
    w = torch.randn(1, 3, 8, 8)
    pixels = torch.rand(4, 3, 8, 8) * 0.8 + 0.1
    eps = 0.05
    res = FGSM(eps=eps)(pixels, Linear(w))
    assert torch.allclose(res.adv, (pixels + eps * w.sign()).clamp(0, 1), atol=1e-7)
    res = FGSM(eps=eps)(pixels, Linear(w), targeted=True)
    assert torch.allclose(res.adv, (pixels - eps * w.sign()).clamp(0, 1), atol=1e-7)
    # L2: one step of length eps along w / ||w||
    res = FGSM(eps=eps, norm="l2")(pixels, Linear(w))
    assert torch.allclose(res.adv, (pixels + eps * w / w.norm()).clamp(0, 1), atol=1e-6)
    # clipping at the image border: pixels at 1 cannot go up
    ones = torch.ones(1, 3, 8, 8)
    res = FGSM(eps=eps)(ones, Linear(w))
    assert torch.allclose(res.adv, (ones - eps * (w < 0)).clamp(0, 1), atol=1e-7)


def test_bim_closed_form_on_linear_model():
    w = torch.randn(1, 3, 8, 8)
    pixels = torch.full((1, 3, 8, 8), 0.5)
    res = BIM(eps=0.03, alpha=0.01, steps=5)(pixels, Linear(w))
    # three steps of 0.01 reach the border of the 0.03 ball, then projection holds it there
    assert torch.allclose(res.adv, pixels + 0.03 * w.sign(), atol=1e-6)
    assert res.losses == sorted(res.losses)


def test_default_step_size_and_config():
    atk = PGD(eps=8 / 255, steps=10)
    assert atk.alpha == pytest.approx(2.5 * (8 / 255) / 10)
    assert atk.config() == {"name": "pgd", "eps": 8 / 255, "alpha": atk.alpha, "steps": 10,
                            "random_start": True, "norm": "linf"}
    assert FGSM(eps=0.1).steps == 1 and not BIM(eps=0.1).random_start
    assert {"fgsm", "bim", "pgd"} <= set(ATTACKS.list()) and ATTACKS.get("PGD") is PGD  # and any added attack


def test_zero_eps_returns_clean_image():
    pixels = torch.rand(1, 3, 64, 64)
    res = PGD(eps=0.0, steps=2)(pixels, make_objective("clip", pixels))
    assert torch.equal(res.adv, pixels)


@pytest.mark.parametrize("kwargs,match", [
    ({"eps": -1 / 255}, "eps"), ({"eps": float("nan")}, "eps"), ({"eps": float("inf")}, "eps"),
    ({"eps": "big"}, "eps"), ({"eps": 0.1, "steps": 0}, "steps"), ({"eps": 0.1, "steps": 2.5}, "steps"),
    ({"eps": 0.1, "norm": "l1"}, "norm"), ({"eps": 0.1, "alpha": -0.01}, "alpha"),
])
def test_bad_attack_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PGD(**kwargs)


def test_bad_inputs_to_attack():
    atk = FGSM(eps=0.1)
    with pytest.raises(ValueError, match="pixels"):
        atk(torch.rand(1, 3, 8, 8) * 5, Linear(torch.ones(1, 3, 8, 8)))
    with pytest.raises(ValueError, match="one loss per image"):
        atk(torch.rand(2, 3, 8, 8), lambda x: x.sum())


def test_progress_callback():
    calls = []
    BIM(eps=0.1, steps=3)(torch.rand(1, 3, 8, 8), Linear(torch.ones(1, 3, 8, 8)),
                          callback=lambda i, n, loss: calls.append((i, n)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_zero_shot_objective_is_cross_entropy(shapes_clip):
    pixels = torch.rand(3, 3, 64, 64)
    obj = zero_shot_ce(shapes_clip, PROMPTS, [0, 1, 2])
    with torch.no_grad():
        expected = F.cross_entropy(shapes_clip.zero_shot_logits(pixels, PROMPTS), torch.tensor([0, 1, 2]),
                                   reduction="none")
        assert torch.allclose(obj(pixels), expected, atol=1e-5)
    with pytest.raises(ValueError, match="labels"):
        obj(pixels[:2])


def test_objective_errors(shapes_clip, shapes_captioner):
    with pytest.raises(ValueError, match="clip model"):
        zero_shot_ce(shapes_captioner, PROMPTS, [0])
    with pytest.raises(ValueError, match="captioner model"):
        caption_nll(shapes_clip, "a red star")
    with pytest.raises(ValueError, match="class indices"):
        zero_shot_ce(shapes_clip, PROMPTS, [5])
    with pytest.raises(ValueError, match="two class texts"):
        zero_shot_ce(shapes_clip, ["a photo of a red star"], [0])
    assert {"zero-shot", "caption", "vqa", "embedding", "zero-shot-dlr", "zero-shot-dlr-targeted"} <= set(OBJECTIVES.list())


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_per_image_eps_equals_separate_runs(norm):
    """One batched run with an eps per image (a robustness curve) gives what separate runs give."""
    pixels = torch.rand(1, 3, 64, 64).repeat(3, 1, 1, 1)
    objective = make_objective("clip", pixels[:1], target=False)
    budgets = [0.0, EPS[norm] / 4, EPS[norm]]
    batched = BIM(eps=budgets, steps=3, norm=norm)(pixels, zero_shot_ce(objective.model, PROMPTS, [0, 0, 0]))
    assert batched.size(norm)[0] == 0
    for i, eps in enumerate(budgets):
        single = BIM(eps=eps, steps=3, norm=norm)(pixels[i:i + 1], zero_shot_ce(objective.model, PROMPTS, [0]))
        assert torch.allclose(batched.delta[i], single.delta[0], atol=1e-5)
        assert batched.size(norm)[i] <= eps + 1e-6
    assert BIM(eps=budgets, steps=3).config()["eps"] == budgets
    with pytest.raises(ValueError, match="per-image eps values for a batch of 2"):
        BIM(eps=budgets, steps=3)(pixels[:2], zero_shot_ce(objective.model, PROMPTS, [0, 0]))
    with pytest.raises(ValueError, match="finite number >= 0"):
        PGD(eps=[0.1, -1.0])


def test_early_stop_keeps_the_first_fooling_iterate_and_attacks_the_rest_unchanged():
    """Early stop (robust-accuracy evaluation): an image the model gets wrong at some iterate keeps that
    iterate; the images still standing follow the very trajectory of the plain attack."""
    from vlm_inspect.data.shapes import ShapesDataset
    from vlm_inspect.images import to_pixels
    from vlm_inspect.models import load

    clip = load("shapes-clip")  # the shipped model: some images fall early, some late, some never
    data = ShapesDataset("shapes-combo", split="test", length=24)
    pixels = to_pixels([data[i]["image"] for i in range(24)], clip.image_size)
    labels = torch.tensor([data[i]["label"] for i in range(24)])
    budgets = [1 / 255] * 12 + [3 / 255] * 12
    atk = BIM(eps=budgets, alpha=0.5 / 255, steps=8)
    plain = atk(pixels, zero_shot_ce(clip, data.prompts, labels))
    early = atk(pixels, zero_shot_ce(clip, data.prompts, labels), early_stop=True)
    with torch.no_grad():
        wrong_plain = clip.zero_shot_logits(plain.adv, data.prompts).argmax(-1) != labels
        wrong_early = clip.zero_shot_logits(early.adv, data.prompts).argmax(-1) != labels
    stopped = early.stopped
    assert 0 < int(stopped.sum()) < 24, "the test needs images that fall and images that stand"
    assert torch.equal(wrong_early[stopped], torch.ones(int(stopped.sum()), dtype=torch.bool))
    assert torch.allclose(early.delta[~stopped], plain.delta[~stopped], atol=1e-6)
    assert bool((wrong_plain <= (wrong_early | stopped)).all())  # never weaker than the plain attack
    assert early.size("linf").le(torch.tensor(budgets) + 1e-6).all()
    assert len(early.losses) <= len(plain.losses) and plain.stopped is None


def test_early_stop_needs_a_fitting_objective(shapes_captioner):
    pixels = torch.rand(1, 3, 64, 64)
    with pytest.raises(NotImplementedError, match="cannot tell when an attack has succeeded"):
        PGD(eps=4 / 255, steps=2)(pixels, caption_nll(shapes_captioner, ["a red circle"]), early_stop=True)
    with pytest.raises(ValueError, match="untargeted"):
        PGD(eps=4 / 255, steps=2)(pixels, make_objective("clip", pixels), targeted=True, early_stop=True)
