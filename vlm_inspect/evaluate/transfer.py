"""Transfer robust accuracy (``evaluate --transfer-from``): images crafted on a source model, shown to
every target model.

The threat model of a deployed model whose weights stay private: the attacker crafts on a model they
have (the public original, say) and hopes the image fools the one they cannot see. For every data
set, source and attack, each batch is attacked on the source (the full attack: no early stop, since
an image that already fools the source may need more steps to fool a target), and every target
classifies the result, resized to its input size as the app does. A sample counts as robust for a
target when the target is right on the clean image and on the images of every restart (the worst
case over restarts, as for white-box rows). Zero-shot classification only; captions and answers
transfer in the app's matrix.
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
from ..objectives import zero_shot_ce
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
    for name, m in tgt.items():
        if m.family != "clip":
            raise ValueError(f"--transfer-from scores zero-shot classification; the target {name!r} is a {m.family} "
                             "model (captions and answers transfer in the app's matrix)")
    rows: list[dict[str, Any]] = []
    for source_name in sources:
        src = load(source_name, device=device).eval()
        if src.family != "clip":
            raise ValueError(f"the transfer source {source_name!r} is a {src.family} model and the targets are "
                             "zero-shot classifiers: a source must be of the targets' family (clip)")
        for spec_data in data or default_data("clip"):
            ds = open_data(spec_data, "test", seed=seed, length=n, image_size=src.image_size)
            count = min(n, len(ds))
            items = [ds[i] for i in range(count)]
            pixels = to_pixels([r["image"] for r in items], src.image_size)
            labels = torch.tensor([r["label"] for r in items])
            with torch.no_grad():
                src_text = src.encode_text(ds.prompts)
                texts = {t: m.encode_text(ds.prompts) for t, m in tgt.items()}

            def right(t: str, x: torch.Tensor, idx: list[int]) -> list[bool]:
                m = tgt[t]
                with torch.no_grad():
                    pred = m.logits(m.encode_image(resize_pixels(x.to(m.device), m.image_size)), texts[t]).argmax(-1)
                return (pred.cpu() == labels[idx]).tolist()

            mine = [(k, idx) for k, idx in enumerate(_chunks(count, batch_size)) if k % shard.world == shard.rank]
            for spec in specs:
                atk = spec.build()
                ok_mine: dict[str, dict[int, bool]] = {t: {} for t in tgt}
                for k, idx in mine:
                    ok = {t: right(t, pixels[idx], idx) for t in tgt}  # a clean mistake stays a mistake
                    for r in range(spec.runs):
                        gen = torch.Generator(device=src.device).manual_seed(_chunk_seed(seed, r, k))
                        obj = zero_shot_ce(src, ds.prompts, labels[idx], text_features=src_text)
                        adv = atk(pixels[idx].to(src.device), obj, generator=gen).adv
                        for t in tgt:
                            ok[t] = [a and b for a, b in zip(ok[t], right(t, adv, idx))]
                    for t in tgt:
                        ok_mine[t].update(zip(idx, ok[t]))
                for t in tgt:
                    merged: dict[int, bool] = {}
                    for part in D.all_gather_objects(ok_mine[t], shard):
                        merged.update(part)
                    value = sum(merged[i] for i in range(count)) / count
                    rows.append({"model": t, "source": source_name, "data": spec_data, "eps": eps_label(spec.eps),
                                 "attack": spec.name, "metric": "top1", "value": round(float(value), 4), "n": count})
            log.info("transfer from %s on %s done", source_name, spec_data)
    return rows


def transfer_markdown(rows: list[dict[str, Any]]) -> str:
    """One table per attack and eps: rows the sources (per data set, and their average over data sets),
    columns the targets."""
    rows = [r for r in rows if "source" in r]
    if not rows:
        return ""
    targets = list(dict.fromkeys(r["model"] for r in rows))
    lines = ["**transfer top1**: images crafted on the row's model, shown to the column's (each row's model "
             "attacked white-box where it is also a column)", ""]
    for attack, eps in dict.fromkeys((r["attack"], r["eps"]) for r in rows):
        at = [r for r in rows if (r["attack"], r["eps"]) == (attack, eps)]
        datas = list(dict.fromkeys(r["data"] for r in at))
        lines += [f"{attack} {eps}:", "", "| crafted on | data | " + " | ".join(f"→ {t}" for t in targets) + " |",
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
