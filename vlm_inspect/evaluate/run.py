"""Clean and robust metrics of models x data sets x attacks (the tables in ``docs/``).

For every model and data set: the clean metric, then for every eps the metric under each attack,
and - when several attacks (or restarts) run - the worst case per sample. Zero-shot top-1 and VQA
exact match take the worst case as "wrong under any attack"; for captions the worst case per sample
is the attacked caption with the lowest CIDEr.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..attacks import ATTACKS, is_randomised
from ..attacks.base import eps_label, parse_eps  # noqa: F401  (parse_eps: part of this module's API)
from .. import distributed as D
from ..checkpoints import weights_digest
from ..data.sources import open_data
from ..images import to_pixels
from ..models import load
from ..models.base import families_of
from ..objectives import answer_nll, caption_nll, zero_shot_ce
from . import autoattack as AA
from .journal import Journal
from .metrics import caption_scores, exact_match, lower_cider

log = logging.getLogger("vlm_inspect.evaluate")

METRIC = {"clip": "top1", "captioner": "bleu4", "vqa": "exact_match"}


@dataclass
class AttackSpec:
    name: str
    eps: float
    steps: int = 10
    alpha: float | None = None   # None: the attack's default (FGSM: eps; others 2.5*eps/steps)
    random_start: bool = True
    restarts: int = 1
    norm: str = "linf"
    budget: AA.Budget = AA.STANDARD  # the ensemble's (``name="autoattack"``); other attacks ignore it
    momentum: float = 0.0            # transfer boosters (attacks/boosters.py), for the attacks that take them
    diversity: float = 0.0

    @property
    def ensemble(self) -> bool:
        return self.name == AA.NAME

    def build(self):
        if self.ensemble:
            raise ValueError("autoattack is an ensemble of attacks, run by evaluate_data, not one attack")
        return ATTACKS.build(self.name, eps=self.eps, alpha=self.alpha, steps=self.steps,
                             random_start=self.random_start, norm=self.norm, momentum=self.momentum,
                             diversity=self.diversity)

    @property
    def runs(self) -> int:
        """Restarts apply to attacks that can start at random; a deterministic one runs once."""
        return 1 if self.ensemble else self.restarts if is_randomised(self.name) else 1

    def describe(self) -> dict[str, Any]:
        if self.ensemble:
            return {"attack": AA.NAME, "eps": eps_label(self.eps), "norm": self.norm,
                    "version": "standard without FAB-T", **self.budget.describe()}
        a = self.build()
        d = {"attack": self.name, "eps": eps_label(self.eps), "norm": self.norm, "steps": a.steps,
             "alpha": eps_label(a.alpha)}
        if is_randomised(self.name):
            d.update(random_start=self.random_start, restarts=self.restarts)
        return {**d, **a.boosters()}


def default_data(family: str) -> list[str]:
    if family == "clip":
        return ["shapes:shapes-shape", "shapes:shapes-color", "shapes:shapes-combo", "shapes:shapes-size",
                "shapes:shapes-count", "shapes:shapes-heldout", "shapes:shapes-combo@outline",
                "shapes:shapes-combo@noisy"]
    return ["shapes:shapes-scenes"]


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield list(range(i, min(n, i + size)))


def evaluate_model(model, data_spec: str, attacks: Sequence[AttackSpec], n: int, batch_size: int = 100,
                   seed: int = 0, split: str = "test", shard: D.DistInfo | None = None,
                   family: str | None = None) -> list[dict[str, Any]]:
    """Rows ``{model, data, eps, attack, metric, value, n}`` for one model and data set (as the ``family``
    model: default its own; a LLaVA is scored as a captioner and as a VQA model)."""
    data = open_data(data_spec, split, seed=seed, length=n, image_size=model.image_size)
    return evaluate_data(model, data, data_spec, attacks, n, batch_size, seed, shard, family)


def _chunk_seed(seed: int, restart: int, chunk: int) -> int:
    """The random-start seed of one batch of samples and one restart: a batch's attack depends on nothing
    but its own samples, so sharded runs (``torchrun``) equal a single process exactly."""
    return (seed * 1000 + restart) * 100_003 + chunk


def evaluate_data(model, data, data_spec: str, attacks: Sequence[AttackSpec], n: int, batch_size: int = 100,
                  seed: int = 0, shard: D.DistInfo | None = None, family: str | None = None) -> list[dict[str, Any]]:
    """:func:`evaluate_model` on an opened data set (``attacks=[]``: clean metrics only).

    The samples are split into batches of ``batch_size``, each attacked with its own seeded random
    starts. With ``shard`` (the ranks of a ``torchrun``) each rank attacks every ``world``-th batch; the
    per-sample results are gathered and every rank scores them all (corpus metrics such as CIDEr need
    every caption), so the rows equal a single process's."""
    shard = shard or D.DistInfo()
    n = min(n, len(data))
    fam = family or model.family
    records = [data[i] for i in range(n)]
    pixels = to_pixels([r["image"] for r in records], model.image_size)
    mine = [(k, idx) for k, idx in enumerate(_chunks(n, batch_size)) if k % shard.world == shard.rank]
    rows: list[dict[str, Any]] = []

    def row(eps_text: str, attack: str, metric: str, value: float, result: Any = None) -> None:
        rows.append({"model": model.name, "data": data_spec, "eps": eps_text, "attack": attack, "metric": metric,
                     "value": round(float(value), 4), "n": n})
        if metric == "cider" and isinstance(result, dict):  # corpus CIDEr is their mean: its interval needs them
            rows[-1]["per_sample"] = [round(float(c), 4) for c in result["cider_per_sample"]]

    # ---- per-family: predict (per sample), score (the list of every sample's prediction), objective ----
    if fam == "clip":
        prompts = data.prompts
        labels = torch.tensor([r["label"] for r in records])
        with torch.no_grad():
            text = model.encode_text(prompts)

        def predict(x, idx):  # right or wrong, per sample
            with torch.no_grad():
                pred = model.logits(model.encode_image(x.to(model.device)), text).argmax(-1).cpu()
            return (pred == labels[idx]).tolist()

        def objective(idx):
            return zero_shot_ce(model, prompts, labels[idx], text_features=text)

        def score(preds):
            return list(preds)
    elif fam == "captioner":
        refs = [r.get("captions") or [r["caption"]] for r in records]

        def predict(x, idx):
            return model.generate(x.to(model.device))

        def objective(idx):
            return caption_nll(model, [refs[i][0] for i in idx])

        def score(preds):
            return caption_scores(list(preds), refs)
    else:
        questions = [r["question"] for r in records]
        answers = [r["answer"] for r in records]

        def predict(x, idx):
            return model.answer(x.to(model.device), [questions[i] for i in idx])

        def objective(idx):
            return answer_nll(model, [questions[i] for i in idx], [answers[i] for i in idx])

        def score(preds):
            return exact_match(list(preds), answers)

    def summarize(result) -> dict[str, float]:
        if fam == "captioner":
            return {"bleu4": result["bleu4"], "cider": result["cider"], "rouge_l": result["rouge_l"]}
        return {METRIC[fam]: sum(result) / len(result)}

    def gathered(per_sample: dict[int, Any]) -> list[Any]:
        """This rank's ``{sample: value}`` merged with every other rank's, in sample order."""
        merged: dict[int, Any] = {}
        for part in D.all_gather_objects(per_sample, shard):
            merged.update(part)
        return [merged[i] for i in range(n)]

    clean_mine: dict[int, Any] = {}
    for _, idx in mine:
        clean_mine.update(zip(idx, predict(pixels[idx], idx)))
    clean = gathered(clean_mine)
    scored = score(clean)
    for key, v in summarize(scored).items():
        row("0", "none", key, v, scored)

    by_eps: dict[float, list[AttackSpec]] = {}
    for a in attacks:
        by_eps.setdefault(a.eps, []).append(a)
    for eps, specs in by_eps.items():
        worst_caps: list[str] | None = None
        worst_cider: list[float] | None = None
        worst_ok: list[bool] | None = None
        for spec in specs:
            if spec.ensemble:  # zero-shot only (evaluate() refuses it for other families before any work)
                ok_mine, parts = {}, []
                for k, idx in mine:
                    res = AA.autoattack(model, pixels[idx], labels[idx], prompts, eps, spec.norm, spec.budget,
                                        _chunk_seed(seed, 0, k), batch_size, text_features=text)
                    ok_mine.update(zip(idx, res.robust.tolist()))
                    parts.append(AA.tally(res))
                final = gathered(ok_mine)
                merged = AA.merge_tallies([t for part in D.all_gather_objects(parts, shard) for t in part], n)
                log.info("%s on %s, eps %s:\n%s", model.name, data_spec, eps_label(eps), AA.tally_text(merged))
                worst_ok = list(final) if worst_ok is None else [a and b for a, b in zip(worst_ok, final)]
                row(eps_label(eps), spec.name, METRIC[fam], sum(final) / n)
                rows[-1].update(merged)
                continue
            atk = spec.build()
            if fam == "clip":  # worst case over iterates and restarts; fooled images leave the batch
                ok_mine = {}
                for k, idx in mine:
                    ok = [clean[i] for i in idx]  # a clean mistake stays a mistake
                    for r in range(spec.runs):
                        gen = torch.Generator(device=model.device).manual_seed(_chunk_seed(seed, r, k))
                        ok = attack_zero_shot(atk, pixels, idx, ok, objective, predict, gen)
                    ok_mine.update(zip(idx, ok))
                final = gathered(ok_mine)
                worst_ok = list(final) if worst_ok is None else [a and b for a, b in zip(worst_ok, final)]
                for key, v in summarize(final).items():
                    row(eps_label(eps), spec.name, key, v)
                continue
            runs_mine: dict[int, list[Any]] = {}  # per sample: the prediction after each restart
            for k, idx in mine:
                for r in range(spec.runs):
                    gen = torch.Generator(device=model.device).manual_seed(_chunk_seed(seed, r, k))
                    adv = atk(pixels[idx].to(model.device), objective(idx), generator=gen).adv
                    for i, p in zip(idx, predict(adv, idx)):
                        runs_mine.setdefault(i, []).append(p)
            runs = gathered(runs_mine)
            preds_all, cid = None, None
            for r in range(spec.runs):
                preds = [runs[i][r] for i in range(n)]
                result = score(preds)
                if fam == "captioner":  # the caption with the lowest CIDEr per sample, over the restarts
                    preds_all, cid = lower_cider(preds_all, cid, preds, result["cider_per_sample"])
                else:
                    preds_all = result if preds_all is None else [a and b for a, b in zip(preds_all, result)]
            if fam == "captioner":
                final = caption_scores(preds_all, refs)
                worst_caps, worst_cider = lower_cider(worst_caps, worst_cider, preds_all, final["cider_per_sample"])
            else:
                final = preds_all
                worst_ok = list(final) if worst_ok is None else [a and b for a, b in zip(worst_ok, final)]
            for key, v in summarize(final).items():
                row(eps_label(eps), spec.name, key, v, final)
        _flag_overstated(rows, eps_label(eps), n)
        if len(specs) > 1:
            worst = caption_scores(worst_caps, refs) if fam == "captioner" else worst_ok
            for key, v in summarize(worst).items():
                row(eps_label(eps), "worst", key, v, worst)
    return rows


