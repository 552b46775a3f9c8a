"""Square Attack — Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV 2020, https://arxiv.org/abs/1912.00193.

A score-based random search that never looks at a gradient, so a defense that only hides its
gradients (masking) does not stop it: AutoAttack runs it last for exactly that reason.

Faithful to the paper (L∞):

- the start is vertical stripes: every column of every channel moves by ``+ε`` or ``−ε``;
- each query changes one square window of side ``s`` to a new corner of the ε-box (one sign per
  channel, the window's value moves by ``±2ε`` from the current best and is projected back), and keeps
  the change only if the score improved (or the model is now wrong);
- the window's area is the fraction ``p`` of the image, ``p`` starting at ``p_init = 0.8`` and halved at
  the paper's query counts (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of 10 000, rescaled to the
  budget);
- with ``early_stop`` (how ``evaluate`` runs it), an image stops once the model is wrong (objectives
  that tell, e.g. zero-shot CE) and keeps that query.

Our choices:

- the score is the objective itself (climbed; a targeted attack descends it), so Square runs on any
  objective; the authors score classifiers with the margin (or CE) of the logits;
- the window's place and signs are drawn per image (the paper's algorithm; the authors' code draws
  one window for the whole batch per query);
- the stripes are kept only where they score above the clean image (else the search starts at the
  clean image), so the result never scores below it;
- without ``early_stop`` every image uses its whole budget;
- ``steps`` is the query budget per image (the start counts as one); L2 is not implemented yet (the
  paper's L2 version places Gaussian-shaped squares): asking for it is one clear error.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .base import ATTACKS, Attack, AttackResult, Objective, StepCallback, check_pixels, model_guard

P_INIT = 0.8
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # of 10 000 queries


def window_fraction(query: int, budget: int, p_init: float = P_INIT) -> float:
    """The fraction ``p`` of the image a square covers at ``query`` (0-based) of ``budget``."""
    q = int(query / budget * 10000)
    return p_init / 2 ** sum(q > h for h in _HALVINGS)


@ATTACKS.register("square", label="Square", paper="Andriushchenko et al. 2020", norms=("linf",))
class Square(Attack):
    """Square Attack (see the module docstring).

    Args:
        eps: budget in pixel units (or one per image); steps: the query budget per image (>= 1);
        norm: ``"linf"`` (L2 is not implemented yet).
    """

    name = "square"

    def __init__(self, eps: float | Sequence[float], steps: int = 1000, norm: str = "linf") -> None:
        super().__init__(eps=eps, alpha=None, steps=steps, random_start=True, norm=norm)
        if self.norm != "linf":
            raise ValueError("the Square attack is implemented for linf only; choose linf or another attack")
        self.alpha = self.eps  # no step size: report the budget

    def __call__(self, pixels: torch.Tensor, objective: Objective, targeted: bool = False,
                 generator: torch.Generator | None = None, callback: StepCallback | None = None,
                 early_stop: bool = False) -> AttackResult:
        check_pixels(pixels)
        x = pixels.detach()
        if early_stop and targeted:
            raise ValueError("early_stop applies to untargeted attacks")
        sign = -1.0 if targeted else 1.0
        n, c, h, w = x.shape
        dev = x.device
        eps = self._per_image(self.eps, x)
        eps = eps if isinstance(eps, torch.Tensor) else torch.full((n, 1, 1, 1), eps, dtype=x.dtype, device=dev)

        def draw_signs(*shape) -> torch.Tensor:
            return torch.randint(0, 2, shape, generator=generator, device=dev).to(x.dtype) * 2 - 1

        def score(obj, xs) -> tuple[torch.Tensor, torch.Tensor | None]:
            with torch.no_grad():
                value = sign * obj(xs).float()
            return value, obj.fooled().to(dev) if early_stop else None

        with model_guard(getattr(objective, "model", None)):
            clean_score, _ = score(objective, x)
            stripes = (x + eps * draw_signs(n, c, 1, w)).clamp(0.0, 1.0)
            best_score, wrong = score(objective, stripes)
            take = best_score > clean_score
            best = torch.where(take.view(-1, 1, 1, 1), stripes, x)
            best_score = torch.where(take, best_score, clean_score)
            fooled = wrong & take if wrong is not None else torch.zeros(n, dtype=torch.bool, device=dev)
            fooled_at = torch.where(fooled, 0, -1)  # the query that first fooled each image
            losses = [sign * float(best_score.mean())]
            rows = torch.arange(h, device=dev).view(1, 1, h, 1)
            cols = torch.arange(w, device=dev).view(1, 1, 1, w)
            for q in range(1, self.steps):
                active = (~fooled).nonzero().flatten()
                if not len(active):
                    break
                k = len(active)
                s = max(int(round(math.sqrt(window_fraction(q - 1, self.steps) * h * w))), 1)
                s = min(s, h, w)
                top = torch.randint(0, h - s + 1, (k, 1, 1, 1), generator=generator, device=dev)
                left = torch.randint(0, w - s + 1, (k, 1, 1, 1), generator=generator, device=dev)
                window = (rows >= top) & (rows < top + s) & (cols >= left) & (cols < left + s)
                xa, ea, cur = x[active], eps[active], best[active]
                moved = cur + window * (2.0 * ea * draw_signs(k, c, 1, 1))
                new = torch.min(torch.max(moved, xa - ea), xa + ea).clamp(0.0, 1.0)
                obj = objective if k == n else objective.subset(active)
                new_score, new_wrong = score(obj, new)
                keep = new_score > best_score[active]
                if new_wrong is not None:
                    keep |= new_wrong
                    fooled[active[new_wrong]] = True
                    fooled_at[active[new_wrong]] = q
                best[active[keep]] = new[keep]
                best_score[active[keep]] = new_score[keep]
                losses.append(sign * float(best_score.mean()))
                if callback is not None:
                    callback(q, self.steps - 1, losses[-1])
        delta = (best - x).detach()
        return AttackResult(adv=x + delta, delta=delta, losses=losses[:self.steps],
                            stopped=fooled.clone() if early_stop else None,
                            stopped_at=fooled_at if early_stop else None)
