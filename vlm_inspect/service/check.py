"""The page's "check with AutoAttack": the zero-shot ensemble (:mod:`vlm_inspect.evaluate.autoattack`) on the
user's image, for each side's CLIP model, next to the attack the user chose.

For each side with a zero-shot model, against its clean top-1 class (a user's image has no ground truth):

1. the chosen attack, as the inspection runs it on the zero-shot objective (untargeted);
2. the ensemble at the request's budget and norm (APGD-CE, APGD-T, Square);

and the verdict: survives at ε, or broken (by which attack, at which step), with a warning when the chosen
attack said "survives" but the ensemble broke the model. The L2 radius is the inspection's
(``k/255 · √dim``, :func:`~.request.make_attack`).

Budgets: ``standard`` is the reference's (100 APGD steps, 9 target classes, 5000 Square queries: about a
minute per side on the embedded models when the image survives); ``quick`` (the page's default) cuts each
attack so a check of a robust image takes a few seconds (``docs/BENCHMARKS.md``). Every verdict names the
budget it was made with.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import torch

from ..attacks import is_bounded
from ..evaluate.autoattack import LABELS, LEFT_OUT, STANDARD, Budget, autoattack
from ..images import load_image
from ..objectives import ZeroShotCE
from ..runtime import autocast
from .request import SIDES, Cancelled, InputError, InspectRequest, make_attack

BUDGETS = {"quick": Budget(steps=20, targets=3, queries=100), "standard": STANDARD}
Progress = Callable[[float, str], None]


def run_check(service: Any, image: Any, request: InspectRequest, budget: str = "quick",
              progress: Progress | None = None, cancelled: Callable[[], bool] | None = None) -> dict[str, Any]:
    """:meth:`InspectService.check`: per side ``{model, clean_top1, survives, broken_by, broken_at,
    adversarial_top1, stages, flags, chosen: {attack, survives}, warning, seconds}``."""
    req = dataclasses.replace(request).validate()
    if budget not in BUDGETS:
        raise InputError(f"unknown AutoAttack budget {budget!r}; choose {' or '.join(BUDGETS)}")
    plan = BUDGETS[budget]
    if not is_bounded(req.attack):
        raise InputError(f"the AutoAttack check measures robustness inside an epsilon ball and the {req.attack} "
                         "attack has no epsilon: choose an epsilon attack (PGD, APGD, ...) to check")
    img = load_image(image)
    names = {s: getattr(req, s).get("clip") for s in SIDES}
    if not any(names.values()):
        raise InputError("the AutoAttack check attacks the zero-shot (CLIP) model: select one on either side")
    out: dict[str, Any] = {"eps_k255": req.eps_k, "norm": req.norm, "budget": budget, "settings": plan.describe(),
                           "left_out": LEFT_OUT, "sides": {}}
    sides = [s for s in SIDES if names[s]]
    with service.lock:
        for n_side, side in enumerate(sides):
            loading = (lambda f, what, at=n_side / len(sides): progress(at, what)) if progress else None
            model = service.family_model(names[side], "clip", loading)
            t0 = time.perf_counter()

            def tell(what: str, frac: float, n_side=n_side) -> None:
                if cancelled is not None and cancelled():
                    raise Cancelled(f"the client left; the AutoAttack check stopped during {what}")
                if progress is not None:
                    progress((n_side + frac) / len(sides), f"{side}: {what}")

            with autocast(service.device, service.precision_for([model])):
                px = service.views.pixels(model, img)
                text = service.views.class_features(model, req.prompts)
                with torch.no_grad():
                    top1 = int(model.logits(model.encode_image(px), text).argmax(-1)[0])
                atk = make_attack(req, px[0].numel())
                tell(f"{req.attack.upper()}", 0.0)
                chosen = atk(px, ZeroShotCE(model, req.prompts, [top1], text_features=text),
                             generator=torch.Generator().manual_seed(req.seed), early_stop=True,
                             callback=lambda s, t, _l: tell(req.attack.upper(), 0.1 * s / t))
                order = list(LABELS.values())  # the ensemble's attacks, each a third of the rest of the bar
                res = autoattack(model, px, [top1], req.prompts, float(atk.eps), req.norm, plan, seed=req.seed,
                                 text_features=text,
                                 progress=lambda label, f: tell(label, 0.1 + 0.9 * (order.index(label) + f) / len(order)))
                with torch.no_grad():
                    after = int(model.logits(model.encode_image(res.adv), text).argmax(-1)[0])
                    last = int(model.logits(model.encode_image(chosen.adv), text).argmax(-1)[0])
            # the chosen attack broke the image if any iterate fooled the model (early stop) or its last one does
            survives, chosen_survives = bool(res.robust[0]), not bool(chosen.stopped[0]) and last == top1
            entry = {"model": model.name, "clean_top1": req.classes[top1], "survives": survives,
                     "broken_by": res.broken_by[0], "broken_at": res.broken_at[0],
                     "adversarial_top1": None if survives else req.classes[after],
                     "stages": [vars(s) for s in res.stages], "flags": [vars(f) for f in res.flags],
                     "skipped": [s for s in res.skipped if s != LEFT_OUT],
                     "chosen": {"attack": req.attack, "survives": chosen_survives},
                     "warning": None, "seconds": round(time.perf_counter() - t0, 3)}
            if chosen_survives and not survives:
                entry["warning"] = (f"{req.attack.upper()} said {model.name} survives at {req.eps_k:g}/255, but "
                                    f"AutoAttack broke it ({res.broken_by[0]}): the {req.attack.upper()} verdict "
                                    "overstates robustness")
            out["sides"][side] = entry
    return out


def check_markdown(check: dict[str, Any] | None, side: str) -> str:
    """The verdict of one side, for the page."""
    return check_text(check, side, bold=lambda t: f"**{t}**", em=lambda t: f"*{t}*", gap="\n\n")


def check_text(check: dict[str, Any] | None, side: str, bold=str, em=str, gap: str = "\n  ") -> str:
    """The verdict of one side in words (plain by default: ``python -m vlm_inspect.inspect --check``)."""
    if not check:
        return ""
    e = check["sides"].get(side)
    if e is None:
        return em("AutoAttack: no zero-shot model on this side")
    where = f"{check['eps_k255']:g}/255 {check['norm']}"
    head = f"{bold('AutoAttack')} ({check['budget']} budget, {e['seconds']:.1f} s): "
    if e["survives"]:
        line = head + f"✓ {bold(e['model'])} survives at {where}: still {em(e['clean_top1'])}"
    else:
        unit = "query" if e["broken_by"] == "Square" else "step"
        step = f" at {unit} {e['broken_at']}" if e["broken_at"] is not None else ""
        line = head + (f"✗ {bold(e['model'])} is broken at {where} by {e['broken_by']}{step}: "
                       f"{em(e['clean_top1'])} → {em(e['adversarial_top1'])}")
    notes = ([f"⚠ {e['warning']}"] if e["warning"] else []) + [f"⚠ {f['text']}" for f in e["flags"]]
    notes += [f"note: {x}" for x in e["skipped"]]
    return gap.join([line, *notes])
