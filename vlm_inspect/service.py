"""InspectService: the model cache and every computation the app and ``vlm_inspect.inspect`` show.

No gradio here (DESIGN §2): the UI and the headless twin call :meth:`InspectService.inspect` and
:meth:`InspectService.curve` and only lay out what comes back.

One inspection, for each *side* (baseline, defended):

1. the clean image goes through every selected model of the side (CLIP zero-shot top-k and its
   text-guided attention map, captioner caption, VQA answer); these clean results are cached, so
   moving the epsilon slider only recomputes the adversarial half;
2. the model of the side that the attack targets (CLIP for zero-shot and the embedding attack, the
   captioner for captions, the VQA model for answers) is attacked **white-box**: each side gets its
   own adversarial image, crafted against its own model, so a defended model is never judged on a
   perturbation made for another model;
3. every model of the side then sees that side's adversarial image (the other tasks show how the
   attack transfers across tasks of one side).

Captions and answers are generated last, all those of one model in one batched call (clean and
adversarial images, both sides when they share the model; :class:`TextBatch`).

Untargeted attacks push the model away from its own clean output (its top-1 class, its clean caption,
its clean answer); with a target they pull it towards the target class, caption or answer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .attacks import ATTACKS
from .checkpoints import is_vlm_checkpoint, read_config
from .explain import attention_shift, grad_cam, overlay
from .images import ImageError, image_warnings, load_image, pil_to_pixels, pixels_to_uint8, resize_center_crop
from .models import list_presets, load
from .data.scene_kind import is_shapes_scene
from .models.presets import (FAMILIES, PRESETS, SUITES, ModelUnavailableError, checkpoint_suite,
                             checkpoints_dir, is_pretrained, weights_dir)
from .models.tokenizers import TOKENIZER_KIND as SHAPES_TOKENIZER
from .policy import ModelPolicy, ModelRefused
from .runtime import autocast, decoding_precision, resolve_device, resolve_precision
from .objectives import answer_nll, caption_nll, embedding_cosine, zero_shot_ce

log = logging.getLogger(__name__)

SIDES = ("baseline", "defended")
TARGETS = ("zero-shot", "caption", "vqa", "embedding")
TARGET_FAMILY = {"zero-shot": "clip", "caption": "captioner", "vqa": "vqa", "embedding": "clip"}
HEATMAPS = ("attention", "gradcam")
# Ranges the page's controls offer; the API and the headless twin check the same ones.
EPS_MAX_K = 32        # epsilon slider, in k/255
STEPS_MAX = 100
TOP_K_MAX = 10
CURVE_EPS_K = (0, 1, 2, 3, 4, 6, 8, 16)
# ``precision="auto"``: models at least this large run attacks and inference in bf16 where the hardware
# has it (ViT-B-32: 1.5x faster at batch 16, equal at batch 1); the embedded ones (< 10 M) stay fp32
AUTO_LOW_PRECISION_MIN_PARAMS = 50_000_000
DISPLAY_SIZE = 256    # the embedded models see 64 px; images are shown enlarged (nearest) to this
# Caps on what one request may ask for (a served app's worker is shared): ImageNet's 1000 classes fit.
MAX_CLASSES = 1000
MAX_CLASS_CHARS = 100
MAX_TEXT_CHARS = 300  # question, target, template


FIELD_LABELS = {"eps_k": "epsilon (k/255)", "alpha_k": "step size (k/255)", "steps": "steps", "seed": "seed",
                "top_k": "top-k"}


class InputError(ValueError):
    """Something a person asked for cannot be done; the message says what and how to fix it."""


class Cancelled(RuntimeError):
    """The client that asked for an inspection has gone; the work stopped between two attack steps."""


# ---- label sets --------------------------------------------------------------------------------

def label_sets() -> dict[str, tuple[list[str], str]]:
    """Named class lists with their prompt template (``{}`` is the label): the shapes datasets' label
    sets (SHAPES_WORLD.md) and a few everyday objects for real photos."""
    from .data.shapes import COLOURS, COUNTS, PAIRS, SHAPES, SIZES

    return {
        "shapes: colour + shape (48)": ([f"{c} {s}" for c, s in PAIRS], "a photo of a {}"),
        "shapes: shape (6)": (list(SHAPES), "a photo of a {}"),
        "shapes: colour (8)": (list(COLOURS), "a photo of a {} object"),
        "shapes: size (2)": (list(SIZES), "a photo of a {} object"),
        "shapes: count (3)": (list(COUNTS), "a photo of {} shapes"),
        "everyday objects (12)": (["person", "astronaut", "cat", "dog", "cup of coffee", "motorcycle", "car",
                                   "bird", "flower", "building", "rocket", "tree"], "a photo of a {}"),
    }


DEFAULT_LABEL_SET = {"embedded": "shapes: colour + shape (48)", "pretrained": "everyday objects (12)"}
DEFAULT_QUESTION = {"embedded": "how many shapes are there?", "pretrained": "what is in the picture?"}


def parse_classes(text: str | Sequence[str]) -> list[str]:
    """Comma-separated (or a list of) class labels -> stripped, de-duplicated, in order."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return list(dict.fromkeys(str(t).strip() for t in items if str(t).strip()))


