"""APGD against the packaged original (pyautoattack, the authors' implementation): from the same
starting point, every iterate is the same, for L-inf and L2 (a tolerance of 1e-6 in pixel units:
float rounding of the projections), including the step-size halvings and restarts from the best point."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlm_inspect.attacks import APGD, ATTACKS
from vlm_inspect.attacks.apgd import checkpoints

pyautoattack = pytest.importorskip("pyautoattack", reason="pip install -r requirements-dev.txt")
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted  # noqa: E402


class Recorder(nn.Module):
    """A small conv net that remembers every input it is called on (the attack's iterates)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, stride=2),
                                 nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.net(x)


class CE:
    """Zero-shot-style CE objective on the recorder's logits (``fooled`` / ``subset`` like ours)."""

    def __init__(self, model: Recorder, labels: torch.Tensor) -> None:
        self.model, self.labels = model, labels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        self._fooled = logits.detach().argmax(-1) != self.labels
        return F.cross_entropy(logits, self.labels, reduction="none")

    def fooled(self) -> torch.Tensor:
        return self._fooled

    def subset(self, index: torch.Tensor) -> "CE":
        return CE(self.model, self.labels[index])


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_iterates_equal_the_reference(norm, eps):
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16)
    y = torch.randint(0, 5, (6,))
    start = (x + (torch.rand_like(x) * 2 - 1) * (eps if norm == "linf" else eps / 16 / 2)).clamp(0, 1)
    steps = 20

    ref_model = Recorder().eval()
    ref = APGDAttack(ref_model, n_iter=steps, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, loss="ce",
                     device="cpu", seed=0)
    ref.init_hyperparam(x)
    ref_best, _, ref_loss_best, ref_best_adv = ref.attack_single_run(x, y, x_init=start)

    ours_model = Recorder().eval()
    res = APGD(eps=eps, steps=steps, norm=norm)(x, CE(ours_model, y), start=start)

    assert len(ours_model.seen) == len(ref_model.seen) == steps + 1
    for k, (a, b) in enumerate(zip(ours_model.seen, ref_model.seen)):
        assert (a - b).abs().max() <= 1e-6, f"iterate {k} differs by {(a - b).abs().max():.2e}"
    fooled = (ours_model.net(res.adv).argmax(-1) != y)
    # what we return: the last fooling iterate where fooled (the reference's x_best_adv), else the best loss
    expect = torch.where(fooled.view(-1, 1, 1, 1), ref_best_adv, ref_best)
    assert (res.adv - expect).abs().max() <= 1e-6


def test_the_run_halves_its_step_at_the_papers_checkpoints():
    assert checkpoints(100) == [21, 40, 56, 69, 79, 86, 92, 98]  # after 22 steps, then 3 % of N fewer each time, at least 6 %
    assert checkpoints(20) == [3, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    assert checkpoints(1) == [0]


def test_early_stop_keeps_the_other_iterates():
    """An image that leaves the batch once fooled does not change the iterates of the others."""
    torch.manual_seed(1)
    x = torch.rand(8, 3, 16, 16)
    model = Recorder().eval()
    y = model.net(x).argmax(-1)
    full = APGD(eps=3 / 255, steps=12)(x, CE(model, y), generator=torch.Generator().manual_seed(0))
    early = APGD(eps=3 / 255, steps=12)(x, CE(model, y), generator=torch.Generator().manual_seed(0), early_stop=True)
    still = ~early.stopped
    assert early.stopped.any() and still.any()
    assert (full.adv[still] - early.adv[still]).abs().max() <= 1e-6


def test_apgd_is_registered_with_its_settings():
    atk = ATTACKS.build("apgd", eps=4 / 255, alpha=1 / 255, steps=7, random_start=True, norm="linf")
    assert isinstance(atk, APGD) and atk.steps == 7 and atk.alpha == pytest.approx(8 / 255)  # 2 eps, not given
    with pytest.raises(ValueError, match="steps must be a whole number >= 1"):
        APGD(eps=4 / 255, steps=0)


def test_dlr_losses_equal_the_reference():
    from vlm_inspect.objectives import dlr, targeted_dlr

    torch.manual_seed(0)
    logits = torch.randn(64, 10) * 3
    y = torch.randint(0, 10, (64,))
    logits[:8, 0] = 20.0  # some images whose top-1 is the true class
    y[:8] = 0
    t = (y + 1 + torch.randint(0, 8, (64,))) % 10
    ref = APGDAttack(lambda x: x, eps=1.0, device="cpu")
    assert torch.allclose(dlr(logits, y), ref.dlr_loss(logits, y), atol=1e-6, rtol=0)
    ref_t = APGDAttack_targeted(lambda x: x, eps=1.0, device="cpu")
    ref_t.y_target = t
    assert torch.allclose(targeted_dlr(logits, y, t), ref_t.dlr_loss_targeted(logits, y), atol=1e-6, rtol=0)


def test_dlr_objectives_on_the_embedded_clip(shapes_clip):
    from vlm_inspect.objectives import OBJECTIVES

    prompts = ["a photo of a red star", "a photo of a blue circle", "a photo of a green square",
               "a photo of a white cross"]
    x = torch.rand(3, 3, 64, 64)
    dlr_obj = OBJECTIVES.get("zero-shot-dlr")(shapes_clip, prompts, [0, 1, 2])
    tgt = OBJECTIVES.get("zero-shot-dlr-targeted")(shapes_clip, prompts, [0, 1, 2], [3, 3, 3])
    for obj in (dlr_obj, tgt):
        res = APGD(eps=8 / 255, steps=5)(x, obj, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert (obj(res.adv) >= obj(x)).all()
        assert obj.subset(torch.tensor([2])).labels.tolist() == [2]
    with pytest.raises(ValueError, match="at least 4 classes"):
        OBJECTIVES.get("zero-shot-dlr-targeted")(shapes_clip, prompts[:3], [0], [1])
