"""Transfer robustness (``evaluate --transfer-from``): images crafted on a source model, shown to every
target model.

The threat model of a deployed model whose weights stay private: the attacker crafts on a model they
have (the public original, say) and hopes the image fools the one they cannot see. For every data
set, source and attack, each batch is attacked on the source (the full attack: no early stop, since
an image that already fools the source may need more steps to fool a target), and every target is
shown the result, resized to its input size as the app does. The worst case over restarts is counted
as for the white-box rows: zero-shot, right on the clean image and after every restart; VQA, the
exact match after every restart; captions, per sample the caption with the lowest CIDEr. Sources and
targets are of one family.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from .. import distributed as D
from ..attacks.base import eps_label
from ..data.sources import open_data
from ..images import resize_pixels, to_pixels
from ..models import load
from ..models.base import families_of, serves
from ..objectives import answer_nll, caption_nll, zero_shot_ce
from .metrics import caption_scores, exact_match, lower_cider
from .run import AttackSpec, _chunk_seed, _chunks, default_data

log = logging.getLogger("vlm_inspect.evaluate")


def evaluate_transfer(sources: Sequence[str], targets: Sequence[str], data: Sequence[str] | None,
                      attacks: Sequence[AttackSpec], n: int, batch_size: int = 100, seed: int = 0,
                      device: str = "cpu", precision: str = "fp32",
                      shard: D.DistInfo | None = None) -> list[dict[str, Any]]:
    """Rows ``{model (the target), source, data, eps, attack, metric, value, n}``; ``precision`` is the
    autocast of the attacks and predictions, as for :func:`~.run.evaluate`."""
    from ..runtime import autocast, resolve_device, resolve_precision

    shard = shard or D.DistInfo()
    device = resolve_device(device)
    with autocast(device, resolve_precision(precision, device)):
        return _transfer(sources, targets, data, attacks, n, batch_size, seed, device, shard)


def _transfer(sources, targets, data, attacks, n, batch_size, seed, device, shard) -> list[dict[str, Any]]:
    specs = [a for a in attacks if not a.ensemble]
    if not specs:
        raise ValueError("--transfer-from crafts with one attack at a time and autoattack is an ensemble: add "
                         "pgd, apgd, bim or fgsm to --attack")
    tgt = {name: load(name, device=device).eval() for name in targets}
    common = set.intersection(*(set(families_of(m)) for m in tgt.values()))
    if not common:
        families = sorted({f for m in tgt.values() for f in families_of(m)})
        raise ValueError(f"--transfer-from scores every --models entry on the same images: give models of one "
                         f"family, got {' and '.join(families)} models")
    first = next(iter(tgt.values())).family  # targets serving several families (LLaVAs): the first one's own
    fam = first if first in common else sorted(common)[0]
    rows: list[dict[str, Any]] = []
    for source_name in sources:
        src = load(source_name, device=device).eval()
        if not serves(src, fam):
            raise ValueError(f"the transfer source {source_name!r} is a {src.family} model and the targets are "
                             f"{fam} models: a source must be of the targets' family")
        for spec_data in data or default_data(fam):
            ds = open_data(spec_data, "test", seed=seed, length=n, image_size=src.image_size)
            count = min(n, len(ds))
            items = [ds[i] for i in range(count)]
            pixels = to_pixels([r["image"] for r in items], src.image_size)
            objective, predict, summarize = _task(fam, ds, items, src, tgt)
            mine = [(k, idx) for k, idx in enumerate(_chunks(count, batch_size)) if k % shard.world == shard.rank]
            clean = {t: {i: p for _, idx in mine for i, p in zip(idx, predict(t, pixels[idx], idx))} for t in tgt}
            for spec in specs:
                atk = spec.build()
                # sample -> [clean, run 0, run 1, ...]; the clean predictions are made once for every attack
                preds_mine: dict[str, dict[int, list]] = {t: {} for t in tgt}
                for k, idx in mine:
                    for t in tgt:
                        preds_mine[t].update((i, [clean[t][i]]) for i in idx)
                    for r in range(spec.runs):
                        gen = torch.Generator(device=src.device).manual_seed(_chunk_seed(seed, r, k))
                        adv = atk(pixels[idx].to(src.device), objective(idx), generator=gen).adv
                        for t in tgt:
                            for i, p in zip(idx, predict(t, adv, idx)):
                                preds_mine[t][i].append(p)
                for t in tgt:
                    merged: dict[int, list] = {}
                    for part in D.all_gather_objects(preds_mine[t], shard):
                        merged.update(part)
                    for metric, value in summarize([merged[i] for i in range(count)]).items():
                        rows.append({"model": t, "source": source_name, "data": spec_data, "eps": eps_label(spec.eps),
                                     "attack": spec.name, "metric": metric, "value": round(float(value), 4),
                                     "n": count})
            log.info("transfer from %s on %s done", source_name, spec_data)
    return rows


def _task(fam: str, ds, items: list[dict], src, tgt: dict):
    """The source's objective for a batch, each target's per-sample prediction, and the metrics from each
    sample's ``[clean, run 0, run 1, ...]`` predictions, counted as the white-box rows count them:
    zero-shot, right on the clean image and after every run; VQA, exact match after every run; captions,
    per sample the caption with the lowest CIDEr over the runs."""
    def seen_by(m, x):
        return resize_pixels(x.to(m.device), m.image_size)

    if fam == "clip":
        labels = torch.tensor([r["label"] for r in items])
        with torch.no_grad():
            src_text = src.encode_text(ds.prompts)
            texts = {t: m.encode_text(ds.prompts) for t, m in tgt.items()}

        def predict(t, x, idx):
            m = tgt[t]
            with torch.no_grad():
                pred = m.logits(m.encode_image(seen_by(m, x)), texts[t]).argmax(-1).cpu()
            return (pred == labels[idx]).tolist()

        return (lambda idx: zero_shot_ce(src, ds.prompts, labels[idx], text_features=src_text), predict,
                lambda per: {"top1": sum(all(p) for p in per) / len(per)})
    if fam == "vqa":
        questions, answers = [r["question"] for r in items], [r["answer"] for r in items]

        def predict(t, x, idx):
            with torch.no_grad():
                return tgt[t].answer(seen_by(tgt[t], x), [questions[i] for i in idx])

        def summarize(per):
            ok = [all(exact_match(p[1:], [a] * (len(p) - 1))) for p, a in zip(per, answers)]
            return {"exact_match": sum(ok) / len(ok)}

        return (lambda idx: answer_nll(src, [questions[i] for i in idx], [answers[i] for i in idx]), predict,
                summarize)
    refs = [r.get("captions") or [r["caption"]] for r in items]

    def predict(t, x, idx):
        with torch.no_grad():
            return tgt[t].generate(seen_by(tgt[t], x))

    def summarize(per):
        worst, cider = None, None
        for r in range(1, len(per[0])):
            caps = [p[r] for p in per]
            worst, cider = lower_cider(worst, cider, caps, caption_scores(caps, refs)["cider_per_sample"])
        final = caption_scores(worst, refs)
        return {k: final[k] for k in ("bleu4", "cider", "rouge_l")}

    return lambda idx: caption_nll(src, [refs[i][0] for i in idx]), predict, summarize


def transfer_markdown(rows: list[dict[str, Any]]) -> str:
    """One table per metric, attack and eps: rows the sources (per data set, and their average over data sets),
    columns the targets."""
    rows = [r for r in rows if "source" in r]
    if not rows:
        return ""
    targets = list(dict.fromkeys(r["model"] for r in rows))
    lines = ["**transfer**: images crafted on the row's model, shown to the column's (each row's model "
             "attacked white-box where it is also a column)", ""]
    for metric, attack, eps in dict.fromkeys((r["metric"], r["attack"], r["eps"]) for r in rows):
        at = [r for r in rows if (r["metric"], r["attack"], r["eps"]) == (metric, attack, eps)]
        datas = list(dict.fromkeys(r["data"] for r in at))
        lines += [f"{metric}, {attack} {eps}:", "", "| crafted on | data | " + " | ".join(f"→ {t}" for t in targets) + " |",
                  "|---|---|" + "---|" * len(targets)]
        for source in dict.fromkeys(r["source"] for r in at):
            for d in datas + (["**average**"] if len(datas) > 1 else []):
                vals = []
                for t in targets:
                    v = [r["value"] for r in at if r["source"] == source and r["model"] == t
                         and (d == "**average**" or r["data"] == d)]
                    vals.append(f"{sum(v) / len(v):.3f}" if v else "–")
                lines.append(f"| {source} | {d.removeprefix('shapes:')} | " + " | ".join(vals) + " |")
        lines.append("")
    return "\n".join(lines)