def _flag_overstated(rows: list[dict[str, Any]], eps: str, n: int) -> None:
    """The "PGD overstates" flag on the ensemble's row: every other attack at ``eps`` that left more
    images standing than AutoAttack."""
    at = [r for r in rows if r["eps"] == eps]
    ensemble = next((r for r in at if r["attack"] == AA.NAME), None)
    if ensemble is None:
        return
    for r in at:
        if r["attack"] not in (AA.NAME, "worst") and r["metric"] == ensemble["metric"]:
            flag = AA.overstated(r["attack"].upper(), r["value"], ensemble["value"], n)
            if flag:
                ensemble["flags"].append(vars(flag))


def attack_zero_shot(atk, pixels: torch.Tensor, idx: list[int], ok: list[bool], objective, predict,
                     gen: torch.Generator) -> list[bool]:
    """Per-sample "still right" after one (re)start of ``atk`` on the batch ``idx`` (sample indices),
    attacking only the samples still right (``ok``, one per sample of ``idx``). An image counts as wrong
    once any iterate fooled the model (early stop)."""
    ok = list(ok)
    alive = [i for i, good in zip(idx, ok) if good]
    if alive:
        res = atk(pixels[alive].to(gen.device), objective(alive), generator=gen, early_stop=True)
        right = dict(zip(alive, (torch.tensor(predict(res.adv, alive)) & ~res.stopped.cpu()).tolist()))
        ok = [right.get(i, good) for i, good in zip(idx, ok)]
    return ok


