"""One inspection and one robustness curve, step by step (:func:`run_inspection`, :func:`run_curve`).

One inspection, for each *side* (baseline, defended):

1. the clean image goes through every selected model of the side (CLIP zero-shot top-k and its
   heatmap, captioner caption, VQA answer); these clean results are cached, so moving the epsilon
   slider only recomputes the adversarial half;
2. the model of the side that the attack targets (the family the objective ``inspects``: CLIP for
   zero-shot and the embedding attack, the captioner for captions, the VQA model for answers) is
   attacked **white-box**: each side gets its own adversarial image, crafted against its own model, so
   a defended model is never judged on a perturbation made for another model;
3. every model of the side then sees that side's adversarial image (the other tasks show how the
   attack transfers across tasks of one side).

Captions and answers are generated last, all those of one model in one batched call (clean and
adversarial images, both sides when they share the model; :class:`~.outputs.TextBatch`).

Untargeted attacks push the model away from its own clean output (its top-1 class, its clean caption,
its clean answer); with a target they pull it towards the target class, caption or answer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .. import __version__
from ..data.scene_kind import is_shapes_scene
from ..attacks import is_bounded, taking
from ..attacks.base import SettingError
from ..images import image_warnings, load_image, pixels_to_uint8, resize_pixels
from ..models.tokenizers import TOKENIZER_KIND as SHAPES_TOKENIZER
from ..objectives import OBJECTIVES, Ensemble
from ..runtime import autocast, decoding_precision
from .outputs import ClipOutputs, TextBatch, amplify, display, image_digest
from .request import CURVE_EPS_K, EPS_MAX_K, SIDES, Cancelled, InputError, InspectRequest, make_attack, target_family
from . import transfer as T
from .summary import side_verdict

Progress = Callable[[float, str], None]


@dataclass
class Inspection:
    """What one inspection produced: a JSON-able ``report`` (docs/ARCHITECTURE.md, "The report") and
    the images to show.

    ``images`` keys: ``clean``; ``adversarial/<side>``, ``perturbation/<side>``; and for CLIP models
    ``heatmap/<side>/clean``, ``heatmap/<side>/adversarial``; all HxWx3 uint8 at display size; with the
    patch attack ``patch/<side>``, the side's patch at its own size (to save and apply again).
    """

    report: dict[str, Any]
    images: dict[str, np.ndarray]
    warnings: list[str]


def weights_warnings(sides) -> list[str]:
    """A model on random weights (its trained checkpoint is missing) must say so: its outputs mean nothing."""
    names = dict.fromkeys(m.name for side in sides.values() for m in side.values()
                          if m is not None and getattr(m, "weights", None) == "random")
    return [f"{n} runs on random weights: no trained checkpoint was found for it (checkpoints/ is missing "
            "or incomplete), so its outputs mean nothing" for n in names]


def vocabulary_warnings(req: InspectRequest, sides) -> list[str]:
    """Words of the request a model's closed vocabulary does not know (its answers about them mean little)."""
    out: list[str] = []
    family = target_family(req.target)
    for side in SIDES:
        for fam, texts in (("clip", req.prompts + ([req.target_text] if family == "clip" else [])),
                           ("captioner", [req.target_text] if family == "captioner" else []),
                           ("vqa", [req.question] + ([req.target_text] if family == "vqa" else []))):
            m = sides[side].get(fam)
            if m is None or not texts:
                continue
            words = sorted({w for t in texts if t for w in m.unknown_words(t)})
            if words:
                msg = f"{m.name} does not know the word(s) {', '.join(repr(w) for w in words)}: its answers about them mean little"
                if msg not in out:
                    out.append(msg)
    return out


def _step_progress(n_attacks: int, done: list[int], progress: Progress | None, cancelled):
    def step(step: int, steps: int, loss: float) -> None:
        if cancelled is not None and cancelled():
            raise Cancelled(f"the client left; the inspection stopped after attack step {step} of {steps}")
        if progress is not None:
            progress((done[0] * steps + step) / max(1, n_attacks * steps), f"attack step {step}/{steps}")
    return step


