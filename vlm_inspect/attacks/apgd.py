"""Auto-PGD — Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020, https://arxiv.org/abs/2003.01690.

PGD without a step size to tune: the step starts at 2ε and is halved at checkpoints where the attack
stalled, the iterate then restarting from the best point found so far; steps carry momentum.

Faithful to the paper (and to its authors' implementation, checked iterate by iterate in
tests/test_apgd.py against the packaged original, ``pyautoattack``):

- step size η = 2ε (L∞ and L2), per image;
- momentum 0.75 from the second step: ``z = P(x_k + η·dir(∇))``, ``x_{k+1} = P(x_k + 0.75 (z − x_k) +
  0.25 (x_k − x_{k−1}))``, ``P`` the projection onto the ball and the pixel range;
- checkpoints after ``⌊0.22 N⌋`` steps, each next one ``3 %`` of N earlier than the last, never closer
  than ``6 %`` of N; at a checkpoint an image's step is halved when fewer than 75 % of the steps
  since the last one raised its loss, or when its step was not halved last time and its best loss
  did not improve since; a halved image restarts from its best iterate (and that iterate's gradient);
- the best iterate per image is kept: the one with the highest loss, or, for an objective that can
  tell (zero-shot CE, ``fooled()``), the last iterate that fooled the model.

Our choices:

- any objective (zero-shot CE or DLR, caption and answer NLL, the embedding cosine), untargeted or
  targeted (the objective is then descended), and one ε per image (a robustness curve is one run);
- the random start is uniform in the ball (the reference scales a uniform draw so that its largest
  entry is ε); ``start=`` gives the first iterate explicitly, as the reference's ``x_init``;
- ``early_stop``: an image the model gets wrong leaves the batch at once (the reference attacks every
  image for all N steps and only then keeps the fooled ones); the iterates of the others do not change;
- restarts are the caller's (``evaluate --restarts``), as for PGD.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .base import ATTACKS, Attack, AttackResult, Objective, StepCallback, check_pixels, model_guard
from .projection import random_start

MOMENTUM = 0.75
RHO = 0.75  # a checkpoint halves the step of an image when at most this fraction of its steps raised the loss


def checkpoints(steps: int) -> list[int]:
    """The (0-based) steps after which the step sizes are checked: the paper's schedule."""
    first, shrink, least = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    out, at, gap = [], first - 1, first
    while at < steps:
        out.append(at)
        gap = max(gap - shrink, least)
        at += gap
    return out


def _norm(v: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, 1) L2 norm of each image's entries, summed in the same order as the authors' code (so that
    the iterates round the same)."""
    return (v ** 2).flatten(1).sum(-1).sqrt().view(-1, *([1] * (v.ndim - 1)))


def _unit(v: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent direction of ``v`` for the norm (sign, or v / ||v||)."""
    return v.sign() if norm == "linf" else v / (_norm(v) + 1e-12)


