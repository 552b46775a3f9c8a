from __future__ import annotations

from .base import ATTACKS, Attack


@ATTACKS.register("fgsm", label="FGSM", paper="Goodfellow et al. 2015")
class FGSM(Attack):
    """Fast Gradient Sign Method — Goodfellow et al., "Explaining and Harnessing Adversarial
    Examples", ICLR 2015, https://arxiv.org/abs/1412.6572.

    One step of size ``eps``: ``x' = clip(x + eps * sign(grad))`` (L-inf), or along the L2-normalised
    gradient for ``norm="l2"`` (fast gradient method).

    Args:
        eps: perturbation budget in pixel units (e.g. 4/255).
        norm: ``"linf"`` or ``"l2"``.

    Example:
        >>> res = FGSM(eps=4/255)(pixels, zero_shot_ce(model, prompts, labels))
    """

    name = "fgsm"

    def __init__(self, eps: float, norm: str = "linf") -> None:
        super().__init__(eps=eps, alpha=eps, steps=1, random_start=False, norm=norm)
