"""What one inspection asks for: :class:`InspectRequest`, its checks, and the ranges the page offers.

The choices come from the registries: attacks from :data:`~vlm_inspect.attacks.ATTACKS`, norms from
:data:`~vlm_inspect.attacks.NORMS`, the attacked task from :data:`~vlm_inspect.objectives.OBJECTIVES`
(those registered with the family the app attacks, ``inspects``), heatmaps from
:data:`~vlm_inspect.explain.HEATMAPS`, model families from :data:`~vlm_inspect.models.FAMILIES`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..attacks import ATTACKS, NORMS, is_bounded
from ..attacks import patch as PA
from ..attacks.placement import check_position
from ..attacks.typographic import DEFAULT_FONT
from ..explain import HEATMAPS
from ..models import FAMILIES
from ..objectives import OBJECTIVES

SIDES = ("baseline", "defended")
# Ranges the page's controls offer; the API and the headless twin check the same ones.
EPS_MAX_K = 32        # epsilon slider, in k/255
STEPS_MAX = 100
TOP_K_MAX = 10
CURVE_EPS_K = (0, 1, 2, 3, 4, 6, 8, 16)
# Caps on what one request may ask for (a served app's worker is shared): ImageNet's 1000 classes fit.
MAX_CLASSES = 1000
MAX_CLASS_CHARS = 100
MAX_TEXT_CHARS = 300  # question, target, template

FIELD_LABELS = {"eps_k": "epsilon (k/255)", "alpha_k": "step size (k/255)", "steps": "steps", "seed": "seed",
                "top_k": "top-k", "momentum": "momentum (MI)", "diversity": "input diversity (DI probability)"}
# what each side's adversarial image is crafted on: the threat model (service/transfer.py)
CRAFTED_ON = {"own": "each side's own model (white-box)",
              "other": "the other side's model (transfer: the defended model's weights stay private)",
              "ensemble": "both sides' models at once (ensemble transfer)"}
MOMENTUM_MAX = 2.0  # MI-FGSM uses 1.0; above 2 the oldest gradients outweigh the newest


class InputError(ValueError):
    """Something a person asked for cannot be done; the message says what and how to fix it."""


class Cancelled(RuntimeError):
    """The client that asked for an inspection has gone; the work stopped between two attack steps."""


def targets() -> list[str]:
    """The tasks an inspection can attack: the objectives registered with the family the app attacks."""
    return [n for n in OBJECTIVES.list() if OBJECTIVES.meta(n).get("inspects")]


def target_family(target: str) -> str:
    """The family whose model an attack on ``target`` is crafted against."""
    return OBJECTIVES.meta(target)["inspects"]


def parse_classes(text: str | Sequence[str]) -> list[str]:
    """Comma-separated (or a list of) class labels -> stripped, de-duplicated, in order."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return list(dict.fromkeys(str(t).strip() for t in items if str(t).strip()))


