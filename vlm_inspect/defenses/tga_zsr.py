"""``--defense tga-zsr``: Text-Guided Attention for Zero-Shot Robustness.

Yu et al., "Text-Guided Attention is All You Need for Zero-Shot Robustness in Vision-Language
Models", NeurIPS 2024, https://arxiv.org/abs/2410.21802 (code: github.com/zhyblue424/TGA-ZSR).

    L = CE(s·f_θ(x')·Tᵀ, y) + α · mean_i d(A_θ(x'_i), A_θ0(x_i)) + β · mean_i d(A_θ(x_i), A_θ0(x_i))

A(x) is the text-guided attention map for the true class prompt (:mod:`vlm_inspect.explain.attention`),
θ0 a frozen copy of the model before fine-tuning, d the L2 distance between maps.

Faithful to the authors' code at 5f2b31c (docs/METHODS.md): the map (final LayerNorm and projection on every
token, dot product with the normalised class-prompt embedding, min-max over patches, bilinear
upsampling to the input size), with the code's channel-over-tokens normalisation (``token_norm =
"authors-code"``; ``"feature"`` gives the paper's per-token one); α = 0.08 (attention refinement), β =
0.05 (attention-based model constraint); L2 distance, with cosine and L1 as options; training PGD-Linf
eps 1/255, step 1/255, 2 steps, random start, on the CLIP logits' CE; visual encoder trained, text
encoder frozen; logit scale capped at 100.
Our choices: the logits and the map of x' come from one forward pass (the same numbers as two);
the optimiser, schedule and, for the shapes world, eps / steps / learning rate come from the training
command (docs/REPRODUCTION.md; the paper's SGD lr 1e-4, momentum 0.9, wd 0, 1000 warm-up steps, batch
128 are one set of CLI flags away).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..explain.attention import attention_from_tokens
from .adversarial import ZeroShotTask, frozen_copy, vision_tower
from .common import DEFENSES

DISTANCES = ("l2", "cos", "l1")


def map_distance(a: torch.Tensor, b: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """(B,) distance between (B, H, W) attention maps: L2 norm, 1 - cosine, or L1 norm of the difference."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    if kind == "l2":
        return (a - b).norm(p=2, dim=1)
    if kind == "l1":
        return (a - b).abs().sum(dim=1)
    if kind == "cos":
        return 1.0 - F.cosine_similarity(a, b, dim=1)
    raise ValueError(f"unknown distance {kind!r}; valid: {', '.join(DISTANCES)}")


@dataclass
class TGAZSRConfig:
    attack_eps: float = 1 / 255       # training PGD budget (paper §4.1 / code: epsilon 1/255)
    attack_step: float = 1 / 255      # PGD step size (code: stepsize 1/255)
    attack_steps: int = 2             # PGD steps (code: numsteps 2)
    refine_weight: float = 0.08       # α, attention refinement (paper and code: 0.08)
    constraint_weight: float = 0.05   # β, attention-based model constraint (paper and code: 0.05)
    distance: str = "l2"              # l2 (paper) | cos | l1 (the paper's ablation options)
    token_norm: str = "authors-code"  # how patch tokens are normalised: authors-code (verified) | feature


@DEFENSES.register("tga-zsr", families=("clip",))
class TGAZSR(ZeroShotTask):
    Config = TGAZSRConfig
    key = "tga-zsr"

    def __init__(self, model, config, data) -> None:
        if config.distance not in DISTANCES:
            raise ValueError(f"unknown distance {config.distance!r}; valid: {', '.join(DISTANCES)}")
        super().__init__(model, config, data)
        self.frozen = frozen_copy(model)  # θ0: never updated (not in trainable_parameters)

    def _frozen_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """θ0's tokens, computed through the same CPU kernels as θ's. PyTorch picks other (fused) kernels
        when no weight requires grad, whose rounding differs by ~1e-6; then the model-constraint term
        would not be exactly 0 at the start, where θ = θ0. So θ0's weights require grad for the pass,
        and the result is detached (θ0 gets no gradient and is never updated)."""
        weights = list(vision_tower(self.frozen).parameters())
        for p in weights:
            p.requires_grad_(True)
        try:
            return self.frozen.projected_tokens(x).detach()
        finally:
            for p in weights:
                p.requires_grad_(False)

    def _map(self, tokens: torch.Tensor, text: torch.Tensor, size) -> torch.Tensor:
        return attention_from_tokens(tokens, text, self.model.grid, size, self.config.token_norm)

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        c, m = self.config, self.model
        x = batch["pixels"]
        labels = batch["labels"].to(x.device)
        text = self.text_features.to(x.device)
        adv = self.attack(batch)
        size = tuple(x.shape[-2:])
        tokens_adv = m.projected_tokens(adv)
        logits = m.logits(F.normalize(tokens_adv[:, 0], dim=-1), text)
        ce = F.cross_entropy(logits.float(), labels)
        parts = {"ce_adv": float(ce.detach())}
        loss = ce
        if c.refine_weight or c.constraint_weight:
            frozen_clean = self._map(self._frozen_tokens(x), text[labels], size)
            refine = map_distance(self._map(tokens_adv, text[labels], size), frozen_clean, c.distance).mean()
            loss = loss + c.refine_weight * refine
            parts["attention_refinement"] = float(refine.detach())
            if c.constraint_weight:
                constraint = map_distance(self._map(m.projected_tokens(x), text[labels], size), frozen_clean,
                                          c.distance).mean()
                loss = loss + c.constraint_weight * constraint
                parts["attention_constraint"] = float(constraint.detach())
        return loss, parts
