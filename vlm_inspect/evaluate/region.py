"""The attacks without an epsilon in ``evaluate`` (``--attack typographic``, ``--attack patch``): what a
written word or a sticker does to zero-shot accuracy and to captions.

- **Typographic**: each image gets a wrong word. Zero-shot: the name of a wrong class, drawn per image
  from the seed (never its own); the rows are the accuracy on the written images (``top1``) and the
  share of images now classified as the written class (``reads``: the model read instead of looking).
  Captions: a shape word the reference captions do not use (or ``--word``); the rows are BLEU-4 and
  CIDEr of the captions of the written images and the share of captions that mention the word
  (``mentions``), next to the same share on the clean images and the share that mention another
  unused shape word, not written (``mentions_decoy``: a caption that adds some new shape names the
  written one by chance this often). The position is the attack's (``auto``:
  the worst cell of a 3x3 grid for the true label's loss).
- **Patch**: per image (``patch``: a patch optimised on each image) or universal (``--universal``: one
  patch optimised over ``--fit-samples`` images of the *train* split, placed at random while it learns,
  then stuck at a random place on each test image, as Brown et al. evaluate it). The universal patch of
  each model is written as a PNG beside ``--out`` and can be applied again (the page's patch image,
  ``inspect --patch``).

One process (these rows are not sharded under ``torchrun``); VQA models are not covered.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..attacks import ATTACKS
from ..attacks.patch import save_patch
from ..data.shapes import SHAPES
from ..data.sources import open_data
from ..images import to_pixels
from ..models import load
from ..objectives import caption_nll, zero_shot_ce
from .metrics import caption_scores
from .run import _chunk_seed, _chunks, default_data

log = logging.getLogger("vlm_inspect.evaluate")


@dataclass
class RegionSpec:
    """One attack without an epsilon, as ``evaluate`` runs it."""

    name: str                                            # "typographic" or "patch"
    settings: dict[str, Any] = field(default_factory=dict)  # the attack's own (text_size, patch_side, steps, ...)
    word: str = ""                                       # typographic: one word for every image; "" = per image
    universal: bool = False                              # patch: one patch for all images
    fit: int = 64                                        # patch: train images a universal patch is fitted on

    @property
    def label(self) -> str:
        if self.name == "patch":
            return f"{'universal ' if self.universal else ''}patch {self.settings.get('patch_side', 0.2):g}"
        return "typographic"

    def build(self, **extra):
        return ATTACKS.build(self.name, **{**self.settings, **extra})

    def describe(self) -> dict[str, Any]:
        d = {"attack": self.label, **self.build(word=self.word or "x").config()}
        d.pop("name", None)
        if self.name == "typographic":
            d["word"] = self.word or "a wrong class per image"
        if self.name == "patch":
            d["universal"] = self.universal
        if self.universal:  # fitted moving at random, applied at random places (Brown et al.)
            d.update(position="random", fit_samples=self.fit)
        return d


def _mentions(caption: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word.lower())}s?\b", caption.lower()) is not None


def evaluate_region(models: Sequence[str], data: Sequence[str] | None, specs: Sequence[RegionSpec], n: int,
                    batch_size: int = 100, seed: int = 0, device: str = "cpu", precision: str = "fp32",
                    out: str | Path | None = None) -> list[dict[str, Any]]:
    """Rows ``{model, data, attack, metric, value, n}`` (``attack`` "none" for the clean metric)."""
    from ..runtime import autocast, decoding_precision, resolve_device, resolve_precision

    device = resolve_device(device)
    requested, precision = precision, resolve_precision(precision, device)
    rows: list[dict[str, Any]] = []
    with autocast(device, precision, decoding=decoding_precision(requested, precision, device)):
        for name in models:
            model = load(name, device=device).eval()
            if model.family == "vqa":
                raise ValueError(f"{name} is a VQA model: the typographic and patch rows cover zero-shot "
                                 "classification and captions")
            for spec_data in data or default_data(model.family):
                rows += _one(model, spec_data, specs, n, batch_size, seed, out)
    return rows


def _one(model, spec_data: str, specs, n: int, batch_size: int, seed: int, out) -> list[dict[str, Any]]:
    ds = open_data(spec_data, "test", seed=seed, length=n, image_size=model.image_size)
    n = min(n, len(ds))
    items = [ds[i] for i in range(n)]
    pixels = to_pixels([r["image"] for r in items], model.image_size).to(model.device)
    rows: list[dict[str, Any]] = []
    pick = torch.Generator().manual_seed(seed)

    def row(attack: str, metric: str, value: float) -> None:
        rows.append({"model": model.name, "data": spec_data, "attack": attack, "metric": metric,
                     "value": round(float(value), 4), "n": n, "region": True})

    if model.family == "clip":
        labels = torch.tensor([r["label"] for r in items])
        classes = list(ds.classes)
        with torch.no_grad():
            text = model.encode_text(ds.prompts)

        def objective(idx, lab=None):
            return zero_shot_ce(model, ds.prompts, (labels if lab is None else lab)[idx], text_features=text)

        def predict(x):
            with torch.no_grad():
                return torch.cat([model.logits(model.encode_image(x[i:i + batch_size]), text).argmax(-1).cpu()
                                  for i in range(0, len(x), batch_size)])

        row("none", "top1", (predict(pixels) == labels).float().mean())
        # a wrong class per image: its own label shifted by 1 .. C-1
        wrong = (labels + 1 + torch.randint(0, len(classes) - 1, (n,), generator=pick)) % len(classes)
        for spec in specs:
            words = [spec.word] * n if spec.word else [classes[int(w)] for w in wrong]
            adv = _attack(model, spec, pixels, objective, words, spec_data, seed, out, batch_size,
                          fit_objective=lambda lab: objective(list(range(len(lab))), lab))
            pred = predict(adv)
            row(spec.label, "top1", (pred == labels).float().mean())
            if spec.name == "typographic" and (not spec.word or spec.word in classes):  # a class to read
                written = torch.tensor([classes.index(spec.word)] * n) if spec.word else wrong
                row(spec.label, "reads", (pred == written).float().mean())
        return rows
    refs = [r.get("captions") or [r["caption"]] for r in items]
    first = [r[0] for r in refs]  # the caption whose NLL is climbed

    def objective(idx, caps=None):
        return caption_nll(model, [(caps or first)[i] for i in idx])

    def generate(x):
        with torch.no_grad():
            return [c for i in range(0, len(x), batch_size) for c in model.generate(x[i:i + batch_size])]

    clean_caps = generate(pixels)
    for k, v in caption_scores(clean_caps, refs).items():
        if k in ("bleu4", "cider"):
            row("none", k, v)
    words, decoys = [], []
    for r in refs:  # a shape word none of the references uses, and another one (the decoy) to count by chance
        unused = [s for s in SHAPES if not any(_mentions(c, s) for c in r)] or list(SHAPES)
        words.append(unused[int(torch.randint(0, len(unused), (1,), generator=pick))])
        others = [s for s in unused if s != words[-1]] or [words[-1]]
        decoys.append(others[int(torch.randint(0, len(others), (1,), generator=pick))])
    for spec in specs:
        word_of = [spec.word] * n if spec.word else words
        adv = _attack(model, spec, pixels, objective, word_of, spec_data, seed, out, batch_size,
                      fit_objective=lambda caps: objective(list(range(len(caps))), caps))
        caps = generate(adv)
        scores = caption_scores(caps, refs)
        row(spec.label, "bleu4", scores["bleu4"])
        row(spec.label, "cider", scores["cider"])
        if spec.name == "typographic":
            row("none", "mentions", sum(_mentions(c, w) for c, w in zip(clean_caps, word_of)) / n)
            row(spec.label, "mentions", sum(_mentions(c, w) for c, w in zip(caps, word_of)) / n)
            if not spec.word:  # a caption that names some new shape names the written one by chance this often
                row(spec.label, "mentions_decoy", sum(_mentions(c, d) for c, d in zip(caps, decoys)) / n)
    return rows


def _attack(model, spec: RegionSpec, pixels: torch.Tensor, objective, words: list[str], spec_data: str, seed: int,
            out, batch_size: int, fit_objective) -> torch.Tensor:
    """The attacked images of one spec, ``batch_size`` at a time (a universal patch is fitted first);
    ``fit_objective(targets)`` is the objective of the train images a universal patch is fitted on."""
    adv = torch.empty_like(pixels)
    if spec.name == "typographic":
        for k, idx in enumerate(_chunks(len(pixels), batch_size)):
            atk = spec.build(word=[words[i] for i in idx])
            gen = torch.Generator().manual_seed(_chunk_seed(seed, 0, k))  # position "random" draws from it
            adv[idx] = atk(pixels[idx], objective(idx), generator=gen).adv
        return adv
    gen = torch.Generator(device=pixels.device)
    if not spec.universal:
        atk = spec.build()
        for k, idx in enumerate(_chunks(len(pixels), batch_size)):
            adv[idx] = atk(pixels[idx], objective(idx), generator=gen.manual_seed(_chunk_seed(seed, 0, k))).adv
        return adv
    patch = fit_universal(model, spec, spec_data, seed, fit_objective)
    if out is not None:
        path = Path(out)
        path = path.with_name(f"{path.stem}_{model.name.replace('/', '_')}_{spec_data.split(':')[-1]}_patch.png")
        save_patch(patch, path, spec.settings.get("patch_side", 0.2))
        log.info("wrote the universal patch of %s: %s", model.name, path)
    atk = spec.build(patch=patch, position="random")
    for k, idx in enumerate(_chunks(len(pixels), batch_size)):
        adv[idx] = atk(pixels[idx], objective(idx), generator=gen.manual_seed(_chunk_seed(seed, 0, k))).adv
    return adv


def fit_universal(model, spec: RegionSpec, spec_data: str, seed: int, fit_objective) -> torch.Tensor:
    """One patch optimised over ``spec.fit`` images of the train split (never the test images), moving at
    random while it learns."""
    ds = open_data(spec_data, "train", seed=seed + 1, length=spec.fit, image_size=model.image_size)
    items = [ds[i] for i in range(min(spec.fit, len(ds)))]
    px = to_pixels([r["image"] for r in items], model.image_size).to(model.device)
    target = (torch.tensor([r["label"] for r in items]) if model.family == "clip"
              else [(r.get("captions") or [r["caption"]])[0] for r in items])
    objective = fit_objective(target)
    res = spec.build(universal=True, position="random")(px, objective, generator=torch.Generator(
        device=px.device).manual_seed(_chunk_seed(seed, 1, 0)))
    return res.info["patch"]


def region_markdown(rows: list[dict[str, Any]], specs: Sequence[RegionSpec]) -> str:
    """One table per metric: the clean value and each attack's, per model and data set."""
    rows = [r for r in rows if r.get("region")]
    if not rows:
        return ""
    desc = "; ".join(", ".join(f"{k}={v}" for k, v in s.describe().items()) for s in specs)
    lines = [f"**attacks without an epsilon**: {desc}. Samples per data set: {rows[0]['n']}. top1: accuracy on the "
             "attacked images; reads: share classified as the written class; mentions: share of captions that "
             "contain the written word; mentions_decoy: share that contain another unused shape word, not written.", ""]
    for metric in dict.fromkeys(r["metric"] for r in rows):
        at = [r for r in rows if r["metric"] == metric]
        cols = list(dict.fromkeys("clean" if r["attack"] == "none" else r["attack"] for r in at))
        lines += [f"**{metric}**", "", "| model | data | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for model, data in dict.fromkeys((r["model"], r["data"]) for r in at):
            cell = {("clean" if r["attack"] == "none" else r["attack"]): r["value"] for r in at
                    if r["model"] == model and r["data"] == data}
            lines.append(f"| {model} | {data.removeprefix('shapes:')} | "
                         + " | ".join(f"{cell[c]:.3f}" if c in cell else "–" for c in cols) + " |")
        lines.append("")
    return "\n".join(lines)