@dataclass
class InspectRequest:
    """Everything one inspection needs besides the image. ``eps_k`` and ``alpha_k`` are in k/255."""

    baseline: dict[str, str | None] = field(default_factory=dict)   # family -> model name (or None)
    defended: dict[str, str | None] = field(default_factory=dict)
    attack: str = "pgd"
    norm: str = "linf"
    eps_k: float = 4.0
    steps: int = 10
    alpha_k: float = 0.0          # 0 = the default step size 2.5 * eps / steps (Madry et al.)
    random_start: bool = True     # attacks that take one (FGSM and BIM start at the clean image by definition)
    momentum: float = 0.0         # transfer boosters (attacks/boosters.py), off at 0: MI's decay,
    diversity: float = 0.0        # DI's probability; attacks that do not take one ignore it
    seed: int = 0
    crafted_on: str = "own"       # CRAFTED_ON: white-box per side, the other side's model, or both at once
    target: str = "zero-shot"     # which task's loss the attack ascends (or descends, with a target)
    classes: list[str] = field(default_factory=list)
    template: str = "a photo of a {}"
    question: str = ""
    target_text: str = ""         # a class, caption or answer: makes the attack targeted
    heatmap: str = "attention"
    top_k: int = 5
    # the attacks without an epsilon (attacks/typographic.py, attacks/patch.py); the others ignore these
    word: str = ""                # typographic: the text written; empty = the target class
    text_size: float = 0.2        # typographic: letter height, fraction of the image side
    colour: str = "white"
    opacity: float = 1.0
    font: str = DEFAULT_FONT
    position: str = "auto"        # POSITIONS: auto (the attack's search), random, or a cell of a 3x3 grid
    patch_side: float = 0.2       # patch: side, fraction of the image side
    patch: Any = None             # patch: an image to apply (say a saved universal patch) instead of optimising

    def _number(self, name: str, lo: float, hi: float, whole: bool = False) -> None:
        v = getattr(self, name)
        label = FIELD_LABELS.get(name, name)
        if v is None or isinstance(v, bool):
            raise InputError(f"{label} is missing: give a number from {lo:g} to {hi:g}")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise InputError(f"{label} must be a number from {lo:g} to {hi:g}, got {v!r}") from None
        if not lo <= f <= hi:
            raise InputError(f"{label} must be from {lo:g} to {hi:g}, got {f:g}")
        if whole and f != int(f):
            raise InputError(f"{label} must be a whole number, got {f:g}")
        setattr(self, name, int(f) if whole else f)

    def validate(self) -> "InspectRequest":
        """Check every field; raise :class:`InputError` with one clear sentence for the first problem."""
        self.attack = str(self.attack or "").lower()
        if self.attack not in ATTACKS.list():
            raise InputError(f"unknown attack {self.attack!r}; choose one of {', '.join(ATTACKS.list())}")
        self.norm = str(self.norm or "").lower().replace("-", "")
        if self.norm not in NORMS:
            raise InputError(f"unknown norm {self.norm!r}; choose {' or '.join(NORMS)}")
        norms = ATTACKS.meta(self.attack).get("norms", NORMS)  # an attack may support fewer norms
        if self.norm not in norms:
            raise InputError(f"the {self.attack} attack supports {' and '.join(norms)} only; choose "
                             f"{' or '.join(norms)}, or another attack")
        self._number("eps_k", 0, EPS_MAX_K)
        self._number("steps", 1, STEPS_MAX, whole=True)
        self._number("alpha_k", 0, EPS_MAX_K)
        self._number("momentum", 0, MOMENTUM_MAX)
        self._number("diversity", 0, 1)
        self._number("seed", 0, 2**31 - 1, whole=True)
        self._number("top_k", 1, TOP_K_MAX, whole=True)
        if self.target not in targets():
            raise InputError(f"unknown attack target {self.target!r}; choose one of {', '.join(targets())}")
        if self.heatmap not in HEATMAPS.list():
            raise InputError(f"unknown heatmap {self.heatmap!r}; choose one of {', '.join(HEATMAPS.list())}")
        self.crafted_on = str(self.crafted_on or "own").lower()
        if self.crafted_on not in CRAFTED_ON:
            raise InputError(f"unknown 'crafted on' choice {self.crafted_on!r}; choose one of {', '.join(CRAFTED_ON)}")
        self._check_texts()
        self._check_region()
        for side in SIDES:
            chosen = getattr(self, side)
            unknown = set(chosen) - set(FAMILIES)
            if unknown:
                raise InputError(f"unknown model family {sorted(unknown)[0]!r}; valid: {', '.join(FAMILIES)}")
            setattr(self, side, {f: (chosen.get(f) or None) for f in FAMILIES})
        self._check_models()
        self._check_sources()
        return self

    def _check_sources(self) -> None:
        """Crafting on the other side's model needs the attacked family's model on both sides (an ensemble
        with none is caught by ``_check_models``: no model of the attacked family)."""
        family = target_family(self.target)
        have = [s for s in SIDES if getattr(self, s).get(family)]
        if self.crafted_on == "other" and len(have) < len(SIDES):
            missing = next(s for s in SIDES if s not in have)
            raise InputError(f"crafting on the other side's model needs a {family} model on both sides; the "
                             f"{missing} side has none - pick one, or craft on each side's own model")

    def _check_region(self) -> None:
        """The settings of the attacks without an epsilon, checked by building the attack (one sentence each)."""
        try:
            self.position = check_position(self.position)
        except ValueError as e:
            raise InputError(str(e)) from None
        if is_bounded(self.attack):
            return
        if self.attack == "typographic":
            self.word = " ".join(str(self.word or "").split()) or self.target_text
        if self.attack == "patch" and self.patch is not None and not isinstance(self.patch, torch.Tensor):
            try:
                self.patch, _ = PA.load_patch(self.patch)
            except ValueError as e:
                raise InputError(str(e).replace("the uploaded image", "the patch image")) from None
        try:
            make_attack(self, 3)
        except ValueError as e:
            raise InputError(str(e)) from None

    def _check_texts(self) -> None:
        self.classes = parse_classes(self.classes)
        if len(self.classes) > MAX_CLASSES:
            raise InputError(f"at most {MAX_CLASSES} classes can be compared at once; got {len(self.classes)}")
        long = next((c for c in self.classes if len(c) > MAX_CLASS_CHARS), None)
        if long is not None:
            raise InputError(f"a class name has at most {MAX_CLASS_CHARS} characters; one has {len(long)}")
        for name, label in (("template", "the prompt template"), ("question", "the question"),
                            ("target_text", "the target")):
            value = str(getattr(self, name) or "")
            if len(value) > MAX_TEXT_CHARS:
                raise InputError(f"{label} has at most {MAX_TEXT_CHARS} characters; got {len(value)}")
        self.template = str(self.template or "{}")
        if self.template.count("{}") != 1:
            raise InputError(f"the prompt template must contain {{}} exactly once (where the class goes), "
                             f"got {self.template!r}")
        self.question = str(self.question or "").strip()
        self.target_text = str(self.target_text or "").strip()

    def _check_models(self) -> None:
        if not any(self.baseline.values()) and not any(self.defended.values()):
            raise InputError("no model is selected: pick at least one baseline or defended model")
        if any(m.get("clip") for m in (self.baseline, self.defended)) and len(self.classes) < 2:
            raise InputError("zero-shot classification needs at least two class names (comma-separated)")
        if any(m.get("vqa") for m in (self.baseline, self.defended)) and not self.question:
            raise InputError("the VQA model needs a question: type one, or set the VQA models to none")
        if self.question and not any(m.get("vqa") for m in (self.baseline, self.defended)):
            raise InputError("a question was given but no VQA model is selected: pick a VQA model "
                             "or clear the question")
        family = target_family(self.target)
        if not any(m.get(family) for m in (self.baseline, self.defended)):
            raise InputError(f"the attack targets {self.target} but no {family} model is selected on either side")
        if self.target_text:
            if not OBJECTIVES.meta(self.target).get("targetable", True):
                raise InputError(f"the {self.target} attack has no target: clear the target or choose another task")
            if family == "clip" and self.target_text not in self.classes:
                raise InputError(f"the target class {self.target_text!r} is not among the classes: "
                                 f"{', '.join(self.classes)}")

    @property
    def eps(self) -> float:
        return self.eps_k / 255.0

    @property
    def prompts(self) -> list[str]:
        return [self.template.replace("{}", c) for c in self.classes]

    def attack_config(self) -> dict[str, Any]:
        """The attack as a person set it. ``eps`` and ``alpha`` are in pixel units for L-inf; for L2
        the radius each model was attacked with is in the report's ``perturbation.sides`` (``budget``).
        An attack without an epsilon (typographic, patch) has ``eps`` None and its settings in ``threat``."""
        atk = make_attack(self, 1)
        common = {"seed": self.seed, "crafted_on": self.crafted_on, "target": self.target,
                  "targeted": bool(self.target_text), "target_text": self.target_text or None}
        if not is_bounded(self.attack):
            threat = {k: v for k, v in atk.config().items() if k != "name"}
            return {"name": self.attack, "eps": None, "eps_k255": None, "norm": None, "steps": atk.steps,
                    "threat": threat, **common}
        takes_alpha = "alpha" in ATTACKS.parameters(self.attack)
        return {"name": self.attack, "eps": self.eps, "eps_k255": self.eps_k,
                "alpha": self.alpha_k / 255.0 if self.alpha_k > 0 and takes_alpha else None, "alpha_rule":
                "2.5*eps/steps" if not self.alpha_k and takes_alpha else None, "norm": self.norm,
                "steps": atk.steps, "random_start": atk.random_start, **atk.boosters(), **common}


