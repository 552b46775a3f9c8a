"""Adversarial patch — Brown, Mané, Roy, Abadi & Gilmer, "Adversarial Patch", 2017,
https://arxiv.org/abs/1712.09665: a square sticker whose pixels are free, anywhere in ``[0, 1]``, the rest of
the image untouched. A threat model of its own: no ε, the area is the budget.

Faithful to the paper:

- the patch is optimised by gradient over its pixel values, inside ``[0, 1]``;
- it can be **universal**: one patch optimised over a batch of images, then stuck on new ones;
- placed at random while it is optimised (the paper's expectation over locations), it works wherever
  it lands.

Our choices:

- the update is PGD's: a signed gradient step of ``alpha`` (default ``1.25 / steps``, Madry's rule
  ``2.5 · r / steps`` for the box ``[0, 1]`` of radius ``r = 0.5``), clipped to ``[0, 1]``; the paper trains
  with Adam over many images; we keep no rotation or scaling;
- ``patch_side`` is the side as a fraction of the image side (0.1: a patch on 1 % of the pixels);
- positions: a grid cell keeps the patch there; ``random`` moves it every step and draws the final place
  too; ``auto`` moves it every step, then puts it on the cell of the 3x3 grid where it hurts most (a
  search of 9 forward passes, no gradient);
- the start is uniform noise (``random_start``) or mid-grey;
- ``patch`` applies a given patch (say a universal one loaded from a PNG) instead of optimising one:
  it is resized to ``patch_side`` and placed as above.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .base import ATTACKS, Attack, AttackResult, Objective, SettingError, StepCallback, _budget, check_pixels, model_guard
from . import placement as PL

PNG_KEY = "vlm_inspect.patch_side"  # the side a saved patch was made for, in the PNG's text


def check_side(side, h: int | None = None) -> float:
    """A patch side as a fraction of the image side; with ``h`` it must be at least a pixel."""
    try:
        v = float(side)
    except (TypeError, ValueError):
        raise ValueError(f"the patch side must be a fraction of the image side (0.1 = a tenth), got {side!r}") from None
    if not 0 < v <= 1:
        what = "larger than the image" if v > 1 else "of size 0" if v == 0 else "negative"
        raise ValueError(f"a patch {what} cannot be placed: give its side as a fraction of the image side, "
                         f"more than 0 and at most 1 (got {v:g})")
    if h is not None and round(v * h) < 1:
        raise SettingError(f"a patch of side {v:g} is less than a pixel on a {h}-pixel image: make it larger")
    return v


def side_pixels(side: float, h: int) -> int:
    return max(1, min(h, round(side * h)))


@ATTACKS.register("patch", label="Patch", paper="Brown et al. 2017", bounded=False)
class Patch(Attack):
    """Adversarial patch (see the module docstring).

    Args:
        patch_side: the side, a fraction of the image side; steps: >= 1; alpha: step size in pixel
        values; position: ``auto``, ``random`` or a grid cell; random_start: start from noise;
        universal: one patch for the whole batch; patch: a (3, s, s) patch to apply instead.

    Example:
        >>> res = Patch(patch_side=0.1, steps=50, universal=True)(pixels, objective)
        >>> save_patch(res.info["patch"], "patch.png", 0.1)
    """

    name = "patch"

    def __init__(self, patch_side: float = 0.2, steps: int = 10, alpha: float | None = None, position: str = "auto",
                 random_start: bool = True, universal: bool = False, patch: torch.Tensor | None = None) -> None:
        self.side = check_side(patch_side)
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
        self.steps = int(steps)
        self.alpha = _budget(1.25 / self.steps if alpha is None else alpha, "alpha (step size)", "in pixel values")
        if isinstance(self.alpha, tuple):
            raise ValueError("the patch attack takes one step size")
        self.position = PL.check_position(position)
        self.random_start = bool(random_start)
        self.universal = bool(universal)
        if patch is not None and (patch.ndim != 3 or patch.shape[0] != 3):
            raise ValueError(f"a patch is a (3, s, s) image, got shape {tuple(patch.shape)}")
        self.patch = None if patch is None else patch.detach().float().clamp(0, 1)
        self.eps, self.norm, self.momentum, self.diversity = 0.0, "linf", 0.0, 0.0

    def __repr__(self) -> str:
        return (f"Patch(patch_side={self.side:g}, steps={self.steps}, alpha={self.alpha:.5g}, position={self.position!r}, "
                f"universal={self.universal}{', patch given' if self.patch is not None else ''})")

    def config(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "patch_side": self.side, "position": self.position}
        if self.patch is not None:
            return {**out, "patch": "given"}
        return {**out, "steps": self.steps, "alpha": self.alpha, "random_start": self.random_start,
                "universal": self.universal}

    def place(self, pixels: torch.Tensor, patch: torch.Tensor, corners: list[tuple[int, int]]) -> torch.Tensor:
        """``pixels`` with ``patch`` ((1 or B), 3, s, s) at each image's (top, left); differentiable in the patch."""
        b, _, h, w = pixels.shape
        s = patch.shape[-1]
        out = []
        for i, (top, left) in enumerate(corners):
            p = patch[i if patch.shape[0] > 1 else 0]
            pad = (left, w - left - s, top, h - top - s)
            inside = F.pad(torch.ones_like(p[:1]), pad)
            out.append(pixels[i] * (1 - inside) + F.pad(p, pad))
        return torch.stack(out)

    def _corners(self, where: str, b: int, s: int, h: int, w: int, generator) -> list[tuple[int, int]]:
        if where == "random":
            return [PL.random_corner(s, s, h, w, generator) for _ in range(b)]
        return [PL.cell_corner(where, s, s, h, w)] * b

    def __call__(self, pixels: torch.Tensor, objective: Objective, targeted: bool = False,
                 generator: torch.Generator | None = None, callback: StepCallback | None = None,
                 early_stop: bool = False) -> AttackResult:
        check_pixels(pixels)
        x = pixels.detach()
        b, _, h, w = x.shape
        check_side(self.side, h)
        s = side_pixels(self.side, h)
        sign = -1.0 if targeted else 1.0
        moving = "random" if self.position in ("auto", "random") else self.position
        losses: list[float] = []
        with model_guard(getattr(objective, "model", None)):
            if self.patch is not None:  # apply, do not optimise
                patch = F.interpolate(self.patch[None].to(x), size=(s, s), mode="bilinear", align_corners=False,
                                      antialias=True).clamp(0, 1)
            else:
                shape = (1 if self.universal else b, 3, s, s)
                patch = (torch.rand(shape, generator=generator, device=x.device, dtype=x.dtype) if self.random_start
                         else torch.full(shape, 0.5, device=x.device, dtype=x.dtype))
                for step in range(self.steps):
                    p = patch.requires_grad_(True)
                    with torch.enable_grad():
                        loss = objective(self.place(x, p, self._corners(moving, b, s, h, w, generator)))
                        (grad,) = torch.autograd.grad(loss.sum(), p)
                    losses.append(float(loss.detach().mean()))
                    patch = (p.detach() + sign * self.alpha * grad.sign()).clamp(0.0, 1.0)
                    if callback is not None:
                        callback(step + 1, self.steps, losses[-1])
            with torch.no_grad():
                best_score = None
                if self.position == "auto":  # the worst cell of the grid for each image
                    (best,), best_score, chosen = PL.worst_cell(
                        PL.CELLS, lambda cell: (self.place(x, patch, self._corners(cell, b, s, h, w, generator)),),
                        lambda adv: sign * objective(adv).float())
                    corners = [PL.cell_corner(c, s, s, h, w) for c in chosen]
                else:
                    corners = self._corners(self.position, b, s, h, w, generator)
                    chosen = [self.position if self.position != "random" else f"{t},{left}" for t, left in corners]
                    best = self.place(x, patch, corners)
                stopped = stopped_at = None
                # one more pass only when needed: fooled() must speak of ``best``, or a given patch has no loss yet
                if early_stop or (not losses and best_score is None):
                    best_score = sign * objective(best).float()
                    if early_stop:
                        stopped = objective.fooled().to(x.device)
                        stopped_at = torch.where(stopped, 0, -1)
                if not losses:
                    losses.append(sign * float(best_score.mean()))
        region = torch.zeros(b, 1, h, w, dtype=torch.bool, device=x.device)
        for i, (top, left) in enumerate(corners):
            region[i, :, top:top + s, left:left + s] = True
        delta = (best - x).detach()
        return AttackResult(adv=x + delta, delta=delta, losses=losses[:self.steps], stopped=stopped,
                            stopped_at=stopped_at,
                            info={"position": chosen, "patch": patch.detach()[0] if self.universal or self.patch is not None
                                  else patch.detach(), "side_px": s, "region": region})


