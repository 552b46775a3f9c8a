"""What the CLIP defenses share: class prompts from the training data, a frozen copy of the model,
the training-time PGD on zero-shot cross-entropy, and the zero-shot classification batch."""
from __future__ import annotations

import copy
from typing import Any

import torch

from ..attacks import PGD
from ..objectives import ZeroShotCE
from .common import Task, to_pixels


def class_prompts(data: Any, defense: str) -> list[str]:
    """The prompt of every class of a classification data set (shapes datasets, ImageFolder, ...)."""
    prompts = list(getattr(data, "prompts", None) or [])
    if getattr(data, "kind", "classification") != "classification" or len(prompts) < 2:
        raise ValueError(f"--defense {defense} trains zero-shot classification: give a classification data set "
                         f"with at least two classes (e.g. shapes:shapes-combo or imagefolder:<dir>), not {data!r}")
    return prompts


def frozen_copy(adapter):
    """A deep copy of ``adapter`` in eval mode with every weight frozen (θ0 in PAPERS.md)."""
    frozen = copy.deepcopy(adapter)
    frozen.eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def pgd_zero_shot(model, pixels: torch.Tensor, labels: torch.Tensor, class_texts: list[str],
                  text_features: torch.Tensor, eps: float, alpha: float, steps: int) -> torch.Tensor:
    """Training-time PGD-Linf with a random start on the zero-shot CE (the model's weights untouched)."""
    if eps <= 0:
        return pixels.detach()
    objective = ZeroShotCE(model, class_texts, labels, text_features=text_features)
    return PGD(eps=eps, alpha=alpha, steps=steps, random_start=True)(pixels, objective).adv


class ZeroShotTask(Task):
    """A CLIP defense trained on (image, class) pairs with the class prompts' text features fixed
    (the text encoder is frozen in TeCoA and TGA-ZSR). Subclasses write :meth:`loss`."""

    families = ("clip",)
    key = ""

    def __init__(self, model, config, data) -> None:
        super().__init__(model, config, data)
        self.class_texts = class_prompts(data, self.key)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.model.visual.parameters():  # only the visual encoder is trained
            p.requires_grad_(True)
        with torch.no_grad():
            self.text_features = model.encode_text(self.class_texts)

    def collate(self, records: list[dict[str, Any]], step: int) -> dict[str, Any]:
        return {"pixels": to_pixels([r["image"] for r in records], self.model.image_size),
                "labels": torch.tensor([int(r["label"]) for r in records]),
                "index": [r.get("index", -1) for r in records]}

    def attack(self, batch: dict[str, Any]) -> torch.Tensor:
        c = self.config
        t = self.text_features.to(batch["pixels"].device)
        return pgd_zero_shot(self.model, batch["pixels"], batch["labels"].to(t.device), self.class_texts, t,
                             c.attack_eps, c.attack_step, c.attack_steps)