def make_attack(req: InspectRequest, dim: int, eps_k: float | Sequence[float] | None = None):
    """The attack a request describes, for a model whose input has ``dim`` pixel values. ``eps_k`` may
    be one budget per image (robustness curves).

    Budgets are given in k/255. For L-inf that is the radius; for L2 the radius is
    ``k/255 * sqrt(dim)``: the L2 ball that allows the same root-mean-square change per pixel value as
    the L-inf ball of the same k (so the slider means the same visible strength for both norms).
    """
    scale = math.sqrt(dim) / 255.0 if req.norm == "l2" else 1 / 255.0
    many = isinstance(eps_k, (list, tuple))
    eps = [e * scale for e in eps_k] if many else (req.eps_k if eps_k is None else eps_k) * scale
    alpha = req.alpha_k * scale if req.alpha_k > 0 and not many else None
    if not is_bounded(req.attack):  # no epsilon: the step size slider is in pixel values (k/255) as given
        alpha = req.alpha_k / 255.0 if req.alpha_k > 0 else None
    return ATTACKS.build(req.attack, eps=eps, alpha=alpha, steps=req.steps, random_start=req.random_start,
                         norm=req.norm, momentum=req.momentum, diversity=req.diversity, word=req.word,
                         text_size=req.text_size, colour=req.colour, opacity=req.opacity, font=req.font,
                         position=req.position, patch_side=req.patch_side,
                         patch=req.patch if isinstance(req.patch, torch.Tensor) else None)