# ---- the request -------------------------------------------------------------------------------

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
    random_start: bool = True     # PGD only (FGSM and BIM start at the clean image by definition)
    seed: int = 0
    target: str = "zero-shot"     # which task's loss the attack ascends (or descends, with a target)
    classes: list[str] = field(default_factory=list)
    template: str = "a photo of a {}"
    question: str = ""
    target_text: str = ""         # a class, caption or answer: makes the attack targeted
    heatmap: str = "attention"
    top_k: int = 5

    def validate(self) -> "InspectRequest":
        """Check every field; raise :class:`InputError` with one clear sentence for the first problem."""
        def number(name: str, lo: float, hi: float, whole: bool = False) -> None:
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

        self.attack = str(self.attack or "").lower()
        if self.attack not in ATTACKS.list():
            raise InputError(f"unknown attack {self.attack!r}; choose one of {', '.join(ATTACKS.list())}")
        self.norm = str(self.norm or "").lower().replace("-", "")
        if self.norm not in ("linf", "l2"):
            raise InputError(f"unknown norm {self.norm!r}; choose linf or l2")
        number("eps_k", 0, EPS_MAX_K)
        number("steps", 1, STEPS_MAX, whole=True)
        number("alpha_k", 0, EPS_MAX_K)
        number("seed", 0, 2**31 - 1, whole=True)
        number("top_k", 1, TOP_K_MAX, whole=True)
        if self.target not in TARGETS:
            raise InputError(f"unknown attack target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.heatmap not in HEATMAPS:
            raise InputError(f"unknown heatmap {self.heatmap!r}; choose one of {', '.join(HEATMAPS)}")
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
        for side in SIDES:
            chosen = getattr(self, side)
            unknown = set(chosen) - set(FAMILIES)
            if unknown:
                raise InputError(f"unknown model family {sorted(unknown)[0]!r}; valid: {', '.join(FAMILIES)}")
            setattr(self, side, {f: (chosen.get(f) or None) for f in FAMILIES})
        if not any(self.baseline.values()) and not any(self.defended.values()):
            raise InputError("no model is selected: pick at least one baseline or defended model")
        if any(m.get("clip") for m in (self.baseline, self.defended)) and len(self.classes) < 2:
            raise InputError("zero-shot classification needs at least two class names (comma-separated)")
        if any(m.get("vqa") for m in (self.baseline, self.defended)) and not self.question:
            raise InputError("the VQA model needs a question: type one, or set the VQA models to none")
        if self.question and not any(m.get("vqa") for m in (self.baseline, self.defended)):
            raise InputError("a question was given but no VQA model is selected: pick a VQA model "
                             "or clear the question")
        family = TARGET_FAMILY[self.target]
        if not any(m.get(family) for m in (self.baseline, self.defended)):
            raise InputError(f"the attack targets {self.target} but no {family} model is selected on either side")
        if self.target_text:
            if self.target == "embedding":
                raise InputError("the embedding attack has no target: clear the target or choose another task")
            if self.target == "zero-shot" and self.target_text not in self.classes:
                raise InputError(f"the target class {self.target_text!r} is not among the classes: "
                                 f"{', '.join(self.classes)}")
        return self

    @property
    def eps(self) -> float:
        return self.eps_k / 255.0

    @property
    def prompts(self) -> list[str]:
        return [self.template.replace("{}", c) for c in self.classes]

    def attack_config(self) -> dict[str, Any]:
        """The attack as a person set it. ``eps`` and ``alpha`` are in pixel units for L-inf; for L2
        the radius each model was attacked with is in the report's ``perturbation.sides`` (``budget``)."""
        return {"name": self.attack, "eps": self.eps, "eps_k255": self.eps_k,
                "alpha": self.alpha_k / 255.0 if self.alpha_k > 0 else None, "alpha_rule":
                "2.5*eps/steps" if not self.alpha_k and self.attack != "fgsm" else None, "norm": self.norm,
                "steps": 1 if self.attack == "fgsm" else self.steps,
                "random_start": self.random_start and self.attack == "pgd", "seed": self.seed,
                "target": self.target, "targeted": bool(self.target_text), "target_text": self.target_text or None}


def make_attack(req: InspectRequest, dim: int, eps_k: float | Sequence[float] | None = None):
    """The attack a request describes, for a model whose input has ``dim`` pixel values. ``eps_k`` may
    be one budget per image (robustness curves).

    Budgets are given in k/255. For L-inf that is the radius; for L2 the radius is
    ``k/255 * sqrt(dim)``: the L2 ball that allows the same root-mean-square change per pixel value as
    the L-inf ball of the same k (so the slider means the same visible strength for both norms).
    """
    cls = ATTACKS.get(req.attack)
    scale = math.sqrt(dim) / 255.0 if req.norm == "l2" else 1 / 255.0
    many = isinstance(eps_k, (list, tuple))
    eps = [e * scale for e in eps_k] if many else (req.eps_k if eps_k is None else eps_k) * scale
    if req.attack == "fgsm":
        return cls(eps=eps, norm=req.norm)
    alpha = req.alpha_k * scale if req.alpha_k > 0 and not many else None
    if req.attack == "bim":
        return cls(eps=eps, alpha=alpha, steps=req.steps, norm=req.norm)
    return cls(eps=eps, alpha=alpha, steps=req.steps, random_start=req.random_start, norm=req.norm)


# ---- results -----------------------------------------------------------------------------------

@dataclass
class Inspection:
    """What one inspection produced: a JSON-able ``report`` (DESIGN §3.6) and the images to show.

    ``images`` keys: ``clean``; ``adversarial/<side>``, ``perturbation/<side>``; and for CLIP models
    ``heatmap/<side>/clean``, ``heatmap/<side>/adversarial``; all HxWx3 uint8 at display size.
    """

    report: dict[str, Any]
    images: dict[str, np.ndarray]
    warnings: list[str]


def _display(arr: np.ndarray, size: int = DISPLAY_SIZE) -> np.ndarray:
    """Enlarge a small model-input image with nearest neighbours (pixels stay visible as pixels)."""
    from PIL import Image

    if arr.shape[0] >= size:
        return arr
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.NEAREST))


