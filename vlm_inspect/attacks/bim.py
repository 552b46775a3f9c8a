from __future__ import annotations

from .base import ATTACKS, Attack


@ATTACKS.register("bim", label="BIM", paper="Kurakin et al. 2017")
class BIM(Attack):
    """Basic Iterative Method — Kurakin et al., "Adversarial examples in the physical world",
    ICLR workshop 2017, https://arxiv.org/abs/1607.02533.

    ``steps`` steps of size ``alpha`` from the clean image, each projected back onto the ``eps``
    ball and the valid pixel range. No random start.

    Args:
        eps: budget in pixel units; alpha: step size (default 2.5 * eps / steps); steps: >= 1;
        norm: ``"linf"`` or ``"l2"``; momentum, diversity: the transfer boosters MI and DI
        (``boosters.py``), off at 0 — BIM with momentum is MI-FGSM, with diversity DI-FGSM.
    """

    name = "bim"

    def __init__(self, eps: float, alpha: float | None = None, steps: int = 10, norm: str = "linf",
                 momentum: float = 0.0, diversity: float = 0.0) -> None:
        super().__init__(eps=eps, alpha=alpha, steps=steps, random_start=False, norm=norm,
                         momentum=momentum, diversity=diversity)
