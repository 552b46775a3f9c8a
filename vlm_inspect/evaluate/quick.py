"""Small, fast evaluations used during training (the full tables come from ``evaluate``).

Each is the clean part of :func:`vlm_inspect.evaluate.run.evaluate_data`, so training-time figures
and the tables are computed by the same code."""
from __future__ import annotations

from ..data.sources import open_data
from .run import evaluate_data


def _clean(model, data, n: int) -> dict[str, float]:
    rows = evaluate_data(model, data, getattr(data, "name", ""), [], n)
    return {r["metric"]: r["value"] for r in rows}


def zero_shot_accuracy(model, data, n: int | None = None) -> float:
    return _clean(model, data, n or len(data))["top1"]


def caption_bleu(model, data, n: int) -> dict[str, float]:
    m = _clean(model, data, n)
    return {"bleu4": m["bleu4"], "cider": m["cider"]}


def answer_accuracy(model, data, n: int) -> float:
    return _clean(model, data, n)["exact_match"]


def quick_eval(model, data_spec: str, n: int) -> dict[str, float]:
    """Per-family headline metric on held-back (val) data of the training spec."""
    size = model.image_size
    if data_spec.startswith("shapes:"):
        if model.family == "clip":
            return {name: zero_shot_accuracy(model, open_data(f"shapes:{name}", "val", length=n, image_size=size))
                    for name in ("shapes-shape", "shapes-color", "shapes-combo")}
        data = open_data("shapes:shapes-scenes", "val", length=n, image_size=size)
    else:
        data = open_data(data_spec, "val", length=n, image_size=size)
    if model.family == "clip":
        return {"zero_shot_top1": zero_shot_accuracy(model, data, n)}
    if model.family == "captioner":
        return caption_bleu(model, data, n)
    return {"exact_match": answer_accuracy(model, data, n)}
