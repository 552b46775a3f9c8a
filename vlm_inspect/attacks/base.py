"""Attack base class: argument checks, model guard (eval mode, frozen weights), the step loop."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..models.base import check_pixels, model_guard  # noqa: F401  (part of the attack API)
from ..registry import Registry
from ..runtime import fp16_active
from . import boosters as B
from . import projection as P

ATTACKS: Registry = Registry("attack")

Objective = Callable[[torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int, float], None]
FP16_LOSS_SCALE = 1024.0


@dataclass
class AttackResult:
    """``adv`` = pixels + ``delta`` in [0,1]; ``losses[i]`` = mean objective at iterate i (before step i+1)."""

    adv: torch.Tensor
    delta: torch.Tensor
    losses: list[float] = field(default_factory=list)
    # with early_stop: (B,) bool, the images the model got wrong at some iterate (``adv`` is that iterate)
    stopped: torch.Tensor | None = None
    # with early_stop: (B,) long, the iterate (0: the start) or query at which each image was first
    # fooled, -1 where it never was (the app's verdict says "broken by APGD-T at step 13")
    stopped_at: torch.Tensor | None = None
    # what an attack without a budget chose (typographic, patch): the position per image, the patch, and
    # ``region``, the (B, 1, H, W) bool mask of the pixels it may change
    info: dict = field(default_factory=dict)

    def size(self, norm: str = "linf") -> torch.Tensor:
        """(B,) size of each perturbation."""
        return P.size(self.delta, norm)


class SettingError(ValueError):
    """A setting that only fails on the images it meets (a word too long for a small image, a patch under
    a pixel): the front ends show it as the person's mistake, not as an internal error."""


def parse_fraction(text: str) -> float:
    """A number written as a decimal or a fraction of decimals: '0.03', '4/255', '1.6/255'."""
    parts = str(text).strip().split("/")
    if len(parts) > 2:
        raise ValueError(f"cannot read {text!r} as a number")
    num, den = float(parts[0]), float(parts[1]) if len(parts) == 2 else 1.0
    if den == 0:
        raise ValueError(f"cannot read {text!r}: division by zero")
    return num / den


def parse_eps(text: str) -> float:
    """'4/255' -> 0.01568..., '0.03' -> 0.03."""
    try:
        v = parse_fraction(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"cannot read eps {text!r}; write it as k/255 or a decimal") from None
    if v < 0:
        raise ValueError(f"eps must be >= 0, got {text}")
    return v


def eps_label(eps: float) -> str:
    k = eps * 255
    return f"{k:g}/255" if abs(k - round(k, 2)) < 1e-6 else f"{eps:g}"


def pixel_eps(eps_normalised: float, std: Sequence[float]) -> float:
    """An L-inf budget given in a processor's normalised space, ``(x - mean) / std``, in pixel units.

    The one place this conversion lives. A change of ``e`` in normalised units is ``e * std`` in
    pixels, so with ``mean = std = 0.5`` (ViT-GPT2's processor, inputs in [-1, 1]) the paper's
    ``eps = 0.1`` is ``0.05 = 12.75/255``. With unequal channel stds the normalised ball is a box;
    the budget returned is the largest cube inside it (the smallest std).
    """
    std = [float(s) for s in std]
    if not std or min(std) <= 0:
        raise ValueError(f"std must be positive, got {std}")
    return float(eps_normalised) * min(std)


def normalised_eps(eps_pixels: float, std: Sequence[float]) -> float:
    """The inverse of :func:`pixel_eps`: a pixel-unit budget in the processor's normalised units."""
    return float(eps_pixels) / pixel_eps(1.0, std)


def _as_tuple(value: float | tuple[float, ...]) -> tuple[float, ...]:
    return value if isinstance(value, tuple) else (value,)


def _budget(value, what: str, unit: str) -> float | tuple[float, ...]:
    """A finite, non-negative number, or one per image (a sequence or 1-D tensor): a float or a tuple."""
    many = isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.ndim == 1)
    items = [float(v) for v in value] if many else None
    try:
        items = items if many else [float(value)]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number ({unit}), got {value!r}") from None
    for v in items:
        if not v >= 0 or v == float("inf"):
            raise ValueError(f"{what} must be a finite number >= 0 ({unit}), got {v}")
    if many and not items:
        raise ValueError(f"{what}: an empty list of per-image values")
    return tuple(items) if many else items[0]


