"""Attack base class: argument checks, model guard (eval mode, frozen weights), the step loop."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from ..models.base import check_pixels
from ..registry import Registry
from . import projection as P

ATTACKS: Registry = Registry("attack")

Objective = Callable[[torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int, float], None]


@dataclass
class AttackResult:
    """``adv`` = pixels + ``delta`` in [0,1]; ``losses[i]`` = mean objective at iterate i (before step i+1)."""

    adv: torch.Tensor
    delta: torch.Tensor
    losses: list[float] = field(default_factory=list)

    def size(self, norm: str = "linf") -> torch.Tensor:
        """(B,) size of each perturbation."""
        return P.size(self.delta, norm)


@contextlib.contextmanager
def model_guard(module: nn.Module | None) -> Iterator[None]:
    """Eval mode and ``requires_grad=False`` on every weight while attacking; both restored after.

    Eval mode matters (BatchNorm statistics must not drift during an attack, DESIGN §5) and frozen
    weights mean no graph is built for them (about a third faster on CPU) and no ``.grad`` is left.
    """
    if module is None or not isinstance(module, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        module.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


class Attack:
    """Gradient attack on any objective ``pixels -> (B,) loss``.

    Untargeted attacks ascend the objective, ``targeted=True`` descends it (e.g. the NLL of a target
    caption). Subclasses only fix the start and the defaults.
    """

    name = ""
    uses_random_start = False

    def __init__(self, eps: float, alpha: float | None = None, steps: int = 10, random_start: bool = False,
                 norm: str = "linf") -> None:
        try:
            eps = float(eps)
        except (TypeError, ValueError):
            raise ValueError(f"eps must be a number (in pixel units, e.g. 4/255), got {eps!r}") from None
        if not eps >= 0 or eps == float("inf"):
            raise ValueError(f"eps must be a finite number >= 0 (in pixel units, e.g. 4/255), got {eps}")
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
        self.norm = P.check_norm(norm)
        self.eps = eps
        self.steps = int(steps)
        # Madry et al.'s rule of thumb: step 2.5 * eps / steps, so the iterates can cross the ball.
        self.alpha = float(alpha) if alpha is not None else 2.5 * eps / self.steps
        if not self.alpha >= 0 or self.alpha == float("inf"):
            raise ValueError(f"alpha (step size) must be a finite number >= 0, got {alpha!r}")
        self.random_start = bool(random_start)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(eps={self.eps:.5g}, alpha={self.alpha:.5g}, steps={self.steps}, "
                f"random_start={self.random_start}, norm={self.norm!r})")

    def config(self) -> dict:
        return {"name": self.name, "eps": self.eps, "alpha": self.alpha, "steps": self.steps,
                "random_start": self.random_start, "norm": self.norm}

    def __call__(self, pixels: torch.Tensor, objective: Objective, targeted: bool = False,
                 generator: torch.Generator | None = None, callback: StepCallback | None = None) -> AttackResult:
        """Attack ``pixels`` (B,3,H,W) in [0,1]. ``callback(step, steps, mean_loss)`` follows progress."""
        check_pixels(pixels)
        pixels = pixels.detach()
        sign = -1.0 if targeted else 1.0
        with model_guard(getattr(objective, "model", None)):
            if self.random_start and self.eps > 0:
                delta = P.random_start(pixels, self.eps, self.norm, generator)
            else:
                delta = torch.zeros_like(pixels)
            losses: list[float] = []
            for step in range(self.steps):
                delta.requires_grad_(True)
                with torch.enable_grad():
                    loss = objective(pixels + delta)
                    if loss.ndim != 1 or loss.shape[0] != pixels.shape[0]:
                        raise ValueError(f"the objective must return one loss per image (shape ({pixels.shape[0]},)), "
                                         f"got {tuple(loss.shape)}")
                    (grad,) = torch.autograd.grad(loss.sum(), delta)
                losses.append(float(loss.detach().mean()))
                with torch.no_grad():
                    delta = delta.detach() + sign * self.alpha * P.ascent_direction(grad, self.norm)
                    delta = P.clip_to_image(pixels, P.project(delta, self.eps, self.norm))
                if callback is not None:
                    callback(step + 1, self.steps, losses[-1])
        delta = delta.detach()
        return AttackResult(adv=pixels + delta, delta=delta, losses=losses)