def save_patch(patch: torch.Tensor, path: str | Path, side: float) -> Path:
    """Write a (3, s, s) patch as a lossless PNG that records the side it was made for."""
    from PIL import Image, PngImagePlugin

    arr = patch.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    meta = PngImagePlugin.PngInfo()
    meta.add_text(PNG_KEY, f"{float(side):g}")
    path = Path(path)
    Image.fromarray(arr, "RGB").save(path, format="PNG", pnginfo=meta)
    return path


def load_patch(source: Any, name: str | None = None) -> tuple[torch.Tensor, float | None]:
    """A patch image (a path, bytes, a PIL image or an array, read as any uploaded image is) -> the
    (3, s, s) patch and the side it was made for (``None`` when the PNG does not say). A patch that is
    not square is cropped to its centre square."""
    from ..images import load_image, pil_to_pixels

    img = load_image(source, name)
    side = None
    raw = img.info.get(PNG_KEY)  # the decoded image keeps the PNG's text
    if raw is not None:
        try:
            side = check_side(raw)
        except ValueError:
            side = None
    px = pil_to_pixels(img)[0]
    h, w = px.shape[-2:]
    k = min(h, w)
    top, left = (h - k) // 2, (w - k) // 2
    return px[:, top:top + k, left:left + k].contiguous(), side
