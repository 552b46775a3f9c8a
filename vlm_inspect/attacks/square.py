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
- ``steps`` is the query budget per image (the start counts as one).

L2 (the paper's Section 3.2):

- the window's profile is the paper's: two halves of opposite sign, each a sum of nested squares around
  its centre weighted ``1/(k+1)^2``, of unit norm, turned by 90 degrees at random;
- the start is a grid of such windows (side ``h // 5``), one sign per channel, scaled to ``‖δ‖₂ = ε``;
- each query takes the mass of a second window and puts it, with a new profile and new signs, on the
  first: per channel, the first window's new content has the norm its union with the second had, plus
  an equal share of the budget left unused (``(ε² − ‖δ‖²) / c``); the whole δ is then scaled to ``ε``
  and the image clipped to ``[0, 1]``;
- the window side is ``√(p h w)`` rounded, odd, at least 3, with the same schedule of ``p``.

Our choices for L2 are those of L∞ above (per-image windows, the objective as the score, the start kept
only where it scores above the clean image).
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


@ATTACKS.register("square", label="Square", paper="Andriushchenko et al. 2020", gradient_free=True)
class Square(Attack):
    """Square Attack (see the module docstring).

    Args:
        eps: budget in pixel units (or one per image); steps: the query budget per image (>= 1);
        norm: ``"linf"`` or ``"l2"``.
    """

    name = "square"

    def __init__(self, eps: float | Sequence[float], steps: int = 1000, norm: str = "linf") -> None:
        super().__init__(eps=eps, alpha=None, steps=steps, random_start=True, norm=norm)
        self.alpha = self.eps  # no step size: report the budget

    def __call__(self, pixels: torch.Tensor, objective: Objective, targeted: bool = False,
                 generator: torch.Generator | None = None, callback: StepCallback | None = None,
                 early_stop: bool = False) -> AttackResult:
        check_pixels(pixels)
        x = pixels.detach()
        if early_stop and targeted:
            raise ValueError("early_stop applies to untargeted attacks")
        sign = -1.0 if targeted else 1.0
        n, dev = x.shape[0], x.device
        eps = self._per_image(self.eps, x)
        eps = eps if isinstance(eps, torch.Tensor) else torch.full((n, 1, 1, 1), eps, dtype=x.dtype, device=dev)

        def draw_signs(*shape) -> torch.Tensor:
            return torch.randint(0, 2, shape, generator=generator, device=dev).to(x.dtype) * 2 - 1

        def score(obj, xs) -> tuple[torch.Tensor, torch.Tensor | None]:
            with torch.no_grad():
                value = sign * obj(xs).float()
            return value, obj.fooled().to(dev) if early_stop else None

        start, propose = (_l2_start, _l2_proposal) if self.norm == "l2" else (_linf_start, _linf_proposal)
        with model_guard(getattr(objective, "model", None)):
            clean_score, _ = score(objective, x)
            first = start(x, eps, draw_signs)
            first_score, wrong = score(objective, first)
            take = first_score > clean_score  # the start is kept only where it scores above the clean image
            best = torch.where(take.view(-1, 1, 1, 1), first, x)
            best_score = torch.where(take, first_score, clean_score)
            fooled = wrong & take if wrong is not None else torch.zeros(n, dtype=torch.bool, device=dev)
            fooled_at = torch.where(fooled, 0, -1)  # the query that first fooled each image
            losses = [sign * float(best_score.mean())]
            for q in range(1, self.steps):
                active = (~fooled).nonzero().flatten()
                if not len(active):
                    break
                cand = propose(x[active], eps[active], best[active], window_fraction(q - 1, self.steps),
                               draw_signs, generator)
                obj = objective if len(active) == n else objective.subset(active)
                new_score, new_wrong = score(obj, cand)
                keep = new_score > best_score[active]
                if new_wrong is not None:
                    keep |= new_wrong
                    fooled[active[new_wrong]] = True
                    fooled_at[active[new_wrong]] = q
                best[active[keep]] = cand[keep]
                best_score[active[keep]] = new_score[keep]
                losses.append(sign * float(best_score.mean()))
                if callback is not None:
                    callback(q, self.steps - 1, losses[-1])
        delta = (best - x).detach()
        return AttackResult(adv=x + delta, delta=delta, losses=losses[:self.steps],
                            stopped=fooled.clone() if early_stop else None,
                            stopped_at=fooled_at if early_stop else None)


def _linf_start(x: torch.Tensor, eps: torch.Tensor, draw_signs) -> torch.Tensor:
    """Vertical stripes: every column of every channel at +eps or -eps."""
    n, c, _, w = x.shape
    return (x + eps * draw_signs(n, c, 1, w)).clamp(0.0, 1.0)


def _linf_proposal(xa, ea, cur, p: float, draw_signs, generator) -> torch.Tensor:
    """One square window per image moved to a new corner of the eps-box (one sign per channel)."""
    k, c, h, w = xa.shape
    dev = xa.device
    s = min(max(int(round(math.sqrt(p * h * w))), 1), h, w)
    top = torch.randint(0, h - s + 1, (k, 1, 1, 1), generator=generator, device=dev)
    left = torch.randint(0, w - s + 1, (k, 1, 1, 1), generator=generator, device=dev)
    rows = torch.arange(h, device=dev).view(1, 1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, 1, w)
    window = (rows >= top) & (rows < top + s) & (cols >= left) & (cols < left + s)
    moved = cur + window * (2.0 * ea * draw_signs(k, c, 1, 1))
    return torch.min(torch.max(moved, xa - ea), xa + ea).clamp(0.0, 1.0)


def _l2_start(x: torch.Tensor, eps: torch.Tensor, draw_signs) -> torch.Tensor:
    """A grid of L2 windows of side h // 5, one sign per image and channel, scaled to ||delta|| = eps."""
    n, c, h, w = x.shape
    side = max(min(h, w) // 5, 1)
    start = torch.zeros_like(x)
    first = (h - 5 * side) // 2 if h >= 5 * side else 0
    for i in range(first, h - side + 1, side):
        for j in range(first, w - side + 1, side):
            start[:, :, i:i + side, j:j + side] += _profile(side, x.device, x.dtype) * draw_signs(n, c, 1, 1)
    return (x + _scaled(start, eps)).clamp(0.0, 1.0)


def _l2_proposal(xa, ea, cur, p: float, draw_signs, generator) -> torch.Tensor:
    """The mass of a second window moved, with a new profile and signs, onto the first (module docstring)."""
    k, c, h, w = xa.shape
    dev, dt = xa.device, xa.dtype
    s = max(int(round(math.sqrt(p * h * w))), 3)
    s = min(s + (s % 2 == 0), h, w)
    delta = cur - xa
    rows1, cols1 = _placing(k, s, h, w, generator, dev, dt)
    rows2, cols2 = _placing(k, s, h, w, generator, dev, dt)
    ones = torch.ones(k, 1, s, s, device=dev, dtype=dt)
    mask1, mask2 = _place(ones, rows1, cols1), _place(ones, rows2, cols2)
    old1 = _take(delta, rows1, cols1)                                   # (k, c, s, s)
    union = _channel_norm(delta * torch.max(mask1, mask2))              # (k, c, 1, 1)
    spare = (ea ** 2 - _image_norm(delta) ** 2).clamp(min=0.0) / c      # (k, 1, 1, 1)
    shape = _profile(s, dev, dt).expand(k, 1, s, s)
    turn = torch.rand(k, 1, 1, 1, generator=generator, device=dev) < 0.5
    shape = torch.where(turn, shape.transpose(-1, -2), shape)
    new = shape * draw_signs(k, c, 1, 1) + old1 / (_channel_norm(old1) + 1e-12)
    new = new / (_channel_norm(new) + 1e-12) * (spare + union ** 2).sqrt()
    moved = delta * (1 - mask2) * (1 - mask1) + _place(new, rows1, cols1)
    return (xa + _scaled(moved, ea)).clamp(0.0, 1.0)


def _nested(rows: int, cols: int, device, dtype) -> torch.Tensor:
    """Nested squares around the centre of a rows x cols block, the k-th weighted 1/(k+1)^2, unit norm."""
    d = torch.zeros(rows, cols, device=device, dtype=dtype)
    cr, cc = rows // 2, cols // 2
    for k in range(max(rows, cols) // 2 + 1):
        d[max(cr - k, 0):min(cr + k + 1, rows), max(cc - k, 0):min(cc + k + 1, cols)] += 1.0 / (k + 1) ** 2
    return d / d.norm()


def _profile(s: int, device, dtype) -> torch.Tensor:
    """The L2 window of side ``s``: two halves of opposite sign (the paper's Figure 2), unit norm."""
    if s < 2:
        return torch.ones(1, 1, device=device, dtype=dtype)
    top = s // 2
    d = torch.cat([_nested(top, s, device, dtype), -_nested(s - top, s, device, dtype)], 0)
    return d / d.norm()


def _placing(k: int, s: int, h: int, w: int, generator, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One random s x s window per image, as 0/1 matrices: rows (k, 1, h, s) and columns (k, 1, s, w)."""
    top = torch.randint(0, h - s + 1, (k,), generator=generator, device=device)
    left = torch.randint(0, w - s + 1, (k,), generator=generator, device=device)
    i = torch.arange(s, device=device)
    rows = (torch.arange(h, device=device).view(1, h, 1) == (top.view(k, 1, 1) + i.view(1, 1, s))).to(dtype)
    cols = (torch.arange(w, device=device).view(1, 1, w) == (left.view(k, 1, 1) + i.view(1, s, 1))).to(dtype)
    return rows.unsqueeze(1), cols.unsqueeze(1)


def _place(block: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(k, c, s, s) blocks put at each image's window of an all-zero (k, c, h, w)."""
    return rows @ block @ cols


def _take(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Each image's window, (k, c, s, s)."""
    return rows.transpose(-1, -2) @ images @ cols.transpose(-1, -2)


def _channel_norm(v: torch.Tensor) -> torch.Tensor:
    return (v ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()


def _image_norm(v: torch.Tensor) -> torch.Tensor:
    return (v ** 2).flatten(1).sum(-1).sqrt().view(-1, 1, 1, 1)


def _scaled(delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``delta`` scaled to L2 norm ``eps`` per image."""
    return delta / (_image_norm(delta) + 1e-12) * eps
