"""Transfer boosters (attacks/boosters.py): momentum (MI) and input diversity (DI) keep the attack
contract, are off at 0, follow their papers' update, and reach the request, the CLIs and the page."""
from __future__ import annotations

import pytest
import torch

from conftest import embedded
from test_attacks import EPS, make_objective
from vlm_inspect.attacks import ATTACKS, BIM, NORMS, PGD
from vlm_inspect.attacks import boosters as B
from vlm_inspect.objectives import zero_shot_ce

SETTINGS = {"momentum": 1.0, "diversity": 1.0}  # DI at p = 1: every step transformed


def taking(setting: str) -> list[str]:
    return [a for a in ATTACKS.list() if setting in ATTACKS.parameters(a)]


def test_the_registry_says_which_attacks_take_them():
    assert taking("momentum") == ["bim", "pgd"]  # FGSM has one step: momentum would change nothing
    assert taking("diversity") == ["fgsm", "bim", "pgd"]


@pytest.mark.parametrize("family", ["clip", "captioner"])
@pytest.mark.parametrize("attack,norm,setting", [(a, n, s) for s in SETTINGS for a in taking(s)
                                                 for n in ATTACKS.meta(a).get("norms", NORMS)])
def test_contract_with_a_booster(attack, norm, setting, family):
    pixels = torch.rand(2, 3, 64, 64)
    objective = make_objective(family, pixels)
    model = objective.model
    model.zero_grad(set_to_none=True)
    eps = EPS[norm]
    atk = ATTACKS.build(attack, eps=eps, alpha=eps / 2, steps=4, norm=norm, **{setting: SETTINGS[setting]})
    assert getattr(atk, setting) == SETTINGS[setting] and atk.config()[setting] == SETTINGS[setting]
    res = atk(pixels, objective, generator=torch.Generator().manual_seed(1))
    again = atk(pixels, objective, generator=torch.Generator().manual_seed(1))
    assert torch.equal(res.adv, again.adv), "the same generator must give the same image"
    assert (res.size(norm) <= eps + 1e-6).all()
    assert res.adv.min() >= 0 and res.adv.max() <= 1
    assert torch.allclose(res.adv, pixels + res.delta, atol=1e-7)
    assert len(res.losses) == atk.steps and not res.adv.requires_grad
    if setting == "momentum":  # DI's gradient on noise images points nowhere: its rise is tested on real ones
        with torch.no_grad():
            assert (objective(res.adv) > objective(pixels)).all()
    assert all(p.grad is None for p in model.parameters()), "attack left gradients on weights"
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_off_at_zero_is_the_plain_attack():
    """Zero leaves the attack, its random stream and its record exactly as they were."""
    pixels = torch.rand(2, 3, 64, 64)
    objective = make_objective("clip", pixels)
    plain = PGD(eps=4 / 255, alpha=1 / 255, steps=3)
    off = PGD(eps=4 / 255, alpha=1 / 255, steps=3, momentum=0, diversity=0)
    a = plain(pixels, objective, generator=torch.Generator().manual_seed(5))
    b = off(pixels, objective, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.adv, b.adv) and a.losses == b.losses
    assert plain.config() == off.config() and "momentum" not in off.config() and repr(plain) == repr(off)


def test_momentum_is_mi_fgsm():
    """Two steps of BIM with momentum equal MI-FGSM's update written out by hand."""
    clip = embedded("shapes-clip")
    pixels = torch.rand(2, 3, 64, 64)
    obj = zero_shot_ce(clip, ["a red star", "a blue circle", "a green square"], [0, 1])
    eps, alpha, mu = 8 / 255, 2 / 255, 0.7

    def grad(x):
        x = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(obj(x).sum(), x)
        return g

    def l1(g):
        return g.abs().flatten(1).sum(1).view(-1, 1, 1, 1)

    x, g = pixels.clone(), torch.zeros_like(pixels)
    for _ in range(2):
        step = grad(x)
        g = mu * g + step / l1(step)
        x = (pixels + (x + alpha * g.sign() - pixels).clamp(-eps, eps)).clamp(0, 1)
    res = BIM(eps=eps, alpha=alpha, steps=2, momentum=mu)(pixels, obj)
    assert torch.allclose(res.adv, x, atol=1e-6)
    # and it is not the plain attack: the second step's direction differs somewhere
    assert not torch.equal(res.adv, BIM(eps=eps, alpha=alpha, steps=2)(pixels, obj).adv)