class Attack:
    """Gradient attack on any objective ``pixels -> (B,) loss``.

    Untargeted attacks ascend the objective, ``targeted=True`` descends it (e.g. the NLL of a target
    caption). Subclasses only fix the start and the defaults. ``eps`` (and ``alpha``) may be one value
    per image, so a whole robustness curve (one image at several budgets) is a single batched run.
    """

    name = ""
    uses_random_start = False

    def __init__(self, eps: float | Sequence[float], alpha: float | Sequence[float] | None = None, steps: int = 10,
                 random_start: bool = False, norm: str = "linf", momentum: float = 0.0, diversity: float = 0.0) -> None:
        self.eps = _budget(eps, "eps", "in pixel units, e.g. 4/255")
        # transfer boosters (boosters.py), off at 0: MI's decay and DI's probability
        self.momentum = B.check_momentum(momentum)
        self.diversity = B.check_diversity(diversity)
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
        self.norm = P.check_norm(norm)
        self.steps = int(steps)
        # Madry et al.'s rule of thumb: step 2.5 * eps / steps, so the iterates can cross the ball.
        if alpha is None:
            alpha = [2.5 * e / self.steps for e in self.eps] if isinstance(self.eps, tuple) else 2.5 * self.eps / self.steps
        self.alpha = _budget(alpha, "alpha (step size)", "in pixel units")
        if isinstance(self.eps, tuple) and isinstance(self.alpha, tuple) and len(self.alpha) != len(self.eps):
            raise ValueError(f"got {len(self.eps)} eps values but {len(self.alpha)} step sizes")
        self.random_start = bool(random_start)

    def __repr__(self) -> str:
        def fmt(v):
            return f"{v:.5g}" if isinstance(v, float) else "[" + ", ".join(f"{x:.5g}" for x in v) + "]"
        boost = "".join(f", {k}={v:g}" for k, v in self.boosters().items())
        return (f"{type(self).__name__}(eps={fmt(self.eps)}, alpha={fmt(self.alpha)}, steps={self.steps}, "
                f"random_start={self.random_start}, norm={self.norm!r}{boost})")

    def boosters(self) -> dict[str, float]:
        """The boosters that are on (a plain attack's description and record stay as they were)."""
        return {k: v for k, v in (("momentum", self.momentum), ("diversity", self.diversity)) if v}

    def config(self) -> dict:
        listed = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 - JSON-friendly
        return {"name": self.name, "eps": listed(self.eps), "alpha": listed(self.alpha), "steps": self.steps,
                "random_start": self.random_start, "norm": self.norm, **self.boosters()}

    def _per_image(self, value: float | tuple[float, ...], pixels: torch.Tensor) -> float | torch.Tensor:
        if isinstance(value, float):
            return value
        if len(value) != pixels.shape[0]:
            raise ValueError(f"{len(value)} per-image eps values for a batch of {pixels.shape[0]} images")
        return torch.tensor(value, dtype=pixels.dtype, device=pixels.device).view(-1, *([1] * (pixels.ndim - 1)))

    def __call__(self, pixels: torch.Tensor, objective: Objective, targeted: bool = False,
                 generator: torch.Generator | None = None, callback: StepCallback | None = None,
                 early_stop: bool = False) -> AttackResult:
        """Attack ``pixels`` (B,3,H,W) in [0,1]. ``callback(step, steps, mean_loss)`` follows progress.

        ``early_stop`` (untargeted, for objectives with ``fooled``/``subset``, e.g. zero-shot CE): an image
        the model gets wrong at some iterate keeps that iterate and leaves the batch, so the remaining
        steps only attack the images still standing (the worst case per sample over all iterates, as
        robust-accuracy evaluations count it, for less compute)."""
        check_pixels(pixels)
        pixels = pixels.detach()
        if early_stop and targeted:
            raise ValueError("early_stop applies to untargeted attacks")
        sign = -1.0 if targeted else 1.0
        eps, alpha = self._per_image(self.eps, pixels), self._per_image(self.alpha, pixels)
        stopped = torch.zeros(pixels.shape[0], dtype=torch.bool, device=pixels.device) if early_stop else None
        stopped_at = torch.full((pixels.shape[0],), -1, dtype=torch.long, device=pixels.device) if early_stop else None
        active = torch.arange(pixels.shape[0], device=pixels.device)
        with model_guard(getattr(objective, "model", None)):
            if self.random_start and max(_as_tuple(self.eps)) > 0:
                delta = P.random_start(pixels, eps, self.norm, generator)
            else:
                delta = torch.zeros_like(pixels)
            losses: list[float] = []
            obj, x, d_eps, d_alpha = objective, pixels, eps, alpha
            buffer = torch.zeros_like(pixels) if self.momentum else None  # MI's accumulated gradient
            for step in range(self.steps):
                d = delta[active].requires_grad_(True) if early_stop else delta.requires_grad_(True)
                with torch.enable_grad():
                    loss = obj(B.diverse(x + d, self.diversity, generator))
                    if loss.ndim != 1 or loss.shape[0] != x.shape[0]:
                        raise ValueError(f"the objective must return one loss per image (shape ({x.shape[0]},)), "
                                         f"got {tuple(loss.shape)}")
                    # under fp16 autocast (GPU) small gradients underflow: scale the loss; the ascent
                    # direction (sign, or unit L2 step) does not change with the scale
                    total = loss.sum() * (FP16_LOSS_SCALE if fp16_active() else 1.0)
                    (grad,) = torch.autograd.grad(total, d)
                losses.append(float(loss.detach().mean()))
                with torch.no_grad():
                    if buffer is not None:
                        rows = active if early_stop else slice(None)
                        buffer[rows] = grad = B.accumulate(buffer[rows], grad, self.momentum)
                    if early_stop and self.diversity:
                        obj(x + d.detach())  # fooled() must speak of the real iterate, not its transform
                    new = d.detach() + sign * d_alpha * P.ascent_direction(grad, self.norm)
                    new = P.clip_to_image(x, P.project(new, d_eps, self.norm))
                    if early_stop:
                        keep = ~obj.fooled().to(pixels.device)  # fooled images keep the iterate just scored
                        stopped[active[~keep]] = True
                        stopped_at[active[~keep]] = step
                        delta[active[keep]] = new[keep]
                        if not bool(keep.all()):
                            active = active[keep]
                            obj = objective.subset(active)
                            x = pixels[active]
                            d_eps = eps if isinstance(eps, float) else eps[active]
                            d_alpha = alpha if isinstance(alpha, float) else alpha[active]
                    else:
                        delta = new
                if callback is not None:
                    callback(step + 1, self.steps, losses[-1])
                if early_stop and not len(active):
                    break
        delta = delta.detach()
        return AttackResult(adv=pixels + delta, delta=delta, losses=losses, stopped=stopped, stopped_at=stopped_at)