def evaluate(models: Sequence[str], data: Sequence[str] | None, attacks: Sequence[AttackSpec], n: int,
             batch_size: int = 100, seed: int = 0, device: str = "cpu", weights: dict[str, str] | None = None,
             progress=None, precision: str = "fp32", shard: D.DistInfo | None = None,
             journal: Journal | None = None) -> list[dict[str, Any]]:
    """Rows of metrics for every model on every data set under every attack. ``precision`` is the
    autocast of attacks and predictions (:mod:`vlm_inspect.runtime`); the tables in docs/ use fp32.
    ``shard``: this process's rank among a ``torchrun``'s (:func:`evaluate_data`); every rank returns
    the same rows. ``journal``: each finished (model, data set) is recorded there, and one it already
    holds is not computed again (``--resume``)."""
    from ..runtime import autocast, decoding_precision, resolve_device, resolve_precision

    device = resolve_device(device)
    requested, precision = precision, resolve_precision(precision, device)
    decode = decoding_precision(requested, precision, device)  # captions / answers: fp32 under auto on a CPU
    rows: list[dict[str, Any]] = []
    for name in models:
        model = load(name, device=device, weights=(weights or {}).get(name, "default"))
        model.eval()
        if model.family != "clip" and any(a.ensemble for a in attacks):
            raise ValueError(f"autoattack is the zero-shot classification ensemble and {name} is a {model.family}; "
                             "attack captions and answers with --attack apgd --restarts N (the worst metric per "
                             "sample is kept)")
        digest = weights_digest(model)  # the adapter: prompts and normalisation included
        for spec in (data or default_data(model.family)):
            done = journal.get(name, spec, digest) if journal else None
            if done is not None:
                rows += done
                log.info("%s on %s: done in an earlier run (%s)", name, spec, journal.path)
                if progress:
                    progress(name, spec)
                continue
            t, unit = time.time(), []
            for fam in families_of(model):  # a LLaVA: its captions and its answers (rows differ by metric)
                with autocast(device, precision, decoding=decode):
                    unit += [{**r, "weights_digest": digest} for r in evaluate_model(
                        model, spec, attacks, n, batch_size, seed, shard=shard, family=fam)]
            rows += unit
            if journal:
                journal.add(name, spec, digest, unit)
            log.info("%s on %s: %.1fs", name, spec, time.time() - t)
            if progress:
                progress(name, spec)
    return rows