# ``service`` is the InspectService (core.py) that calls these: its models, views, lock and precision.
def run_inspection(service: Any, image: Any, request: InspectRequest, progress: Progress | None = None,
                   cancelled: Callable[[], bool] | None = None) -> Inspection:
    """:meth:`InspectService.inspect`."""
    req = dataclasses.replace(request).validate()
    img = load_image(image)
    t0 = time.perf_counter()
    views = service.views
    family = target_family(req.target)
    with service.lock, contextlib.ExitStack() as stack:
        sides = {s: {f: (service.family_model(n, f, progress) if n else None) for f, n in getattr(req, s).items()}
                 for s in SIDES}
        precision = service.precision_for([m for side in sides.values() for m in side.values()])
        generation = decoding_precision(service.precision, precision, service.device)
        stack.enter_context(autocast(service.device, precision, decoding=generation))
        warnings = image_warnings(img) + weights_warnings(sides) + vocabulary_warnings(req, sides)
        attack = make_attack(req, 1)
        if OBJECTIVES.meta(req.target).get("needs_random_start") and not attack.random_start and is_bounded(req.attack):
            warnings.append(f"the {req.target} attack needs an attack with a random start ({taking('random_start')}): "
                            f"at the clean image its gradient is zero, so {req.attack.upper()} without one leaves the "
                            "image unchanged")
        digest = image_digest(img)
        done = [0]
        attacked = {s: sides[s][family] for s in SIDES}  # each side's model of the attacked family
        sources = (["ensemble"] if req.crafted_on == "ensemble" and any(attacked.values())
                   else [s for s in SIDES if attacked[s] is not None])
        step_progress = _step_progress(len(sources), done, progress, cancelled)
        images: dict[str, np.ndarray] = {}
        perturbation: dict[str, dict[str, Any]] = {}
        clean_display = None
        texts = TextBatch()  # captions and answers of this request, generated together at the end
        clean = {s: {f: views.clean(m, img, digest, req, texts, f) for f, m in sides[s].items() if m is not None}
                 for s in SIDES}
        if sources and family != "clip":
            views.generate(texts, clean_only=True)  # the objectives need the clean captions and answers now
        # source -> (attack result, attack, models crafted on, their names)
        crafted: dict[str, tuple[Any, Any, list, str]] = {}
        pixels: dict[int, torch.Tensor] = {}  # the image at each model's input size, converted once
        for src in sources:
            members = [s for s in SIDES if attacked[s] is not None] if src == "ensemble" else [src]
            models = [attacked[s] for s in members]
            for m in models:
                pixels.setdefault(m.image_size, views.pixels(m, img))
            twin = next((c for c in crafted.values() if len(c[2]) == 1 and len(models) == 1 and c[2][0] is models[0]), None)
            if twin is not None:  # both sides chose the same model: the same seeded attack, run once
                crafted[src] = twin
                done[0] += 1
                continue
            # craft at the largest input size; each model of an ensemble sees the image at its own
            px = pixels[max(m.image_size for m in models)]
            if clean_display is None:
                clean_display = pixels_to_uint8(px)
            parts = [views.objective(m, req, clean[s][family], pixels[m.image_size]) for s, m in zip(members, models)]
            objective = parts[0] if len(parts) == 1 else Ensemble(parts, [m.image_size for m in models])
            atk = make_attack(req, px[0].numel())
            try:
                res = atk(px, objective, targeted=bool(req.target_text),
                          generator=torch.Generator().manual_seed(req.seed), callback=step_progress)
            except SettingError as e:  # e.g. a word too long for this model's input size
                raise InputError(str(e)) from None
            done[0] += 1
            crafted[src] = (res, atk, models, " + ".join(dict.fromkeys(m.name for m in models)))
        # the source of the image each side shows
        shown = {s: ("ensemble" if req.crafted_on == "ensemble" else s if req.crafted_on == "own" else _other(s))
                 for s in SIDES}
        seen: dict[tuple[str, str, str], Any] = {}  # (source, side, family) -> outputs on that image

        def view(src: str, side: str, fam: str):
            key = (src, side, fam)
            if key not in seen:
                m = sides[side][fam]
                seen[key] = views.adversarial(m, resize_pixels(crafted[src][0].adv, m.image_size), clean[side][fam],
                                              req, texts, fam)
            return seen[key]

        rows: list[tuple[str, str, Any, bool, Any, Any]] = []
        for side in SIDES:
            src = shown[side] if shown[side] in crafted else None
            if src is not None:
                res, atk, _, names = crafted[src]
                perturbation[side] = {"linf": float(res.delta.abs().max()), "l2": float(res.delta.flatten().norm()),
                                      "budget": atk.eps, "step_size": atk.alpha, "model": names, "crafted_on": src}
                if not is_bounded(req.attack):  # no ball: where the region went and how much of the image it covers
                    perturbation[side].update(budget=None, step_size=None, position=res.info["position"][0],
                                              area=round(float(res.info["region"].float().mean()), 4))
                    if "patch" in res.info:  # the patch itself, at its size, to save and apply again
                        patch = res.info["patch"]  # (3, s, s) universal or given; (B, 3, s, s) per image
                        images[f"patch/{side}"] = pixels_to_uint8(patch if patch.ndim == 3 else patch[0])
                images[f"adversarial/{side}"] = display(pixels_to_uint8(res.adv))
                images[f"perturbation/{side}"] = display(amplify(res.delta))
            for fam, m in sides[side].items():
                if m is None:
                    continue
                if clean_display is None:
                    clean_display = pixels_to_uint8(views.pixels(m, img))
                # attacked: the model of the attacked family (a LLaVA in both text boxes is attacked as one of them)
                white_box = src is not None and fam == family and any(m is c for c in crafted[src][2])
                rows.append((side, fam, m, white_box, clean[side][fam], view(src, side, fam) if src else None))
        cells = []
        for src in crafted:
            for side in SIDES:
                if attacked[side] is None:
                    continue
                shift = view(src, side, "clip") if sides[side].get("clip") is not None else None
                cells.append((src, side, view(src, side, family), shift))
        if progress is not None and texts:
            progress(1.0, "captions and answers")
        views.generate(texts)
        report_models = _model_entries(rows, images)
        images["clean"] = display(clean_display)
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
            "runtime": {"device": service.device, "precision": precision, "generation_precision": generation},
            "seconds": round(time.perf_counter() - t0, 3),
        }
        report["verdicts"] = {side: v for side in SIDES if (v := side_verdict(report, side)) is not None}
        report["transfer"] = {
            "crafted_on": req.crafted_on, "task": req.target, "family": family, "rows": list(crafted),
            "columns": [s for s in SIDES if attacked[s] is not None],
            "cells": [T.cell(src, side, attacked[side].name, crafted[src][3], family, clean[side][family], out, shift,
                             req) for src, side, out, shift in cells]}
        return Inspection(report=report, images=images, warnings=warnings)


