"""What the CLIP defenses share: class prompts from the training data, a frozen copy of the model,
the training-time PGD on zero-shot cross-entropy, the zero-shot classification batch, and (for APD and
CAPT) prompt tuning on a frozen CLIP."""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import PGD
from ..objectives import ZeroShotCE
from ..images import to_pixels
from .common import Task
from ..checkpoints import weights_digest
from ..models.prompted import DeepPrompts, PromptedClip, prompt_spec

MODALITIES = ("both", "vision", "text")  # which encoders get prompts (APD's unimodal ablations)


def class_prompts(data: Any, defense: str) -> list[str]:
    """The prompt of every class of a classification data set (shapes datasets, ImageFolder, ...)."""
    prompts = list(getattr(data, "prompts", None) or [])
    if getattr(data, "kind", "classification") != "classification" or len(prompts) < 2:
        raise ValueError(f"--defense {defense} trains zero-shot classification: give a classification data set "
                         f"with at least two classes (e.g. shapes:shapes-combo or imagefolder:<dir>), not {data!r}")
    return prompts


def frozen_copy(adapter):
    """A deep copy of ``adapter`` in eval mode with every weight frozen (θ0 in docs/METHODS.md)."""
    frozen = copy.deepcopy(adapter)
    frozen.eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def vision_tower(model) -> nn.Module:
    """The vision encoder a CLIP defense trains: the adapter's ``vision_module()`` (a transformers CLIP's
    vision model and projection), else open_clip's ``visual``."""
    return model.vision_module() if hasattr(model, "vision_module") else model.model.visual


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
    default_data = "shapes:shapes-combo"  # zero-shot classification of colour-shape pairs (held-out pairs excluded)
    trains_visual = True  # the visual encoder is trained (TeCoA, TGA-ZSR); prompt tuning trains no weight

    def __init__(self, model, config, data) -> None:
        super().__init__(model, config, data)
        self.class_texts = class_prompts(data, self.key)
        for p in model.parameters():
            p.requires_grad_(False)
        if self.trains_visual:
            for p in vision_tower(model).parameters():
                p.requires_grad_(True)
        with torch.no_grad():  # the frozen text encoder's class-prompt features
            self.text_features = model.encode_text(self.class_texts)
        self.base_digest = weights_digest(model.model)  # θ0's weights, which the checkpoint sits on

    def checkpoint_tensors(self) -> dict[str, torch.Tensor] | None:
        """The visual encoder only (the text encoder is frozen): a partial checkpoint."""
        return self.trained_tensors() if self.trains_visual else None

    def collate(self, records: list[dict[str, Any]], step: int) -> dict[str, Any]:
        return {"pixels": to_pixels([r["image"] for r in records], self.model.image_size),
                "labels": torch.tensor([int(r["label"]) for r in records]),
                "index": [r.get("index", -1) for r in records]}

    def attack(self, batch: dict[str, Any]) -> torch.Tensor:
        c = self.config
        t = self.text_features.to(batch["pixels"].device)
        return pgd_zero_shot(self.model, batch["pixels"], batch["labels"].to(t.device), self.class_texts, t,
                             c.attack_eps, c.attack_step, c.attack_steps)


def kl_per_sample(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(B,) KL(softmax(target_logits) ‖ softmax(logits)) = Σ_c p_c (log p_c − log q_c), in fp32."""
    log_p = F.log_softmax(target_logits.float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def check_prompt_options(c) -> None:
    """What a prompt defense's options must satisfy, checked when the options are made (so that a manifest's
    plan refuses them, not a training run hours later): a known modality, at least one prompt layer, and no
    more text context tokens than ``init_text`` has words to start them from (a tokenizer makes at least one
    token of a word, so no model needs to be loaded for it)."""
    if c.modality not in MODALITIES:
        raise ValueError(f"unknown modality {c.modality!r}; valid: {', '.join(MODALITIES)}")
    if c.depth < 1 or c.n_vision < 0 or c.n_text < 0:
        raise ValueError(f"depth must be >= 1 and n_vision, n_text >= 0 (got {c.depth}, {c.n_vision}, {c.n_text})")
    if c.modality != "vision" and c.n_text > len(c.init_text.split()):
        raise ValueError(f"init_text {c.init_text!r} has fewer than n_text={c.n_text} words (each text context "
                         "token starts from one of its words)")


class PromptTuningTask(ZeroShotTask):
    """A CLIP defense that learns deep prompts (:mod:`.prompts`) on a frozen CLIP: every model weight is
    frozen, the class prompts' text features are recomputed each step (text prompts move them), and the
    checkpoint holds the prompts only, naming the base model and its weights digest."""

    trains_visual = False

    def __init__(self, model, config, data) -> None:
        super().__init__(model, config, data)
        self.base = model  # θ0: the frozen CLIP without prompts (its text features: self.text_features)

    def make_prompts(self, n_vision: int, n_text: int) -> DeepPrompts:
        c = self.config  # check_prompt_options has checked n_text against init_text's words
        return DeepPrompts(self.base, n_vision=n_vision, n_text=n_text, depth=c.depth, init_text=c.init_text)

    def prompt_sizes(self) -> tuple[int, int]:
        c = self.config
        return (c.n_vision if c.modality != "text" else 0), (c.n_text if c.modality != "vision" else 0)

    def attack_prompted(self, model: PromptedClip, x: torch.Tensor, labels: torch.Tensor,
                        text: torch.Tensor) -> torch.Tensor:
        c = self.config
        return pgd_zero_shot(model, x, labels, self.class_texts, text.detach(), c.attack_eps, c.attack_step,
                             c.attack_steps)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.modules_to_save().parameters() if p.requires_grad]

    def modules_to_save(self) -> nn.Module:
        return self.model.prompts

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"prompts": prompt_spec(self.model.prompts, self.config.init_text), "base_digest": self.base_digest}
