"""``--defense advpt``: plain adversarial prompt tuning, the baseline APD and CAPT compare against.

    L = mean_i CE(z_θ(x'_i), y_i)      x' = PGD against θ, θ = the frozen CLIP with deep prompts

The APD and CAPT papers report their gains over adversarial prompt tuning: the prompt learner of a
clean method (visual, textual or both: AdvVP, AdvTP, AdvVLP, AdvMaPLe in their tables) trained with
cross-entropy on adversarial images made on the fly against the prompted model. This is that baseline
in the bimodal IVLP shape, i.e. the AdvVLP row, so that it differs from APD and CAPT in the loss only.

Faithful (to the baseline as both papers describe it): cross-entropy on PGD images, no clean term, no
distillation and no consistency; prompts only, every CLIP weight frozen; the adversarial images are
made against the prompted model at every step.
Our choices (docs/METHODS.md): the prompt shape, initialisation and training attack are exactly APD's
and CAPT's (2 + 2 context tokens, depth 9 capped at the layer count, ``a photo of a``; PGD-Linf eps
1/255, step 1/255, 2 steps, random start), so a comparison at equal budget changes the loss alone;
``modality`` vision / text gives the AdvVP / AdvTP rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .adversarial import PromptTuningTask, check_prompt_options
from .common import DEFENSES
from ..models.prompted import PromptedClip


@dataclass
class AdvPTConfig:
    attack_eps: float = 1 / 255        # training PGD budget (as APD and CAPT: docs/METHODS.md)
    attack_step: float = 1 / 255       # PGD step size (as APD and CAPT)
    attack_steps: int = 2              # PGD steps (as APD and CAPT)
    n_vision: int = 2                  # visual context tokens (APD's prompt shape)
    n_text: int = 2                    # text context tokens (APD's prompt shape)
    depth: int = 9                     # prompt depth (capped at the layer count)
    init_text: str = "a photo of a"    # text prompt initialisation
    modality: str = "both"             # both (AdvVLP) | vision (AdvVP) | text (AdvTP)

    def __post_init__(self) -> None:
        check_prompt_options(self)


@DEFENSES.register("advpt", families=("clip",))
class AdvPT(PromptTuningTask):
    Config = AdvPTConfig
    key = "advpt"

    def __init__(self, model, config, data) -> None:
        super().__init__(model, config, data)
        self.model = PromptedClip(model, self.make_prompts(*self.prompt_sizes()))

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        m = self.model
        x = batch["pixels"]
        y = batch["labels"].to(x.device)
        text = m.encode_text(self.class_texts)
        adv = self.attack_prompted(m, x, y, text)
        logits = m.logits(m.encode_image(adv), text)
        ce = F.cross_entropy(logits.float(), y)
        with torch.no_grad():
            acc = float((logits.argmax(-1) == y).float().mean())
        return ce, {"ce_adv": float(ce.detach()), "acc_adv": acc}
