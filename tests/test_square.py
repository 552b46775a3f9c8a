"""The Square attack, L-inf and L2: the paper's schedule, the contract (budget, pixel range, no gradients
needed), and the reason it is in the ensemble: it fools a model whose gradients are masked, where PGD
cannot."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlm_inspect.attacks import ATTACKS, PGD, Square
from vlm_inspect.attacks.square import window_fraction


def test_window_schedule_is_the_papers():
    assert window_fraction(0, 10000) == 0.8 and window_fraction(10, 10000) == 0.8
    assert window_fraction(11, 10000) == 0.4 and window_fraction(8001, 10000) == pytest.approx(0.8 / 512)
    assert window_fraction(5, 100) == pytest.approx(0.8 / 8)  # rescaled to the budget: 5 of 100 = 500 of 10 000


class Masked(nn.Module):
    """A classifier behind a staircase on its input: its gradient is zero almost everywhere."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stair = torch.floor(x * 8) / 8
        return self.net(x + (stair - x).detach() * 0 + (stair - x))  # value of the staircase, zero gradient


class CE:
    def __init__(self, model, labels):
        self.model, self.labels = model, labels

    def __call__(self, x):
        logits = self.model(x)
        self._fooled = logits.detach().argmax(-1) != self.labels
        return F.cross_entropy(logits, self.labels, reduction="none")

    def fooled(self):
        return self._fooled

    def subset(self, index):
        return CE(self.model, self.labels[index])


def test_square_breaks_masked_gradients_where_pgd_does_not():
    model = Masked().eval()
    torch.manual_seed(0)
    x = torch.rand(16, 3, 16, 16)
    with torch.no_grad():
        y = model(x).argmax(-1)
    pgd = PGD(eps=16 / 255, steps=20)(x, CE(model, y), generator=torch.Generator().manual_seed(0))
    sq = Square(eps=16 / 255, steps=200)(x, CE(model, y), generator=torch.Generator().manual_seed(0), early_stop=True)
    with torch.no_grad():
        pgd_wrong = (model(pgd.adv).argmax(-1) != y).float().mean()
        sq_wrong = (model(sq.adv).argmax(-1) != y).float().mean()
    assert pgd_wrong == 0  # no gradient: PGD's sign step is zero
    assert sq_wrong >= 0.25 and bool(sq.stopped[model(sq.adv).argmax(-1) != y].all())
    assert (sq.size("linf") <= 16 / 255 + 1e-6).all() and sq.adv.min() >= 0 and sq.adv.max() <= 1


def test_l2_square_breaks_masked_gradients_within_its_ball():
    model = Masked().eval()
    torch.manual_seed(0)
    x = torch.rand(16, 3, 16, 16)
    with torch.no_grad():
        y = model(x).argmax(-1)
    objective = CE(model, y)
    with torch.no_grad():
        clean_loss = objective(x)
    sq = Square(eps=1.0, steps=300, norm="l2")(x, objective, generator=torch.Generator().manual_seed(0), early_stop=True)
    pgd = PGD(eps=1.0, steps=20, norm="l2", random_start=False)(x, CE(model, y))
    with torch.no_grad():
        sq_wrong = model(sq.adv).argmax(-1) != y
        pgd_wrong = model(pgd.adv).argmax(-1) != y
        sq_loss = CE(model, y)(sq.adv)
    assert not pgd_wrong.any() and sq_wrong.float().mean() >= 0.2
    assert torch.equal(sq.stopped, sq_wrong) and ((sq.stopped_at >= 0) == sq.stopped).all()
    assert (sq.size("l2") <= 1.0 + 1e-5).all() and sq.adv.min() >= 0 and sq.adv.max() <= 1
    assert (sq_loss >= clean_loss - 1e-6).all()  # the search never ends below the clean image's score


def test_square_settings_and_bad_input():
    atk = ATTACKS.build("square", eps=4 / 255, alpha=1 / 255, steps=50, random_start=False, norm="linf")
    assert isinstance(atk, Square) and atk.steps == 50
    assert Square(eps=0.5, norm="l2").norm == "l2"
    with pytest.raises(ValueError, match="steps must be a whole number >= 1"):
        Square(eps=4 / 255, steps=-5)
    with pytest.raises(ValueError, match="steps must be a whole number >= 1"):
        Square(eps=4 / 255, steps=0)


def test_a_norm_an_attack_lacks_is_one_sentence_in_the_service():
    from vlm_inspect.attacks import PGD
    from vlm_inspect.service import InputError, InspectRequest

    ATTACKS.register("linf-only", label="L-inf only", norms=("linf",))(type("LinfOnly", (PGD,), {"name": "linf-only"}))
    try:
        with pytest.raises(InputError, match="the linf-only attack supports linf only"):
            InspectRequest(baseline={"clip": "shapes-clip"}, classes=["a", "b"], attack="linf-only", norm="l2").validate()
    finally:
        ATTACKS.unregister("linf-only")