def test_diversity_transform():
    x = torch.rand(3, 3, 64, 64, requires_grad=True)
    assert B.diverse(x, 0.0, None) is x
    gen = torch.Generator().manual_seed(0)
    y = B.diverse(x, 1.0, gen)
    assert y.shape == x.shape and not torch.equal(y, x)
    # the shrunk image sits inside a zero border of at most 10 % of the side
    rows = (y.detach().abs().sum(dim=(0, 1, 3)) > 0).nonzero().flatten()
    side = int(rows.max() - rows.min() + 1)
    assert int(0.9 * 64) <= side < 64
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # differentiable in the image
    assert torch.equal(B.diverse(x, 1.0, torch.Generator().manual_seed(0)), y)


def test_diversity_with_early_stop_asks_about_the_real_image():
    """An image counted as fooled under DI is fooled as it is, not only through the transform."""
    from vlm_inspect.data.shapes import ShapesDataset
    from vlm_inspect.images import to_pixels
    from vlm_inspect.models import load

    clip = load("shapes-clip")
    data = ShapesDataset("shapes-combo", split="test", length=16)
    pixels = to_pixels([data[i]["image"] for i in range(16)], clip.image_size)
    labels = torch.tensor([data[i]["label"] for i in range(16)])
    res = PGD(eps=2 / 255, alpha=0.5 / 255, steps=8, diversity=1.0)(
        pixels, zero_shot_ce(clip, data.prompts, labels), generator=torch.Generator().manual_seed(0), early_stop=True)
    assert 0 < int(res.stopped.sum()) < 16, "the test needs images that fall and images that stand"
    with torch.no_grad():
        wrong = clip.zero_shot_logits(res.adv, data.prompts).argmax(-1) != labels
    assert bool(wrong[res.stopped].all())
    # and it is an attack: without early stop, the loss of the real images rises
    obj = zero_shot_ce(clip, data.prompts, labels)
    di = PGD(eps=2 / 255, alpha=0.5 / 255, steps=8, diversity=0.5)(pixels, obj, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert obj(di.adv).mean() > obj(pixels).mean() + 0.5


@pytest.mark.parametrize("kwargs,match", [
    ({"momentum": -1}, "momentum must be a finite number >= 0"),
    ({"momentum": "fast"}, "momentum must be a number"),
    ({"diversity": 1.5}, "diversity is a probability from 0 to 1"),
    ({"diversity": float("nan")}, "diversity is a probability from 0 to 1"),
])
def test_bad_booster_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PGD(eps=4 / 255, **kwargs)


def test_request_cli_and_page_carry_them(tmp_path):
    from vlm_inspect.evaluate.cli import main as evaluate_main
    from vlm_inspect.service import InputError, InspectRequest, make_attack

    base = {"baseline": {"clip": "shapes-clip"}, "classes": "red star, blue circle"}
    req = InspectRequest(attack="pgd", momentum=1.0, diversity=0.5, **base).validate()
    atk = make_attack(req, 3 * 64 * 64)
    assert (atk.momentum, atk.diversity) == (1.0, 0.5)
    assert req.attack_config()["momentum"] == 1.0 and req.attack_config()["diversity"] == 0.5
    apgd = make_attack(InspectRequest(attack="apgd", momentum=1.0, **base).validate(), 10)
    assert apgd.momentum == 0 and "momentum" not in apgd.config()  # APGD keeps its own momentum, not MI's
    for field, value in (("momentum", 3), ("diversity", -0.1)):
        with pytest.raises(InputError, match="from 0 to"):
            InspectRequest(**{field: value}, **base).validate()
    out = tmp_path / "t.md"
    assert evaluate_main(["--models", "shapes-clip", "--data", "shapes:shapes-combo", "--samples", "2",
                          "--diversity", "2", "--out", str(out)]) == 2
    assert not out.exists()


def test_page_and_api_offer_them_with_the_attacks_that_take_them():
    from vlm_inspect.service import InspectService
    from vlm_inspect.ui import handlers as H
    from vlm_inspect.ui.layout import build_demo

    service = InspectService()
    args = {"attack": "bim", "norm": "linf", "eps": 4, "steps": 3, "step_size": 0, "random_start": True, "seed": 0,
            "target": "zero-shot", "classes": "", "template": "", "question": "", "target_text": "",
            "heatmap": "attention", "suite": "embedded", "momentum": 1.0, "diversity": 0.5}
    req = H.api_request(service, args)
    assert (req.momentum, req.diversity) == (1.0, 0.5)
    assert H.api_request(service, {k: v for k, v in args.items() if k not in SETTINGS}).momentum == 0
    demo = build_demo(service)
    labels = {getattr(b, "elem_id", None): getattr(b, "label", "") for b in demo.blocks.values()}
    assert "BIM, PGD" in labels["momentum"] and "FGSM, BIM, PGD" in labels["diversity"]
