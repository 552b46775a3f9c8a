"""Typographic attack — the "reading" failure of CLIP that Goh et al. found ("Multimodal Neurons in
Artificial Neural Networks", Distill 2021, https://distill.pub/2021/multimodal-neurons/): a word written
on the image (an "iPod" label on an apple) outweighs what the image shows.

A threat model of its own: no ε. What changes is where the letters are, and nothing else.

Faithful to the paper:

- the attack is the written word itself, a class name or any text, in plain letters on the image;
- nothing is optimised by gradient: a person could write the same label on the object.

Our choices:

- the letters are rendered with a font that ships with matplotlib (DejaVu Sans Bold by default; any
  font of matplotlib's own ``fonts/ttf`` folder by its file name, never a path), so no download is needed;
- ``text_size`` is the letters' height as a fraction of the image side; a word too long for the image is
  drawn smaller until it fits (the size used is in the result's ``info``);
- the word is blended with ``opacity`` in a solid ``colour`` (a name or ``#rrggbb``);
- ``position="auto"`` writes the word on each cell of a 3x3 grid and keeps, per image, the cell where
  the objective is highest (lowest for a targeted attack): a search of 9 forward passes, no gradient;
  ``"random"`` draws a place per image from the generator; a cell name writes it there;
- ``word`` may be one text per image (``evaluate`` writes each image's own wrong class).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

from .base import ATTACKS, Attack, AttackResult, Objective, SettingError, StepCallback, check_pixels, model_guard
from . import placement as PL

DEFAULT_FONT = "DejaVuSans-Bold"
MAX_WORD_CHARS = 40
MIN_FONT_PX = 6


def font_folder() -> Path:
    import matplotlib  # only for the folder of fonts it ships

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@lru_cache(maxsize=1)
def available_fonts() -> tuple[str, ...]:
    """The font names :class:`Typographic` accepts: the TrueType files matplotlib ships (read once)."""
    return tuple(sorted(p.stem for p in font_folder().glob("*.ttf")))


def check_font(font: str) -> str:
    name = str(font or DEFAULT_FONT).strip()
    if name not in available_fonts():
        dejavu = [f for f in available_fonts() if f.startswith("DejaVu")]
        raise ValueError(f"font {name!r} cannot be found among the fonts matplotlib ships; choose one of "
                         f"{', '.join(dejavu) or 'none: matplotlib has no fonts folder'}")
    return name


def parse_colour(colour: str) -> tuple[float, float, float]:
    """A colour name or ``#rrggbb`` -> (r, g, b) in [0, 1]."""
    from PIL import ImageColor

    try:
        rgb = ImageColor.getrgb(str(colour).strip())
    except (ValueError, AttributeError):
        raise ValueError(f"cannot read the colour {colour!r}; give a name (white, black, red, ...) or #rrggbb") from None
    return tuple(c / 255.0 for c in rgb[:3])


def check_word(word: str) -> str:
    text = " ".join(str(word or "").split())
    if not text:
        raise ValueError("the typographic attack needs a word to write: type one (or, for a zero-shot attack, "
                         "give a target class)")
    if len(text) > MAX_WORD_CHARS:
        raise ValueError(f"the typographic word has at most {MAX_WORD_CHARS} characters; got {len(text)}")
    return text


@lru_cache(maxsize=64)
def _font(name: str, px: int):
    from PIL import ImageFont

    return ImageFont.truetype(str(font_folder() / f"{name}.ttf"), px)


@lru_cache(maxsize=256)
def letters(word: str, font: str, text_size: float, h: int, w: int) -> tuple[torch.Tensor, int]:
    """The word's coverage ``(bh, bw)`` in [0, 1] (antialiased), cropped to its letters, and the font size
    in pixels: ``text_size * h``, or smaller until the word fits inside the image's margins."""
    from PIL import Image, ImageDraw

    px = max(MIN_FONT_PX, round(text_size * h))
    room = w - 2 * round(PL.MARGIN * min(h, w))
    while True:
        f = _font(font, px)
        left, top, right, bottom = f.getbbox(word)
        if right - left <= room:
            break
        if px <= MIN_FONT_PX:
            raise SettingError(f"the word {word[:20]!r} does not fit on a {w}-pixel-wide image even in "
                               f"{MIN_FONT_PX}-pixel letters: write a shorter word")
        px = max(MIN_FONT_PX, int(px * room / (right - left)))
    bw, bh = max(right - left, 1), max(bottom - top, 1)
    canvas = Image.new("L", (bw, bh), 0)
    ImageDraw.Draw(canvas).text((-left, -top), word, font=f, fill=255)
    cover = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(bh, bw).float() / 255.0
    return cover[: min(bh, h), : min(bw, w)], px


@ATTACKS.register("typographic", label="Typographic", paper="Goh et al. 2021", bounded=False, gradient_free=True,
                  rises=False)
