"""Transfer boosters: options of the gradient attacks that make an image crafted on one model fool another.

**Momentum** — Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR 2018,
https://arxiv.org/abs/1710.06081 (MI-FGSM). Faithful: the update direction is the sign (L∞) or the
unit vector (L2) of an accumulated gradient ``g ← μ·g + ∇ / ‖∇‖₁``, the L1 norm taken per image, ``g``
starting at zero; ``μ = 1`` is the paper's choice. Our choice: ``μ = 0`` switches it off and the attack
is exactly the plain one; it applies to any iterative attack of the base step loop (BIM, PGD), also
with a random start (the paper starts at the clean image) and with targeted objectives.

**Input diversity** — Xie et al., "Improving Transferability of Adversarial Examples with Input
Diversity", CVPR 2019, https://arxiv.org/abs/1803.06978 (DI). Faithful: at each step, with probability
``p``, the gradient is taken through a random resize (nearest neighbour) and a random zero padding of
the image; one size and placement per step for the whole batch, as in the authors' code. Our choice,
as torchattacks does for models with a fixed input size: the image is shrunk to a side drawn from
``[0.9·H, H)`` and padded back to ``H``, where the paper enlarges 299 px to [299, 330) and feeds the larger
image (a ViT of fixed size cannot take it). ``p = 0`` switches it off; the paper's is 0.5. The
perturbation, its budget and its projection are those of the untransformed image: only the gradient
sees the transform, and early stop asks the model about the real image, not the transformed one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

RESIZE_RATE = 0.9  # the smallest side, as a fraction of the image's


def check_momentum(value) -> float:
    try:
        mu = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"momentum must be a number >= 0 (1.0 is MI-FGSM's), got {value!r}") from None
    if not 0 <= mu < float("inf"):
        raise ValueError(f"momentum must be a finite number >= 0 (1.0 is MI-FGSM's), got {mu:g}")
    return mu


def check_diversity(value) -> float:
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"diversity is a probability from 0 to 1 (0.5 is DI's), got {value!r}") from None
    if not 0 <= p <= 1:
        raise ValueError(f"diversity is a probability from 0 to 1 (0.5 is DI's), got {p:g}")
    return p


def accumulate(buffer: torch.Tensor, grad: torch.Tensor, mu: float) -> torch.Tensor:
    """MI-FGSM's ``μ·g + ∇ / ‖∇‖₁`` (per image)."""
    l1 = grad.abs().flatten(1).sum(1).clamp_min(1e-12).view(-1, *([1] * (grad.ndim - 1)))
    return mu * buffer + grad / l1


def diverse(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """DI's transform of a batch (differentiable in ``x``): with probability ``p`` shrink and pad, else ``x``."""
    if p <= 0:
        return x
    dev = x.device
    if float(torch.rand((), generator=generator, device=dev)) >= p:
        return x
    h, w = x.shape[-2:]
    lo = max(int(RESIZE_RATE * min(h, w)), 1)
    side = int(torch.randint(lo, min(h, w), (), generator=generator, device=dev)) if lo < min(h, w) else lo
    small = F.interpolate(x, size=(side, side), mode="nearest")
    top = int(torch.randint(0, h - side + 1, (), generator=generator, device=dev))
    left = int(torch.randint(0, w - side + 1, (), generator=generator, device=dev))
    return F.pad(small, (left, w - side - left, top, h - side - top))
