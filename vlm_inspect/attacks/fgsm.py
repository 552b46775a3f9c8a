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
        norm: ``"linf"`` or ``"l2"``; diversity: DI's probability (``boosters.py``), off at 0.

    Example:
        >>> res = FGSM(eps=4/255)(pixels, zero_shot_ce(model, prompts, labels))
    """

    name = "fgsm"

    def __init__(self, eps: float, norm: str = "linf", diversity: float = 0.0) -> None:
        # one step: momentum would change nothing, so FGSM does not take it
        super().__init__(eps=eps, alpha=eps, steps=1, random_start=False, norm=norm, diversity=diversity)