def amplify(delta: torch.Tensor) -> np.ndarray:
    """A perturbation made visible: mid-grey is zero, scaled so its largest entry reaches black/white."""
    d = delta.detach().float()
    scale = d.abs().max().clamp_min(1e-12)
    return pixels_to_uint8((0.5 + 0.5 * d / scale).clamp(0, 1))


def image_digest(img) -> str:
    return hashlib.sha256(np.asarray(img).tobytes() + repr(img.size).encode()).hexdigest()[:16]


# ---- batched captions and answers ---------------------------------------------------------------

class TextBatch:
    """Captions and answers queued during one request, generated by :meth:`run` with one batched call
    per model (all its images: clean and adversarial, both sides). Each decoded token reads the whole
    decoder, so one call of three images costs less than three calls of one: 20-25 % less for
    ViT-GPT2 and BLIP on 2 CPU cores (``benchmarks/text_batch.py``, docs/BENCHMARKS.md).

    Each job writes ``caption`` or ``answer`` into the dict it was queued with. Greedy decoding of a
    row does not depend on the other rows of its batch (up to floating-point rounding)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, torch.Tensor, str, dict[str, Any], tuple | None]] = []
        self.pending: dict[tuple, dict[str, Any]] = {}  # clean outputs queued here, by cache key

    def __len__(self) -> int:
        return len(self.jobs)

    def add(self, model, pixels: torch.Tensor, question: str, out: dict[str, Any], key: tuple | None = None) -> None:
        """Queue ``model``'s caption (captioner) or answer to ``question`` (VQA) for ``pixels`` (1, 3, H, W)."""
        self.jobs.append((model, pixels, question, out, key))
        if key is not None:
            self.pending[key] = out

    def run(self, clean_only: bool = False) -> list[tuple[tuple, dict[str, Any]]]:
        """Generate everything queued (with ``clean_only``, only the clean outputs: the rest stays queued);
        returns the (key, outputs) of the completed clean jobs."""
        now = [j for j in self.jobs if j[4] is not None] if clean_only else self.jobs
        groups: dict[int, list] = {}
        for job in now:
            groups.setdefault(id(job[0]), []).append(job)
        for jobs in groups.values():
            model, pixels = jobs[0][0], torch.cat([j[1] for j in jobs])
            with torch.no_grad():
                if model.family == "captioner":
                    field, values = "caption", model.generate(pixels)
                else:
                    field, values = "answer", model.answer(pixels, [j[2] for j in jobs])
            for job, value in zip(jobs, values):
                job[3][field] = value
        done = [(j[4], j[3]) for j in now if j[4] is not None]
        self.jobs = [j for j in self.jobs if j[4] is None] if clean_only else []
        self.pending.clear()
        return done


# ---- the service -------------------------------------------------------------------------------