def _other(side: str) -> str:
    return SIDES[1 - SIDES.index(side)]


def _model_entries(rows, images: dict[str, np.ndarray]) -> dict[str, Any]:
    """The report's ``models`` entries (and the heatmap images) from each model's clean and adversarial outputs."""
    entries: dict[str, Any] = {}
    for side, fam, m, white_box, clean_out, adv in rows:
        key = m.name
        if key in entries:  # the same model on both sides, or in two families of one side (a LLaVA)
            key = f"{m.name} ({fam})" if entries[key]["role"] == side else f"{m.name} ({side})"
        if key in entries:
            key = f"{m.name} ({side}, {fam})"
        entry = {"role": side, "family": fam, "attacked": white_box, "clean": clean_out.public()}
        if getattr(m, "description", None):  # a clip-family model that is not CLIP says what it is
            entry["about"] = m.description
        if m.spec.get("tokenizer", {}).get("kind") == SHAPES_TOKENIZER:  # a shapes-world vocabulary
            entry["knows_only"] = "the shapes world"
        if isinstance(clean_out, ClipOutputs):
            images[f"heatmap/{side}/clean"] = clean_out.overlay
        if adv is not None:
            if isinstance(adv, ClipOutputs):
                images[f"heatmap/{side}/adversarial"] = adv.overlay
            entry["adversarial"] = adv.public()
        entries[key] = entry
    return entries


