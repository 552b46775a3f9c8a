"""``--defense prsl``: fine-tuning with the Partially Recentralised Softmax Loss; ``--defense ce``: the
same fine-tune with plain cross-entropy, its control.

"Partially Recentralization Softmax Loss for Vision-Language Models Robustness", arXiv 2402.03627,
https://arxiv.org/abs/2402.03627 (docs/METHODS.md; re-implemented from the abstract, no code available).

Faithful: fine-tuning of a captioner (ViT-GPT2 in the paper) and a VQA model (BLIP-2-OPT in the paper;
BLIP here) with a softmax loss that restricts the top-K outputs, K a hyper-parameter; robustness is
measured under BIM with caption metrics and VQA answers.
Our choices (the abstract does not give the formula): at every target token position the top-K logits
are pulled toward their mean, ``z_k <- m + (1 - gamma)(z_k - m)`` (m their mean, gamma in [0, 1]; gamma = 0
is plain cross-entropy), then cross-entropy on the modified logits, averaged over each text's tokens;
defaults K = 5, gamma = 0.5; the part that trains defaults to the language side with the vision encoder
frozen (``part=decoder``, as BLIP-2 keeps its image encoder frozen; ``part=full`` trains everything).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..models.captioner import token_nll
from .common import DEFENSES
from .generative import GenerativeConfig, GenerativeTask


def recentralise_top_k(logits: torch.Tensor, k: int, gamma: float) -> torch.Tensor:
    """``logits`` with, along the last axis, the top-``k`` entries pulled toward their mean by ``gamma``."""
    k = min(int(k), logits.shape[-1])
    top, idx = logits.topk(k, dim=-1)
    mean = top.mean(-1, keepdim=True)
    return logits.scatter(-1, idx, top - gamma * (top - mean))  # = mean + (1 - gamma)(top - mean)


@dataclass
class PRSLConfig(GenerativeConfig):
    k: int = 5          # top-K outputs recentralised (paper: a hyper-parameter K; value ours, swept in REPRODUCTION)
    gamma: float = 0.5  # how far the top-K logits move to their mean, 0 = cross-entropy - our choice


@DEFENSES.register("prsl", families=("captioner", "vqa"))
class PRSL(GenerativeTask):
    Config = PRSLConfig

    def __init__(self, model, config, data) -> None:
        if config.k < 1:
            raise ValueError(f"k must be >= 1, got {config.k}")
        if not 0 <= config.gamma <= 1:
            raise ValueError(f"gamma must lie in [0, 1], got {config.gamma}")
        super().__init__(model, config, data)

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        logits, targets, mask = self.logits(batch, batch["pixels"])
        logits = logits.float()
        loss = token_nll(recentralise_top_k(logits, self.config.k, self.config.gamma), targets, mask).mean()
        return loss, {"prsl": float(loss.detach()), "ce": float(token_nll(logits.detach(), targets, mask).mean())}


@DEFENSES.register("ce", families=("captioner", "vqa"))
class CrossEntropyFineTune(GenerativeTask):
    """Plain cross-entropy fine-tuning with the same options and budget as PRSL (its control)."""

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        loss = token_nll(*self.logits(batch, batch["pixels"])).mean()
        return loss, {"ce": float(loss.detach())}
