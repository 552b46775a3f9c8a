"""``--defense fare``: FARE, unsupervised adversarial fine-tuning of CLIP's vision encoder.

Schlarmann, Singh, Croce and Hein, "Robust CLIP: Unsupervised Adversarial Fine-Tuning of Vision Embeddings
for Robust Large Vision-Language Models", ICML 2024, https://arxiv.org/abs/2402.12336
(code: github.com/chs20/RobustVLM; published models: ``hf-hub:chs20/fare2-clip``, ``hf-hub:chs20/fare4-clip``).

    L(θ) = E_x  max_{‖x' − x‖∞ ≤ ε}  ‖φ_θ(x') − φ_θ0(x)‖²₂

φ_θ is the image embedding of the encoder being trained, φ_θ0 that of the frozen original: the
fine-tuned encoder must map every perturbed image to where the *original* encoder put the clean one.
No labels and no text are used, so every model built on the original embedding (zero-shot CLIP, the
vision tower of a LLaVA) keeps working with the robust encoder in its place (docs/METHODS.md).

Faithful (verified from the authors' training code, RobustVLM at commit d257a53): the loss is the
squared L2 distance (summed over the embedding, averaged over the batch) of the *unnormalised* image
embeddings (the projected class token; the authors' ``output_normalize False``);
the inner maximisation is PGD-Linf on the same loss with a uniform random start, 10 steps of 1/255 at
ε = 4/255 (FARE⁴; ``--set attack_eps=2/255`` gives FARE²); θ0 is a frozen copy of the model before
fine-tuning, computed on the clean image; the whole vision encoder trains and the text encoder is not
touched; ``clean_weight`` 0 (the paper's FARE; a positive value adds λ·‖φ_θ(x) − φ_θ0(x)‖², their
ablation); the model is in eval mode during the attack and the inner loss is the outer one. The authors'
optimiser is AdamW, lr 1e-5, weight decay 1e-4, cosine schedule, 20k steps with 1400 warm-up steps on
ImageNet training images: one command line away (README, "FARE at paper scale").
Our choices: the optimiser, schedule and precision come from the shared training loop; the shapes-world
recipe (250 steps of 64 images at lr 1e-4, ε 4/255: TeCoA's batch, learning rate and ε, half its steps since
each step runs a 10-step attack) is in docs/REPRODUCTION.md; labels of a classification data set are ignored (they only feed the zero-shot
evaluation the loop prints).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..attacks import PGD
from ..checkpoints import weights_digest
from ..images import to_pixels
from .adversarial import frozen_copy, vision_tower
from .common import DEFENSES, Task


def image_embedding_raw(model, pixels: torch.Tensor) -> torch.Tensor:
    """(B, D) the image embedding before L2 normalisation: the projected class token (FARE's φ)."""
    return model.projected_tokens(pixels)[:, 0]


class EmbeddingDistance:
    """The objective FARE's inner PGD climbs: (B,) ``‖φ(x') − target‖²₂`` for fixed target embeddings."""

    name = "fare-embedding"

    def __init__(self, model, target: torch.Tensor) -> None:
        self.model = model
        self.target = target.detach()

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return squared_distance(image_embedding_raw(self.model, pixels), self.target)


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) squared L2 distance between (B, D) embeddings, in fp32."""
    return (a.float() - b.float()).pow(2).sum(-1)


@dataclass
class FAREConfig:
    attack_eps: float = 4 / 255    # training PGD budget (paper: FARE^4 eps 4/255, FARE^2 eps 2/255)
    attack_step: float = 1 / 255   # PGD step size (code: --stepsize_adv 1)
    attack_steps: int = 10         # PGD steps (code: --iterations_adv 10)
    clean_weight: float = 0.0      # λ of a clean term (code: --clean_weight 0 for FARE)


@DEFENSES.register("fare", families=("clip",))
class FARE(Task):
    families = ("clip",)
    Config = FAREConfig
    # the images only; a classification set also lets the loop report zero-shot accuracy as it trains
    default_data = "shapes:shapes-combo"

    def __init__(self, model, config, data) -> None:
        super().__init__(model, config, data)
        c = config
        if not 0 <= c.clean_weight <= 1:
            raise ValueError(f"clean_weight must be in [0, 1], got {c.clean_weight}")
        if c.attack_eps < 0 or c.attack_steps < 0 or c.attack_step < 0:
            raise ValueError("attack_eps, attack_step and attack_steps must be >= 0")
        if getattr(model, "prompts", None) is not None:
            raise ValueError(f"--defense fare fine-tunes a CLIP's vision encoder; {model.name!r} is a prompted CLIP: "
                             "train FARE on its base model")
        visual = vision_tower(model)
        self.frozen = frozen_copy(model)  # θ0: where the original encoder puts each clean image
        for p in model.parameters():
            p.requires_grad_(False)
        for p in visual.parameters():
            p.requires_grad_(True)
        self.base_digest = weights_digest(model.model)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor] | None:
        """The vision encoder only (nothing else moves): a partial checkpoint on the base model."""
        return self.trained_tensors()

    def collate(self, records: list[dict[str, Any]], step: int) -> dict[str, Any]:
        return {"pixels": to_pixels([r["image"] for r in records], self.model.image_size),
                "index": [r.get("index", -1) for r in records]}

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        x = batch["pixels"]
        with torch.no_grad():
            target = image_embedding_raw(self.frozen, x).float()
        adv = x
        if c.attack_eps > 0 and c.attack_steps > 0:
            adv = PGD(eps=c.attack_eps, alpha=c.attack_step, steps=c.attack_steps, random_start=True)(
                x, EmbeddingDistance(self.model, target)).adv
        adv_loss = squared_distance(image_embedding_raw(self.model, adv), target).mean()
        parts = {"embedding_l2_adv": float(adv_loss.detach())}
        loss = adv_loss
        if c.clean_weight > 0:
            clean_loss = squared_distance(image_embedding_raw(self.model, x), target).mean()
            loss = (1 - c.clean_weight) * adv_loss + c.clean_weight * clean_loss
            parts["embedding_l2_clean"] = float(clean_loss.detach())
        return loss, parts