def run_curve(service: Any, image: Any, request: InspectRequest, eps_k: Sequence[float] = CURVE_EPS_K,
              progress: Progress | None = None, cancelled: Callable[[], bool] | None = None) -> dict[str, Any]:
    """:meth:`InspectService.curve`."""
    req = dataclasses.replace(request).validate()
    eps_k = [float(e) for e in eps_k]
    if not eps_k or any(not 0 <= e <= EPS_MAX_K for e in eps_k):
        raise InputError(f"curve budgets must be from 0 to {EPS_MAX_K} (k/255), got {eps_k}")
    img = load_image(image)
    digest = image_digest(img)
    family = target_family(req.target)
    meta = OBJECTIVES.meta(req.target)
    out: dict[str, Any] = {"eps_k255": eps_k, "metric": meta["target_metric"] if req.target_text else meta["metric"],
                           "target": req.target, "attack": req.attack_config(), "series": {}}
    if not is_bounded(req.attack):
        raise InputError(f"the robustness curve sweeps epsilon and the {req.attack} attack has no epsilon: choose an "
                         "epsilon attack (PGD, APGD, ...) for the curve")
    if req.crafted_on != "own":  # a curve is one batched run per side against its own model
        out["note"] = "the curve attacks each side's own model (white-box), whatever the image is crafted on"
    views = service.views
    with service.lock, contextlib.ExitStack() as stack:
        names = [(s, n) for s, n in ((s, getattr(req, s).get(family)) for s in SIDES) if n]
        models = [service.family_model(name, family) for _, name in names]
        precision = service.precision_for(models)
        out["runtime"] = {"device": service.device, "precision": precision}
        stack.enter_context(autocast(service.device, precision,
                                     decoding=decoding_precision(service.precision, precision, service.device)))
        for i, (side, name) in enumerate(names):
            m = models[i]
            px1 = views.pixels(m, img)
            objective = views.objective(m, req, views.clean(m, img, digest, req, family=family), px1)

            def cb(step, steps, loss, i=i, side=side):
                if cancelled is not None and cancelled():
                    raise Cancelled(f"the client left; the curve stopped after attack step {step} of {steps}")
                if progress is not None:
                    progress((i * steps + step) / (len(names) * steps), f"{side}: step {step}/{steps}")

            attacked = [e for e in eps_k if e > 0]  # budget 0 is the clean image: no attack needed
            loss_of: dict[float, float] = {}
            with torch.no_grad():
                if len(attacked) < len(eps_k):
                    loss_of[0.0] = float(objective.repeat(1)(px1).float()[0])
            if attacked:
                obj = objective.repeat(len(attacked))
                res = make_attack(req, px1[0].numel(), eps_k=attacked)(
                    px1.repeat(len(attacked), 1, 1, 1), obj, targeted=bool(req.target_text),
                    generator=torch.Generator().manual_seed(req.seed), callback=cb)
                with torch.no_grad():
                    loss_of.update(zip(attacked, obj(res.adv).float().tolist()))
            # CE of one label = -log p(label); mean token NLL -> per-token probability; 1 - cos -> cos
            values = objective.metric(torch.tensor([loss_of[e] for e in eps_k]))
            out["series"][side] = {"model": name, "values": [round(float(v), 6) for v in values]}
    return out
