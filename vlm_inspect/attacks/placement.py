"""Where a region attack (typographic, patch) puts its region: a cell of a 3x3 grid, at random, or
``auto`` (the attack's own choice: the typographic attack searches the grid, the patch attack moves at
random while it is optimised and is then placed on the worst cell)."""
from __future__ import annotations

import torch

CELLS = ("top-left", "top", "top-right", "left", "centre", "right", "bottom-left", "bottom", "bottom-right")
POSITIONS = ("auto", "random") + CELLS
MARGIN = 0.04  # of the image side, between a region placed on the border and the edge


def check_position(position: str) -> str:
    p = str(position or "auto").strip().lower().replace("center", "centre").replace(" ", "-")
    if p not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; choose one of {', '.join(POSITIONS)}")
    return p


def cell_corner(cell: str, box_h: int, box_w: int, h: int, w: int) -> tuple[int, int]:
    """(top, left) of a ``box_h x box_w`` region on the grid cell ``cell`` of an ``h x w`` image."""
    row, col = divmod(CELLS.index(cell), 3)
    m = round(MARGIN * min(h, w))

    def at(k: int, box: int, side: int) -> int:
        room = max(side - box, 0)
        return (min(m, room), room // 2, max(room - m, 0))[k]

    return at(row, box_h, h), at(col, box_w, w)


def random_corner(box_h: int, box_w: int, h: int, w: int, generator: torch.Generator | None) -> tuple[int, int]:
    """A (top, left) drawn uniformly among the places the region fits."""
    top = int(torch.randint(0, max(h - box_h, 0) + 1, (1,), generator=generator))
    left = int(torch.randint(0, max(w - box_w, 0) + 1, (1,), generator=generator))
    return top, left


def worst_cell(cells, attempt, score, on_each=None):
    """The search both region attacks make: ``attempt(cell)`` puts the region on ``cell`` for every image
    and returns a tuple of (B, ...) tensors, the attacked images first; ``score(images)`` is (B,), higher
    is worse for the model. Returns, per image, the tensors of its highest-scoring cell, that score, and
    the cell's name. ``on_each(k, scores)`` follows each cell."""
    best = best_score = chosen = None
    for k, cell in enumerate(cells):
        outs = attempt(cell)
        s = score(outs[0])
        if best is None:
            best, best_score, chosen = list(outs), s, [cell] * len(s)
        else:
            better = s > best_score
            best = [torch.where(better.view(-1, *[1] * (o.ndim - 1)), o, b) for o, b in zip(outs, best)]
            best_score = torch.where(better, s, best_score)
            chosen = [cell if bool(w) else c for w, c in zip(better, chosen)]
        if on_each is not None:
            on_each(k, s)
    return best, best_score, chosen
