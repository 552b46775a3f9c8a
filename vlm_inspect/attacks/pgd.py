from __future__ import annotations

from .base import ATTACKS, Attack


@ATTACKS.register("pgd", label="PGD", paper="Madry et al. 2018")
class PGD(Attack):
    """Projected Gradient Descent — Madry et al., "Towards Deep Learning Models Resistant to
    Adversarial Attacks", ICLR 2018, https://arxiv.org/abs/1706.06083.

    BIM from a random start drawn uniformly in the ``eps`` ball (pass a ``torch.Generator`` to the
    call for a reproducible start).

    Args:
        eps: budget in pixel units; alpha: step size (default 2.5 * eps / steps); steps: >= 1;
        random_start: draw the start (default True); norm: ``"linf"`` or ``"l2"``;
        momentum, diversity: the transfer boosters MI and DI (``boosters.py``), off at 0.

    Example:
        >>> atk = PGD(eps=4/255, alpha=1/255, steps=10)
        >>> res = atk(pixels, objective, generator=torch.Generator().manual_seed(0))
    """

    name = "pgd"

    def __init__(self, eps: float, alpha: float | None = None, steps: int = 10, random_start: bool = True,
                 norm: str = "linf", momentum: float = 0.0, diversity: float = 0.0) -> None:
        super().__init__(eps=eps, alpha=alpha, steps=steps, random_start=random_start, norm=norm,
                         momentum=momentum, diversity=diversity)