class InspectService:
    """Holds the models (loaded on first use, reloaded when their checkpoint changes on disk) and runs
    inspections. Thread-safe: one model computation at a time (the UI queues its listeners too).

    Args:
        suite: default suite for :meth:`defaults` (``embedded`` or ``pretrained``).
        device: torch device for every model (``auto``: a CUDA GPU if visible, else the CPU).
        precision: autocast precision of attacks and inference (:mod:`vlm_inspect.runtime`): ``fp32``,
            ``bf16``, ``fp16`` (GPU) or ``auto``: per request, bf16 (fp16 on a GPU without bf16) when a
            model of the request is large (``AUTO_LOW_PRECISION_MIN_PARAMS``) and the hardware computes
            bf16 natively, else fp32. The small embedded models run *slower* in bf16 on a CPU (0.64x,
            docs/BENCHMARKS.md), so they stay fp32. Under ``auto`` on a CPU, captions and answers are
            decoded in fp32 (:func:`vlm_inspect.runtime.decoding_precision`; the report's
            ``runtime.generation_precision``): only the token-by-token loops, while the image (and BLIP's
            question) encoders feeding them keep the request's precision.
        model_dirs: extra folders whose sub-folders holding a vlm_inspect checkpoint are offered as
            models (e.g. ``runs/`` where ``python -m vlm_inspect.train --out runs/NAME`` writes).
        max_models: how many models stay loaded (least recently used are dropped).
        policy: which model names a request may use (:mod:`vlm_inspect.policy`). The default is a
            served app's: the catalog only. The local ``inspect`` command passes ``ModelPolicy.local()``.
    """

    def __init__(self, suite: str = "embedded", device: str = "cpu", precision: str = "fp32",
                 model_dirs: Sequence[str | Path] = ("runs",), max_models: int = 8,
                 policy: ModelPolicy | None = None) -> None:
        if suite not in SUITES:
            raise ValueError(f"unknown suite {suite!r}; valid: {', '.join(SUITES)}")
        self.suite, self.device = suite, resolve_device(device)
        self.precision = "auto" if str(precision).lower() == "auto" else resolve_precision(precision, self.device)
        self.model_dirs = [Path(d) for d in model_dirs]
        self.max_models = max_models
        self.policy = policy if policy is not None else ModelPolicy()
        self._models: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self._clean: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
        self._text: dict[tuple, torch.Tensor] = {}
        self._lock = threading.RLock()

    # -- which models exist --
    def run_folders(self, family: str | None = None, suite: str | None = None) -> list[str]:
        """Checkpoint folders under ``model_dirs`` (training outputs), as paths; with ``suite``, only
        those whose model (or base model) belongs to that suite."""
        found = []
        for root in self.model_dirs:
            if not root.is_dir():
                continue
            for d in sorted(root.iterdir()):
                if d.is_dir() and is_vlm_checkpoint(d):
                    config = read_config(d)
                    if (family is None or config.get("family") == family) and \
                            (suite is None or checkpoint_suite(config) == suite):
                        found.append(str(d))
        return found

    def models(self, family: str, suite: str | None = None) -> list[str]:
        """Model names offered for ``family`` in ``suite``: presets, checkpoints in ``checkpoints/``,
        and training outputs under ``model_dirs`` on models of that suite. Re-read on every call."""
        suite = suite or self.suite
        names = list_presets(suite=suite, family=family)
        return names + [d for d in self.run_folders(family, suite) if d not in names]

    def defaults(self, suite: str | None = None) -> dict[str, dict[str, str | None]]:
        """``{"baseline": {family: name}, "defended": {family: name or None}}``: the suite's preset
        baselines, and for each a defended checkpoint of it (``<baseline>+<defense>``), preferring a
        paper's defense over the TeCoA reference baseline."""
        suite = suite or self.suite
        out: dict[str, dict[str, str | None]] = {"baseline": {}, "defended": {}}
        for fam in FAMILIES:
            names = self.models(fam, suite)
            base = next((n for n in names if n in PRESETS and "+" not in n), names[0] if names else None)
            out["baseline"][fam] = base
            # a paper's defense first (TGA-ZSR, verified from its authors' code and the most robust of them
            # on the shapes world, docs/REPRODUCTION.md); TeCoA, the reference baseline, last
            defended = sorted((n for n in names if base and n.startswith(base + "+")),
                              key=lambda n: (n.endswith("+tecoa"), not n.endswith("+tga-zsr"), n))
            out["defended"][fam] = defended[0] if defended else None
        return out

    def suite_fields(self, suite: str | None = None, models: dict[str, dict[str, str | None]] | None = None,
                     classes: str | Sequence[str] = "", template: str = "", question: str | None = None,
                     label_set: str | None = None) -> dict[str, Any]:
        """Request fields for ``suite`` where unset ones take the suite's defaults: models not named in
        ``models`` (``{side: {family: name or None}}``), the class list and template of ``label_set``
        (default: the suite's) when ``classes`` / ``template`` are empty, and the suite's question when
        ``question`` is None and a VQA model is selected."""
        suite = suite or self.suite
        if suite not in SUITES:
            raise InputError(f"unknown suite {suite!r}; valid: {', '.join(SUITES)}")
        chosen = self.defaults(suite)
        for side, names in (models or {}).items():
            chosen[side].update(names)
        labels, default_template = label_sets()[label_set or DEFAULT_LABEL_SET[suite]]
        if question is None:
            question = DEFAULT_QUESTION[suite] if any(chosen[s]["vqa"] for s in SIDES) else ""
        return {"baseline": chosen["baseline"], "defended": chosen["defended"], "classes": classes or labels,
                "template": template or default_template, "question": question}

    def catalog(self) -> set[str]:
        """Every name this service offers (any suite, any family): what a request may always name."""
        names = set(list_presets()) | set(self.run_folders())
        root = weights_dir()
        if root is not None and root.is_dir():  # local copies of hub models: <dir>/<org>/<repo>
            for org in root.iterdir():
                if org.is_dir():
                    names |= {f"hf-hub:{org.name}/{d.name}" for d in org.iterdir()
                              if d.is_dir() and ((d / "open_clip_config.json").is_file() or (d / "config.json").is_file())}
        return names

    def _catalog_roots(self) -> list[Path]:
        return [checkpoints_dir(), *self.model_dirs] + ([weights_dir()] if weights_dir() else [])

    # -- loading --
    def _stamp(self, name: str) -> Any:
        """Changes when the weights behind ``name`` change on disk (so retrained models reload)."""
        for folder in (Path(name), checkpoints_dir() / name):
            f = folder / "model.safetensors"
            if f.is_file():
                st = f.stat()
                return (str(f), st.st_mtime_ns, st.st_size)
        return None

    def model(self, name: str, progress: Callable[[float, str], None] | None = None):
        """The adapter for ``name``, loaded once and kept (LRU). A model that cannot be had (no network
        for a first download, a bad checkpoint) raises an :class:`InputError` that says how to fix it."""
        name = str(name)
        with self._lock:
            try:  # before anything touches the disk: a refused name learns nothing about the server
                with self.policy.loading(self._catalog_roots()):
                    self.policy.admit(name, self.catalog)
            except ModelRefused as e:
                raise InputError(str(e)) from None
            stamp = self._stamp(name)
            hit = self._models.get(name)
            if hit is not None and hit[1] == stamp:
                self._models.move_to_end(name)
                return hit[0]
            if progress is not None:
                first = is_pretrained(name)
                progress(0.0, f"loading {name}" + (" (the first use downloads its weights)" if first else ""))
            try:
                with self.policy.loading(self._catalog_roots()):
                    adapter = load(name, device=self.device)
            except FileNotFoundError as e:
                raise InputError(f"model {name!r}: {e}") from None
            # no network for a first download (the message says what to do); an unknown name, a checkpoint
            # of another architecture, a truncated file, a folder the policy refuses...
            except (ModelUnavailableError, ValueError) as e:
                raise InputError(str(e)) from None
            except Exception as e:  # noqa: BLE001 - a library failing on a strange folder: still one sentence
                log.exception("loading %s failed", name)
                first = str(e).splitlines()[0][:200] if str(e) else ""
                raise InputError(f"model {name[:80]!r} could not be loaded ({type(e).__name__}: {first})") from None
            adapter.eval()
            for p in adapter.parameters():  # the app never trains: no weight graphs (a third faster)
                p.requires_grad_(False)
            self._models[name] = (adapter, stamp)
            self._models.move_to_end(name)
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
            return adapter

    def family_model(self, name: str, family: str, progress: Callable[[float, str], None] | None = None):
        """:meth:`model`, refused with a clear message unless it is a ``family`` model."""
        adapter = self.model(name, progress)
        if adapter.family != family:
            raise InputError(f"{name} is a {adapter.family} model; it cannot be used as the {family} model")
        return adapter

    def precision_for(self, models: Sequence[Any]) -> str:
        """The autocast precision for a request on ``models`` (resolves ``auto``, see the class doc)."""
        if self.precision != "auto":
            return self.precision
        big = any(sum(p.numel() for p in m.parameters()) >= AUTO_LOW_PRECISION_MIN_PARAMS for m in models if m)
        return resolve_precision("auto", self.device) if big else "fp32"

    def _model_key(self, name: str) -> tuple:
        return (name, self._stamp(name))

    # -- one inspection --
    def inspect(self, image: Any, request: InspectRequest,
                progress: Callable[[float, str], None] | None = None,
                cancelled: Callable[[], bool] | None = None) -> Inspection:
        """Run one inspection of ``image`` (path, bytes, PIL image or array). Raises
        :class:`InputError` (or :class:`~vlm_inspect.images.ImageError`) for a person's mistake, and
        :class:`Cancelled` between two attack steps once ``cancelled()`` is true (the client has gone)."""
        req = dataclasses.replace(request).validate()
        img = load_image(image)
        t0 = time.perf_counter()
        with self._lock, contextlib.ExitStack() as stack:
            sides = {s: {f: (self.family_model(n, f, progress) if n else None) for f, n in getattr(req, s).items()}
                     for s in SIDES}
            precision = self.precision_for([m for side in sides.values() for m in side.values()])
            generation = decoding_precision(self.precision, precision, self.device)
            stack.enter_context(autocast(self.device, precision, decoding=generation))
            warnings = image_warnings(img) + self._weights_warnings(sides) \
                + self._vocabulary_warnings(req, sides)
            if req.target == "embedding" and not (req.attack == "pgd" and req.random_start):
                warnings.append("the embedding attack needs PGD with a random start: at the clean image its "
                                "gradient is zero, so FGSM and BIM leave the image unchanged")
            digest = image_digest(img)
            n_attacks = sum(1 for s in SIDES if sides[s][TARGET_FAMILY[req.target]] is not None)
            done = [0]

            def step_progress(step: int, steps: int, loss: float) -> None:
                if cancelled is not None and cancelled():
                    raise Cancelled(f"the client left; the inspection stopped after attack step {step} of {steps}")
                if progress is not None:
                    progress((done[0] * steps + step) / max(1, n_attacks * steps),
                             f"attack step {step}/{steps}")

            report_models: dict[str, Any] = {}
            images: dict[str, np.ndarray] = {}
            perturbation: dict[str, dict[str, float]] = {}
            clean_display = None
            texts = TextBatch()  # captions and answers of this request, generated together at the end
            rows: list[tuple[str, str, Any, Any, dict[str, Any], dict[str, Any] | None]] = []
            for side in SIDES:
                side_models = sides[side]
                clean = {f: self._clean_outputs(m, img, digest, req, texts)
                         for f, m in side_models.items() if m is not None}
                attacked = side_models[TARGET_FAMILY[req.target]]
                adv_px = None
                if attacked is not None:
                    if req.target in ("caption", "vqa"):  # the objective needs the clean caption / answer now
                        self._generate(texts, clean_only=True)
                    px = self._pixels(attacked, img)
                    if clean_display is None:
                        clean_display = pixels_to_uint8(px)
                    atk = make_attack(req, px[0].numel())
                    res = atk(px, self._objective(attacked, req, clean[attacked.family], px),
                              targeted=bool(req.target_text), generator=torch.Generator().manual_seed(req.seed),
                              callback=step_progress)
                    done[0] += 1
                    adv_px = res.adv
                    perturbation[side] = {"linf": float(res.delta.abs().max()),
                                          "l2": float(res.delta.flatten().norm()),
                                          "budget": atk.eps, "step_size": atk.alpha, "model": attacked.name}
                    images[f"adversarial/{side}"] = _display(pixels_to_uint8(res.adv))
                    images[f"perturbation/{side}"] = _display(amplify(res.delta))
                for fam, m in side_models.items():
                    if m is None:
                        continue
                    if clean_display is None:
                        clean_display = pixels_to_uint8(self._pixels(m, img))
                    adv = None
                    if adv_px is not None:
                        adv = self._adv_outputs(m, _resize(adv_px, m.image_size), clean[fam], req, texts)
                    rows.append((side, fam, m, attacked, clean[fam], adv))
            if progress is not None and texts:
                progress(1.0, "captions and answers")
            self._generate(texts)
            for side, fam, m, attacked, clean_out, adv in rows:
                key = m.name if m.name not in report_models else f"{m.name} ({side})"
                entry = {"role": side, "family": fam, "attacked": m is attacked,
                         "clean": {k: v for k, v in clean_out.items() if not k.startswith("_")}}
                if getattr(m, "description", None):  # a clip-family model that is not CLIP says what it is
                    entry["about"] = m.description
                if m.spec.get("tokenizer", {}).get("kind") == SHAPES_TOKENIZER:  # a shapes-world vocabulary
                    entry["knows_only"] = "the shapes world"
                if fam == "clip":
                    images[f"heatmap/{side}/clean"] = clean_out["_overlay"]
                if adv is not None:
                    if fam == "clip":
                        images[f"heatmap/{side}/adversarial"] = adv.pop("_overlay")
                    entry["adversarial"] = adv
                report_models[key] = entry
            images["clean"] = _display(clean_display)
            report = {
                "version": __version__,
                "image": {"sha256_16": digest, "width": img.width, "height": img.height,
                          "kind": "shapes" if is_shapes_scene(img) else "photo"},
                "attack": req.attack_config(),
                "perturbation": {"linf": max((p["linf"] for p in perturbation.values()), default=0.0),
                                 "l2": max((p["l2"] for p in perturbation.values()), default=0.0),
                                 "sides": perturbation},
                "classes": req.classes, "template": req.template, "question": req.question or None,
                "heatmap": req.heatmap,
                "selection": {s: getattr(req, s) for s in SIDES},
                "models": report_models,
                "warnings": warnings,
                "runtime": {"device": self.device, "precision": precision, "generation_precision": generation},
                "seconds": round(time.perf_counter() - t0, 3),
            }
            report["verdicts"] = {side: v for side in SIDES if (v := side_verdict(report, side)) is not None}
            return Inspection(report=report, images=images, warnings=warnings)

    def _pixels(self, model, img) -> torch.Tensor:
        return pil_to_pixels(resize_center_crop(img, model.image_size)).to(self.device)

    @staticmethod
    def _weights_warnings(sides) -> list[str]:
        """A model on random weights (its trained checkpoint is missing) must say so: its outputs mean nothing."""
        names = dict.fromkeys(m.name for side in sides.values() for m in side.values()
                              if m is not None and getattr(m, "weights", None) == "random")
        return [f"{n} runs on random weights: no trained checkpoint was found for it (checkpoints/ is missing "
                "or incomplete), so its outputs mean nothing" for n in names]

    def _vocabulary_warnings(self, req: InspectRequest, sides) -> list[str]:
        out: list[str] = []
        for side in SIDES:
            for fam, texts in (("clip", req.prompts + ([req.target_text] if req.target == "zero-shot" else [])),
                               ("captioner", [req.target_text] if req.target == "caption" else []),
                               ("vqa", [req.question] + ([req.target_text] if req.target == "vqa" else []))):
                m = sides[side].get(fam)
                if m is None or not texts:
                    continue
                words = sorted({w for t in texts if t for w in m.unknown_words(t)})
                if words:
                    msg = f"{m.name} does not know the word(s) {', '.join(repr(w) for w in words)}: its answers about them mean little"
                    if msg not in out:
                        out.append(msg)
        return out

    def _class_features(self, model, prompts: list[str]) -> torch.Tensor:
        """(C, D) text features of the class prompts, encoded once per model and prompt list."""
        key = (self._model_key(model.name), tuple(prompts))
        hit = self._text.get(key)
        if hit is None:
            with torch.no_grad():
                hit = self._text[key] = model.encode_text(prompts).float()
            while len(self._text) > 32:
                self._text.pop(next(iter(self._text)))
        return hit

    def _clip_view(self, model, px: torch.Tensor, req: InspectRequest, top: int | None = None):
        """Zero-shot probabilities (C,), the heatmap (H, W) for class ``top`` (default: the top-1) and the
        model's notes for the report (e.g. a ConSE model's ImageNet classes). The text-guided attention
        map and the notes come from the same forward pass as the probabilities."""
        text = self._class_features(model, req.prompts)
        with torch.no_grad():
            tokens, notes = model.tokens_and_notes(px)
            tokens = tokens.float()
        # the small products after the encoder run in fp32 even under autocast: exact probabilities
        with torch.no_grad(), torch.autocast(torch.device(self.device).type, enabled=False):
            probs = model.logits(F.normalize(tokens[:, 0], dim=-1), text).softmax(-1)[0]
            top = int(probs.argmax()) if top is None else top
            if req.heatmap == "attention":
                heat = model.attention_map(tokens, text[top:top + 1], tuple(px.shape[-2:]))[0].float()
                return probs, top, heat, notes
        return probs, top, grad_cam(model, px, req.prompts[top])[0].float(), notes

    def _clean_outputs(self, model, img, digest: str, req: InspectRequest,
                       texts: "TextBatch | None" = None) -> dict[str, Any]:
        """The model's outputs on the clean image, cached. A caption or answer is queued in ``texts``
        (filled in, and cached, by :meth:`_generate`); without ``texts`` it is generated at once."""
        kind = torch.device(self.device).type  # the precision the outputs are computed at is part of the key
        precision = str(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else "fp32"
        key = (self._model_key(model.name), digest, model.family, tuple(req.prompts) if model.family == "clip" else (),
               req.question if model.family == "vqa" else "", req.heatmap if model.family == "clip" else "", req.top_k,
               precision)
        hit = self._clean.get(key)
        if hit is not None:
            self._clean.move_to_end(key)
            return hit
        if texts is not None and key in texts.pending:  # the other side's, same model: queued once
            return texts.pending[key]
        px = self._pixels(model, img)
        out: dict[str, Any] = {}
        if model.family == "clip":
            probs, top, heat, notes = self._clip_view(model, px, req)
            out["zero_shot"] = _top_k(probs, req.classes, req.top_k)
            out["attention_text"] = req.prompts[top]
            out["_probs"], out["_top"], out["_map"] = probs, top, heat
            out["_overlay"] = overlay(_display(pixels_to_uint8(px)), heat)
            out.update(notes)
            self._cache_clean(key, out)
            return out
        out.update({"question": req.question} if model.family == "vqa" else {})
        queue = TextBatch() if texts is None else texts
        queue.add(model, px, req.question, out, key)
        if texts is None:
            self._generate(queue)
        return out

    def _cache_clean(self, key: tuple, out: dict[str, Any]) -> None:
        self._clean[key] = out
        while len(self._clean) > 64:
            self._clean.popitem(last=False)

    def _generate(self, texts: "TextBatch", clean_only: bool = False) -> None:
        """Generate the queued captions and answers (one batched call per model; with ``clean_only`` those
        of the clean image) and cache the clean ones, now complete."""
        for key, out in texts.run(clean_only):
            self._cache_clean(key, out)

    def _objective(self, model, req: InspectRequest, clean: dict[str, Any], px: torch.Tensor):
        t = req.target_text
        if req.target == "zero-shot":
            label = req.classes.index(t) if t else clean["_top"]
            return zero_shot_ce(model, req.prompts, [label], text_features=self._class_features(model, req.prompts))
        if req.target == "caption":
            return caption_nll(model, [t or clean["caption"]])
        if req.target == "vqa":
            return answer_nll(model, [req.question], [t or clean["answer"]])
        return embedding_cosine(model, px)

    def _adv_outputs(self, model, adv: torch.Tensor, clean: dict[str, Any], req: InspectRequest,
                     texts: "TextBatch") -> dict[str, Any]:
        """The model's outputs on the adversarial image; a caption or answer is queued in ``texts``."""
        out: dict[str, Any] = {}
        if model.family == "clip":
            top = clean["_top"]
            probs, _, adv_map, notes = self._clip_view(model, adv, req, top=top)  # the map for the clean top-1's text
            out["zero_shot"] = _top_k(probs, req.classes, req.top_k)
            out["confidence_change"] = round(float(probs[top] - clean["_probs"][top]), 6)
            out["top1_changed"] = int(probs.argmax()) != top
            out["attention_shift"] = round(float(attention_shift(clean["_map"][None], adv_map[None])[0]), 6)
            out["_overlay"] = overlay(_display(pixels_to_uint8(adv)), adv_map)
            out.update(notes)
        else:
            texts.add(model, adv, req.question, out)
        return out

    # -- robustness curve --
    def curve(self, image: Any, request: InspectRequest, eps_k: Sequence[float] = CURVE_EPS_K,
              progress: Callable[[float, str], None] | None = None,
              cancelled: Callable[[], bool] | None = None) -> dict[str, Any]:
        """The target task's metric against epsilon for the baseline and the defended model, one
        batched attack per side (the image repeated once per epsilon, each with its own budget; the
        step size follows the default rule 2.5 * eps / steps for every budget).

        Metric: probability of the clean top-1 (or target) class for zero-shot; per-token probability
        of the clean caption / answer (exp of minus the mean token NLL) for caption and VQA; cosine
        similarity to the clean image embedding for the embedding attack.
        """
        req = dataclasses.replace(request).validate()
        eps_k = [float(e) for e in eps_k]
        if not eps_k or any(not 0 <= e <= EPS_MAX_K for e in eps_k):
            raise InputError(f"curve budgets must be from 0 to {EPS_MAX_K} (k/255), got {eps_k}")
        img = load_image(image)
        digest = image_digest(img)
        family = TARGET_FAMILY[req.target]
        metric = {"zero-shot": "p(clean top-1 class)" if not req.target_text else "p(target class)",
                  "caption": "per-token p(clean caption)" if not req.target_text else "per-token p(target caption)",
                  "vqa": "per-token p(clean answer)" if not req.target_text else "per-token p(target answer)",
                  "embedding": "cos(adversarial, clean embedding)"}[req.target]
        out: dict[str, Any] = {"eps_k255": eps_k, "metric": metric, "target": req.target, "attack": req.attack_config(),
                               "series": {}}
        with self._lock, contextlib.ExitStack() as stack:
            names = [(s, getattr(req, s).get(family)) for s in SIDES]
            names = [(s, n) for s, n in names if n]
            models = [self.family_model(name, family) for _, name in names]
            precision = self.precision_for(models)
            out["runtime"] = {"device": self.device, "precision": precision}
            stack.enter_context(autocast(self.device, precision,
                                         decoding=decoding_precision(self.precision, precision, self.device)))
            for i, (side, name) in enumerate(names):
                m = models[i]
                clean = self._clean_outputs(m, img, digest, req)
                px1 = self._pixels(m, img)
                objective = self._objective(m, req, clean, px1)

                def batch_objective(n: int, objective=objective, m=m):
                    if req.target != "zero-shot":
                        return objective  # one caption / answer / clean embedding serves every image
                    return zero_shot_ce(m, req.prompts, objective.labels.repeat(n), text_features=objective.text_features)

                def cb(step, steps, loss, i=i):
                    if cancelled is not None and cancelled():
                        raise Cancelled(f"the client left; the curve stopped after attack step {step} of {steps}")
                    if progress is not None:
                        progress((i * steps + step) / (len(names) * steps), f"{side}: step {step}/{steps}")

                attacked = [e for e in eps_k if e > 0]  # budget 0 is the clean image: no attack needed
                loss_of: dict[float, float] = {}
                with torch.no_grad():
                    if len(attacked) < len(eps_k):
                        loss_of[0.0] = float(batch_objective(1)(px1).float()[0])
                if attacked:
                    obj = batch_objective(len(attacked))
                    res = make_attack(req, px1[0].numel(), eps_k=attacked)(
                        px1.repeat(len(attacked), 1, 1, 1), obj, targeted=bool(req.target_text),
                        generator=torch.Generator().manual_seed(req.seed), callback=cb)
                    with torch.no_grad():
                        loss_of.update(zip(attacked, obj(res.adv).float().tolist()))
                loss = torch.tensor([loss_of[e] for e in eps_k])
                # CE of one label = -log p(label); mean token NLL -> per-token probability; 1 - cos -> cos
                values = 1.0 - loss if req.target == "embedding" else torch.exp(-loss)
                out["series"][side] = {"model": name, "values": [round(float(v), 6) for v in values]}
        return out


def side_verdict(report: dict[str, Any], side: str) -> dict[str, Any] | None:
    """Did the attack work on this side? ``{"fooled": bool, "text": "fooled: cat → astronaut"}``, read
    from the attacked model's output: untargeted, fooled when its top-1 class, caption or answer
    changed (for the embedding attack: the side's zero-shot top-1); targeted, when it became the target."""
    entries = {e["family"]: e for e in report["models"].values() if e["role"] == side}
    target = report["attack"]["target"]
    family = TARGET_FAMILY[target] if TARGET_FAMILY[target] in entries else None
    e = entries.get(family) if family else None
    if e is None or "adversarial" not in e:
        return None
    field = {"clip": None, "captioner": "caption", "vqa": "answer"}[family]
    before = e["clean"]["zero_shot"]["labels"][0] if field is None else e["clean"][field]
    after = e["adversarial"]["zero_shot"]["labels"][0] if field is None else e["adversarial"][field]
    wanted = report["attack"].get("target_text")
    fooled = after == wanted if wanted else after != before
    quote = (lambda t: t) if field is None else (lambda t: f"“{t}”")
    if fooled:
        text = f"fooled: {quote(before)} → {quote(after)}"
    else:
        text = f"held: {quote(after)}" + (f" (target “{wanted}” not reached)" if wanted else "")
    return {"fooled": fooled, "text": text, "model": next(n for n, x in report["models"].items() if x is e)}


def _resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    if pixels.shape[-1] == size and pixels.shape[-2] == size:
        return pixels
    return F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).clamp(0, 1)


def _top_k(probs: torch.Tensor, labels: list[str], k: int) -> dict[str, list]:
    vals, idx = probs.topk(min(k, len(labels)))
    return {"labels": [labels[int(i)] for i in idx], "probs": [round(float(v), 6) for v in vals]}


__all__ = ["Cancelled", "InputError", "ImageError", "InspectRequest", "InspectService", "Inspection", "label_sets",
           "parse_classes", "make_attack", "TARGETS", "HEATMAPS", "SIDES"]
