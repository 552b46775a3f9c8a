"""Small, fast evaluations used during training (the full tables come from ``evaluate``)."""
from __future__ import annotations

import torch

from ..data.sources import open_data
from .metrics import caption_scores, exact_match


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield range(i, min(n, i + size))


@torch.no_grad()
def zero_shot_accuracy(model, data, n: int | None = None, batch_size: int = 128) -> float:
    from ..defenses.common import to_pixels

    n = min(n or len(data), len(data))
    text = model.encode_text(data.prompts)
    correct = 0
    for idx in _batches(n, batch_size):
        recs = [data[i] for i in idx]
        x = to_pixels([r["image"] for r in recs], model.image_size).to(model.device)
        pred = model.logits(model.encode_image(x), text).argmax(-1).cpu()
        correct += int((pred == torch.tensor([r["label"] for r in recs])).sum())
    return correct / n


@torch.no_grad()
def caption_bleu(model, data, n: int, batch_size: int = 128) -> dict[str, float]:
    from ..defenses.common import to_pixels

    n = min(n, len(data))
    preds, refs = [], []
    for idx in _batches(n, batch_size):
        recs = [data[i] for i in idx]
        preds += model.generate(to_pixels([r["image"] for r in recs], model.image_size).to(model.device))
        refs += [r.get("captions") or [r["caption"]] for r in recs]
    s = caption_scores(preds, refs)
    return {"bleu4": round(s["bleu4"], 4), "cider": round(s["cider"], 4)}


@torch.no_grad()
def answer_accuracy(model, data, n: int, batch_size: int = 128) -> float:
    from ..defenses.common import to_pixels

    n = min(n, len(data))
    hits = []
    for idx in _batches(n, batch_size):
        recs = [data[i] for i in idx]
        x = to_pixels([r["image"] for r in recs], model.image_size).to(model.device)
        hits += exact_match(model.answer(x, [r["question"] for r in recs]), [r["answer"] for r in recs])
    return sum(hits) / n


def quick_eval(model, data_spec: str, n: int) -> dict[str, float]:
    """Per-family headline metric on held-back data of the training spec."""
    size = model.image_size
    if data_spec.startswith("shapes:"):
        if model.family == "clip":
            return {name: round(zero_shot_accuracy(model, open_data(f"shapes:{name}", "val", length=n,
                                                                    image_size=size)), 4)
                    for name in ("shapes-shape", "shapes-color", "shapes-combo")}
        data = open_data("shapes:shapes-scenes", "val", length=n, image_size=size)
    else:
        data = open_data(data_spec, "val", length=n, image_size=size)
    if model.family == "clip":
        return {"zero_shot_top1": round(zero_shot_accuracy(model, data, n), 4)}
    if model.family == "captioner":
        return caption_bleu(model, data, n)
    return {"exact_match": round(answer_accuracy(model, data, n), 4)}