def _into_ball(x: torch.Tensor, new: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """``new`` moved into the ε-ball around ``x`` (per image), then into [0, 1]."""
    if norm == "linf":
        return torch.min(torch.max(new, x - eps), x + eps).clamp(0.0, 1.0)
    d = new - x
    size = _norm(d)
    return (x + d / (size + 1e-12) * torch.min(eps, size)).clamp(0.0, 1.0)


def _wrong(objective) -> torch.Tensor | None:
    """Which images the objective's last call got wrong, or None if it cannot tell (captions, answers)."""
    try:
        return objective.fooled()
    except (AttributeError, NotImplementedError):
        return None


@ATTACKS.register("apgd", label="APGD", paper="Croce & Hein 2020")
class APGD(Attack):
    """Auto-PGD (see the module docstring).

    Args:
        eps: budget in pixel units (or one per image); steps: iterations N (>= 1);
        random_start: start uniformly in the ball (default True) or at the clean image;
        norm: ``"linf"`` or ``"l2"``.

    Example:
        >>> res = APGD(eps=4/255, steps=100)(pixels, zero_shot_ce(model, prompts, labels))
    """

    name = "apgd"

    def __init__(self, eps: float | Sequence[float], steps: int = 100, random_start: bool = True,
                 norm: str = "linf") -> None:
        super().__init__(eps=eps, alpha=None, steps=steps, random_start=random_start, norm=norm)
        # the initial step size, 2 eps (halved per image as the attack goes)
        self.alpha = tuple(2 * e for e in self.eps) if isinstance(self.eps, tuple) else 2 * self.eps

    def __call__(self, pixels: torch.Tensor, objective: Objective, targeted: bool = False,
                 generator: torch.Generator | None = None, callback: StepCallback | None = None,
                 early_stop: bool = False, start: torch.Tensor | None = None) -> AttackResult:
        """As :meth:`Attack.__call__`; ``start`` (B, 3, H, W) is the first iterate (no random start)."""
        check_pixels(pixels)
        x = pixels.detach()
        if early_stop and targeted:
            raise ValueError("early_stop applies to untargeted attacks")
        sign = -1.0 if targeted else 1.0  # the attack climbs sign * objective
        n = x.shape[0]
        eps = self._per_image(self.eps, x)
        eps = eps if isinstance(eps, torch.Tensor) else torch.full((n, 1, 1, 1), eps, dtype=x.dtype, device=x.device)
        step = 2.0 * eps
        tells = not targeted  # untargeted: keep the last fooling iterate where the objective can tell
        with model_guard(getattr(objective, "model", None)):
            if start is not None:
                adv = start.detach().to(x).clamp(0.0, 1.0)
            elif self.random_start:
                adv = x + random_start(x, eps, self.norm, generator)
            else:
                adv = x.clone()

            def climb(obj, xs):  # (sign * loss, its gradient, which images are wrong)
                xs = xs.detach().requires_grad_(True)
                with torch.enable_grad():
                    loss = obj(xs)
                    if loss.ndim != 1 or loss.shape[0] != xs.shape[0]:
                        raise ValueError(f"the objective must return one loss per image (shape ({xs.shape[0]},)), "
                                         f"got {tuple(loss.shape)}")
                    (grad,) = torch.autograd.grad(sign * loss.sum(), xs)
                wrong = _wrong(obj) if tells else None
                return sign * loss.detach().float(), grad.detach(), None if wrong is None else wrong.to(x.device)

            loss, grad, wrong = climb(objective, adv)
            if early_stop and wrong is None:
                objective.fooled()  # says, in the objective's words, that it cannot tell
            tells = wrong is not None
            losses = [sign * float(loss.mean())]
            best, best_loss, best_grad = adv.clone(), loss.clone(), grad.clone()
            best_adv = adv.clone()  # the last iterate that fooled the model (objectives that tell)
            fooled = wrong.clone() if wrong is not None else torch.zeros(n, dtype=torch.bool, device=x.device)
            fooled_at = torch.where(fooled, 0, -1)  # the iterate that first fooled each image
            history = torch.zeros(self.steps, n, device=x.device)  # the loss after each step
            halved_last = torch.ones(n, dtype=torch.bool, device=x.device)
            best_at_check = best_loss.clone()
            marks, since = set(checkpoints(self.steps)), 0
            previous = adv.clone()
            active, obj = torch.arange(n, device=x.device), objective
            for i in range(self.steps):
                if early_stop and bool(fooled[active].any()):  # fooled images leave the batch
                    active = active[~fooled[active]]
                    if not len(active):
                        break
                    obj = objective.subset(active)
                a = active
                with torch.no_grad():
                    cur = adv[a]
                    push = cur - previous[a]
                    previous[a] = cur
                    z = _into_ball(x[a], cur + step[a] * _unit(grad[a], self.norm), eps[a], self.norm)
                    w = MOMENTUM if i > 0 else 1.0
                    new = _into_ball(x[a], cur + (z - cur) * w + push * (1 - w), eps[a], self.norm)
                    adv[a] = new
                loss_a, grad_a, wrong_a = climb(obj, new)
                grad[a], history[i, a] = grad_a, loss_a
                if wrong_a is not None:
                    best_adv[a[wrong_a]] = new[wrong_a]
                    first = a[wrong_a & ~fooled[a]]
                    fooled_at[first] = i + 1
                    fooled[a] |= wrong_a
                up = loss_a > best_loss[a]
                best[a[up]], best_grad[a[up]], best_loss[a[up]] = new[up], grad_a[up], loss_a[up]
                losses.append(sign * float(loss_a.mean()))
                since += 1
                if i in marks:
                    # rises among the last `since` steps; before the first step the authors' code compares
                    # with its (still zero) last row, which this reproduces
                    idx = torch.arange(i - since + 1, i + 1, device=x.device)
                    rises = (history[idx] > history[(idx - 1) % self.steps]).float().sum(0)
                    halve = (rises <= since * RHO) | (~halved_last & (best_at_check >= best_loss))
                    halve &= torch.isin(torch.arange(n, device=x.device), active)
                    halved_last, best_at_check = halve.clone(), best_loss.clone()
                    step[halve] /= 2.0
                    adv[halve], grad[halve] = best[halve], best_grad[halve]
                    since = 0
                if callback is not None:
                    callback(i + 1, self.steps, losses[-1])
        final = torch.where(fooled.view(-1, 1, 1, 1), best_adv, best) if tells else best
        delta = (final - x).detach()
        return AttackResult(adv=x + delta, delta=delta, losses=losses[:self.steps],
                            stopped=fooled.clone() if early_stop else None,
                            stopped_at=fooled_at if early_stop else None)
