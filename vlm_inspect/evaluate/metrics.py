"""Task metrics. Caption metrics come from the COCO caption toolkit (pycocoevalcap): BLEU-4,
CIDEr-D and ROUGE-L, the figures captioning papers report."""
from __future__ import annotations

import re
from typing import Sequence

_PUNCT = re.compile(r"[^\w\s]")


def normalize_text(text: str) -> str:
    """Lower-case, punctuation removed, white space folded (what the COCO tokenizer does for us)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, object]:
    """Corpus BLEU-4, CIDEr(-D) and ROUGE-L, plus per-sample CIDEr (for worst-case selection)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(predictions) != len(references) or not predictions:
        raise ValueError("need one prediction per reference set, and at least one")
    res = {i: [normalize_text(p) or "<empty>"] for i, p in enumerate(predictions)}
    gts = {i: [normalize_text(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_each = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider), "rouge_l": float(rouge),
            "cider_per_sample": [float(c) for c in cider_each]}


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> list[bool]:
    """Per-sample exact match after :func:`normalize_text`."""
    return [normalize_text(p) == normalize_text(a) for p, a in zip(predictions, answers)]


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQA v2 accuracy of one answer: min(#humans who gave it / 3, 1)."""
    p = normalize_text(prediction)
    return min(1.0, sum(normalize_text(a) == p for a in human_answers) / 3.0)


def lower_cider(worst: list[str] | None, cider: list[float] | None, captions: Sequence[str],
                each: Sequence[float]) -> tuple[list[str], list[float]]:
    """Per sample, the caption of lower CIDEr: ``worst``/``cider`` so far (None at first) against
    ``captions`` with their per-sample CIDEr ``each`` (the worst case over restarts or attacks)."""
    if worst is None or cider is None:
        return list(captions), list(each)
    pick = [c2 < c1 for c1, c2 in zip(cider, each)]
    return ([b if p else a for a, b, p in zip(worst, captions, pick)], [min(a, b) for a, b in zip(cider, each)])
