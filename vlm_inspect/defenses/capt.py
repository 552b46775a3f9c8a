"""``--defense capt``: Consistency-guided Adversarial Prompt Tuning.

"Revisiting the Robust Generalization of Adversarial Prompt Tuning", arXiv 2405.11154,
https://arxiv.org/abs/2405.11154. A re-implementation from the paper's text (docs/METHODS.md): the authors'
code was not available to us.

    L = CE(p_θ(x'), y) + λ · mean_i [ (1 − α_i) · KL(p_θ(x_i) ‖ p_θ(x'_i)) + α_i · KL(p_θ0(x_i) ‖ p_θ(x'_i)) ]

θ = the frozen CLIP with learnable deep prompts in both encoders, θ0 = the same CLIP without prompts
(frozen, pre-trained), x' = PGD against θ. The first consistency term is TRADES-like (clean vs
adversarial prediction of the prompted model, gradients through both), the second lets the frozen
CLIP's clean prediction guide the adversarial one.

Faithful (verified from the paper, docs/METHODS.md): multimodal deep prompts in both encoders; PGD
adversarial examples; CE on x' plus λ times the α-mix of the trained-model and frozen-model
consistency terms above; α adapted from how reliable the frozen CLIP is.
Our choices (docs/METHODS.md): α_i = the frozen CLIP's probability of the true class on the clean image
(a reliable teacher is leaned on more); λ = 1; the prompts' shape, initialisation and training attack
are APD's (2 + 2 context tokens, depth 9 capped at the layer count, ``a photo of a``; PGD-Linf eps
1/255, step 1/255, 2 steps, random start). ``frozen_consistency = False`` drops the frozen-model term
(α = 0), the ablation of the paper's claim; the shapes-world recipe is in docs/REPRODUCTION.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .adversarial import PromptTuningTask, check_prompt_options, kl_per_sample
from .common import DEFENSES
from ..models.prompted import PromptedClip


@dataclass
class CAPTConfig:
    attack_eps: float = 1 / 255        # training PGD budget (docs/METHODS.md: our choice, as APD)
    attack_step: float = 1 / 255       # PGD step size (docs/METHODS.md: our choice)
    attack_steps: int = 2              # PGD steps (docs/METHODS.md: our choice)
    n_vision: int = 2                  # visual context tokens (docs/METHODS.md: APD's prompt shape)
    n_text: int = 2                    # text context tokens (docs/METHODS.md: APD's prompt shape)
    depth: int = 9                     # prompt depth (capped at the layer count)
    init_text: str = "a photo of a"    # text prompt initialisation
    modality: str = "both"             # both (paper: multimodal prompts) | vision | text
    consistency_weight: float = 1.0    # λ (docs/METHODS.md: our choice, default 1.0)
    frozen_consistency: bool = True    # the frozen-CLIP term with adaptive α (paper); False: α = 0 (ablation)

    def __post_init__(self) -> None:
        check_prompt_options(self)


@DEFENSES.register("capt", families=("clip",))
class CAPT(PromptTuningTask):
    Config = CAPTConfig
    key = "capt"

    def __init__(self, model, config, data) -> None:
        super().__init__(model, config, data)
        self.model = PromptedClip(model, self.make_prompts(*self.prompt_sizes()))

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        c, m = self.config, self.model
        x = batch["pixels"]
        y = batch["labels"].to(x.device)
        text = m.encode_text(self.class_texts)
        adv = self.attack_prompted(m, x, y, text)
        logits_adv = m.logits(m.encode_image(adv), text)
        logits_clean = m.logits(m.encode_image(x), text)
        ce = F.cross_entropy(logits_adv.float(), y)
        cons_train = kl_per_sample(logits_clean, logits_adv)
        parts = {"ce_adv": float(ce.detach()), "consistency_train": float(cons_train.detach().mean())}
        if c.frozen_consistency:
            with torch.no_grad():
                logits_frozen = self.base.logits(self.base.encode_image(x), self.text_features.to(x.device))
                alpha = logits_frozen.float().softmax(-1).gather(1, y[:, None])[:, 0]
            cons_frozen = kl_per_sample(logits_frozen, logits_adv)
            consistency = (1 - alpha) * cons_train + alpha * cons_frozen
            parts["consistency_frozen"] = float(cons_frozen.detach().mean())
            parts["alpha"] = float(alpha.mean())
        else:
            consistency = cons_train
        loss = ce + c.consistency_weight * consistency.mean()
        return loss, parts
