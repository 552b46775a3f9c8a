"""What the captioning and VQA defenses share: which part of the model trains (``part``, the paper of
arXiv 2407.21174 compares decoder-only, full and encoder-only training), the batch (reference
captions, or every question of a shapes scene), the teacher-forced logits of the reference text,
and partial checkpoints (only the trained tensors, on top of the base model they name)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..checkpoints import weights_digest
from .base import RecordBatches

# decoder: the language side trains, the vision encoder is frozen (captioner: the GPT-2 decoder with its
# cross-attention; VQA: BLIP's question encoder and answer decoder); full: everything; encoder: the
# vision encoder only.
PARTS = ("decoder", "full", "encoder")


def vision_encoder(model) -> torch.nn.Module:
    """The image encoder of a captioner (ViT) or VQA model (BLIP's vision model), or the one an adapter names
    (a LLaVA's vision tower)."""
    own = getattr(model, "vision_module", None)
    if callable(own):
        return own()
    if model.family == "captioner":
        return model.model.encoder
    if model.family == "vqa":
        return model.model.vision_model
    raise ValueError(f"{model.name} is a {model.family} model; expected a captioner or a VQA model")


def select_part(model, part: str) -> None:
    """Set ``requires_grad`` so that only ``part`` of ``model`` trains."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; valid: {', '.join(PARTS)}")
    vision = {id(p) for p in vision_encoder(model).parameters()}
    for p in model.model.parameters():
        p.requires_grad_(part == "full" or (part == "encoder") == (id(p) in vision))


@dataclass
class GenerativeConfig:
    part: str = "decoder"        # which part trains: decoder | full | encoder (see PARTS)
    all_questions: bool = True   # vqa on the shapes world: every question of each scene per step (as --defense base)


class GenerativeTask(RecordBatches):
    """Fine-tuning of a trained captioner or VQA model; subclasses write :meth:`loss` with
    :meth:`logits` / :meth:`nll`. The checkpoint holds the trained part only (``partial``)."""

    families = ("captioner", "vqa")
    Config = GenerativeConfig

    def __init__(self, model, config, data) -> None:
        super().__init__(model, config, data)
        self.base_digest = weights_digest(model.model)  # the weights the partial checkpoint sits on
        select_part(model, config.part)

    def logits(self, batch: dict[str, Any], pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced (logits, targets, mask) of the batch's reference captions or answers."""
        m = self.model
        if m.family == "captioner":
            return m.caption_logits(pixels, batch["captions"])
        return m.answer_logits(pixels, batch["questions"], batch["answers"], image_index=batch.get("image_index"))

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return self.trained_tensors()

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"part": self.config.part}