class Typographic(Attack):
    """Write ``word`` on the image (see the module docstring).

    Args:
        word: the text (or one per image); text_size: letter height, fraction of the image side (0, 1];
        colour: a name or ``#rrggbb``; opacity: (0, 1]; position: ``auto`` (the worst of the 3x3 grid),
        ``random`` or a cell (``top-left`` ... ``bottom-right``); font: a font matplotlib ships.

    Example:
        >>> res = Typographic(word="dog")(pixels, objective)   # res.info["position"]: the cell chosen
    """

    name = "typographic"

    def __init__(self, word: str | Sequence[str] = "", text_size: float = 0.2, colour: str = "white",
                 opacity: float = 1.0, position: str = "auto", font: str = DEFAULT_FONT) -> None:
        self.words = [check_word(w) for w in word] if isinstance(word, (list, tuple)) else [check_word(word)]
        self.text_size = _fraction(text_size, "the text size (a fraction of the image side)")
        self.opacity = _fraction(opacity, "the opacity")
        self.colour = str(colour)
        self.rgb = parse_colour(colour)
        self.position = PL.check_position(position)
        self.font = check_font(font)
        # the attributes every attack carries: no budget, one scored candidate per cell searched
        self.eps, self.alpha, self.norm, self.random_start = 0.0, 0.0, "linf", False
        self.momentum = self.diversity = 0.0
        self.steps = len(PL.CELLS) if self.position == "auto" else 1

    def __repr__(self) -> str:
        return (f"Typographic(word={self.words[0] if len(self.words) == 1 else self.words!r}, text_size="
                f"{self.text_size:g}, colour={self.colour!r}, opacity={self.opacity:g}, position={self.position!r}, "
                f"font={self.font!r})")

    def config(self) -> dict:
        return {"name": self.name, "word": self.words[0] if len(self.words) == 1 else list(self.words),
                "text_size": self.text_size, "colour": self.colour, "opacity": self.opacity,
                "position": self.position, "font": self.font}

    def write(self, pixels: torch.Tensor, cells: Sequence[str] | None = None,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The images with the word written on each image's cell (``cells``; ``None``: ``self.position``,
        which must not be ``auto``), the (B, 1, H, W) coverage, and the font size used per image."""
        b, _, h, w = pixels.shape
        words = self.words * b if len(self.words) == 1 else self.words
        if len(words) != b:
            raise ValueError(f"{len(words)} typographic words for a batch of {b} images")
        cover = torch.zeros(b, 1, h, w, dtype=pixels.dtype, device=pixels.device)
        sizes = []
        for i in range(b):
            glyphs, px = letters(words[i], self.font, self.text_size, h, w)
            gh, gw = glyphs.shape
            where = cells[i] if cells is not None else self.position
            top, left = (PL.random_corner(gh, gw, h, w, generator) if where == "random"
                         else PL.cell_corner(where, gh, gw, h, w))
            cover[i, 0, top:top + gh, left:left + gw] = glyphs.to(pixels)
            sizes.append(px)
        alpha = cover * self.opacity
        ink = torch.tensor(self.rgb, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        return (pixels * (1 - alpha) + ink * alpha).clamp(0.0, 1.0), cover, sizes

    def __call__(self, pixels: torch.Tensor, objective: Objective, targeted: bool = False,
                 generator: torch.Generator | None = None, callback: StepCallback | None = None,
                 early_stop: bool = False) -> AttackResult:
        check_pixels(pixels)
        x = pixels.detach()
        b = x.shape[0]
        sign = -1.0 if targeted else 1.0
        candidates = list(PL.CELLS) if self.position == "auto" else [self.position]
        losses: list[float] = []
        sizes: list[int] = []  # the font size per image: the same on every cell

        def attempt(cell: str):
            adv, cover, sizes[:] = self.write(x, [cell] * b, generator)
            return adv, cover

        def scored(k: int, score: torch.Tensor) -> None:
            losses.append(sign * float(score.mean()))
            if callback is not None:
                callback(k + 1, len(candidates), losses[-1])

        with model_guard(getattr(objective, "model", None)), torch.no_grad():
            (best, best_cover), _, chosen = PL.worst_cell(candidates, attempt, lambda adv: sign * objective(adv).float(),
                                                          scored)
            stopped = stopped_at = None
            if early_stop:  # the word is written once: fooled or not, the image is final
                objective(best)
                stopped = objective.fooled().to(x.device)
                stopped_at = torch.where(stopped, 0, -1)
        delta = (best - x).detach()
        return AttackResult(adv=x + delta, delta=delta, losses=losses, stopped=stopped, stopped_at=stopped_at,
                            info={"position": chosen, "font_px": sizes, "region": best_cover > 0})


def _fraction(value, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number from 0 to 1, got {value!r}") from None
    if not 0 < v <= 1:
        raise ValueError(f"{what} must be more than 0 and at most 1, got {v:g}")
    return v