def records(rows: list[dict[str, Any]], attacks: Sequence[AttackSpec], seed: int, norm: str) -> list[dict[str, Any]]:
    """One entry per model, data set, threat model (norm, eps) and metric, as RobustBench records them, so
    that results from different machines can be compared: the model's weights digest, the attacks with
    their settings, the samples and seed, the clean and the robust value (the worst case per sample over
    the attacks at that eps)."""
    out = []
    keys = list(dict.fromkeys((r["model"], r["data"], r["metric"]) for r in rows))
    for model, data, metric in keys:
        mine = [r for r in rows if (r["model"], r["data"], r["metric"]) == (model, data, metric)]
        clean = next((r["value"] for r in mine if r["attack"] == "none"), None)
        for eps in dict.fromkeys(r["eps"] for r in mine if r["eps"] != "0"):
            at = [r for r in mine if r["eps"] == eps]
            worst = next((r for r in at if r["attack"] == "worst"), at[0] if len(at) == 1 else None)
            out.append({"model": model, "weights_digest": mine[0].get("weights_digest"), "data": data,
                        "threat_model": {"norm": norm, "eps": eps}, "metric": metric, "samples": mine[0]["n"],
                        "seed": seed, "attacks": [a.describe() for a in attacks if eps_label(a.eps) == eps],
                        "clean": clean, "robust": worst["value"] if worst else min(r["value"] for r in at),
                        "per_attack": {r["attack"]: r["value"] for r in at if r["attack"] != "worst"}})
            for r in at:
                if r.get("stages") is not None:
                    out[-1].update(autoattack={"stages": r["stages"], "skipped": r["skipped"], "flags": r["flags"]})
    return out
