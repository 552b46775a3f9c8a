"""``--defense base``: plain training of each family, used for the embedded baselines.

* clip — symmetric contrastive (InfoNCE) loss between images and texts, CLIP's objective (Radford
  et al. 2021). Texts that are identical within a batch count as positives of each other (soft
  targets), because the shapes world repeats captions. On the shapes world the text side gets the
  augmentations docs/SHAPES_WORLD.md allows: a prefix (``a photo of`` / ``an image of`` / ``there is``),
  the count-bearing ``{one|two|three} shapes: <caption>``, and partial captions for single objects.
* captioner — teacher-forced cross-entropy of the canonical (or a reference) caption.
* vqa — teacher-forced cross-entropy of the answer. On the shapes world each image contributes every
  question of its scene (``all_questions``; the vision model runs once per image), and the vision model
  can start from the trained captioner's ViT (``vision_init``) with a smaller learning rate
  (``vision_lr_scale``). docs/BASELINES.md has the measurements behind these choices.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..images import to_pixels
from .common import DEFENSES, Task

COUNT_WORDS = ("one", "two", "three")


@dataclass
class BaseConfig:
    prefix_prob: float = 0.5     # P(prepend "a photo of" / "an image of" / "there is") - our choice
    count_prob: float = 0.2      # P(count-bearing variant "{n} shapes: <caption>") - our choice
    partial_prob: float = 0.5    # P(partial caption) for single-object scenes - our choice
    vision_init: str = ""        # vqa only: a captioner checkpoint whose ViT encoder initialises BLIP's
                                 # vision model (see docs/BASELINES.md) - our choice
    vision_lr_scale: float = 1.0  # vqa only: learning-rate factor of the vision model - our choice
    all_questions: bool = True   # vqa on the shapes world: every question of each scene per step - our choice


def shapes_text(record: dict[str, Any], rng: random.Random, cfg: BaseConfig) -> str:
    """One training text for a shapes-world record, with the augmentations docs/SHAPES_WORLD.md allows."""
    scene = record["scene"]
    text = record["caption"]
    objects = scene.objects
    if len(objects) == 1 and rng.random() < cfg.partial_prob:
        o = objects[0]
        text = rng.choice([f"a {o.colour} {o.shape}", f"a {o.shape}", f"a {o.colour} object"])
    r = rng.random()
    if r < cfg.prefix_prob:
        text = f"{rng.choice(('a photo of', 'an image of', 'there is'))} {text}"
    elif r < cfg.prefix_prob + cfg.count_prob:
        text = f"{COUNT_WORDS[len(objects) - 1]} shapes: {text}"
    return text


def record_text(record: dict[str, Any], data: Any, rng: random.Random, cfg: BaseConfig) -> str:
    if "scene" in record and record.get("caption"):
        return shapes_text(record, rng, cfg)
    if getattr(data, "kind", "") == "classification":
        return data.prompts[record["label"]]
    refs = record.get("captions") or [record["caption"]]
    return rng.choice(refs)


def scene_questions(record: dict[str, Any], step: int, seed: int) -> list[tuple[str, str]]:
    """Every (question, answer) of a shapes-world record's scene, never naming a held-out pair (training
    data); the yes/no question's pair is drawn afresh per step. Falls back to the record's own pair."""
    from ..data.shapes import questions

    rng = np.random.default_rng([seed, step, record.get("index", 0)])
    try:
        return questions(record["scene"], rng, allow_held_out=False)
    except ValueError:  # the scene itself shows a held-out pair (not a training split)
        return [(record["question"], record["answer"])]


def sample_rng(step: int, records: list[dict[str, Any]], seed: int) -> random.Random:
    return random.Random(f"{seed}:{step}:{records[0].get('index', 0) if records else 0}")


class RecordBatches(Task):
    """The batches of plain training, shared by every task that trains on records as they come: the
    images with one augmented text each (CLIP), a reference caption (captioner), or the questions
    (VQA: every question of a shapes scene when ``config.all_questions``)."""

    def collate(self, records: list[dict[str, Any]], step: int) -> dict[str, Any]:
        family = self.model.family
        batch: dict[str, Any] = {"pixels": to_pixels([r["image"] for r in records], self.model.image_size),
                                 "index": [r.get("index", -1) for r in records]}
        rng = sample_rng(step, records, getattr(self.config, "seed", 0))
        if family == "clip":
            batch["texts"] = [record_text(r, self.data, rng, self.config) for r in records]
        elif family == "captioner":
            batch["captions"] = [rng.choice(r.get("captions") or [r["caption"]]) for r in records]
        elif self.config.all_questions and all("scene" in r for r in records):
            batch["questions"], batch["answers"], batch["image_index"] = [], [], []
            for j, r in enumerate(records):
                for q, a in scene_questions(r, step, getattr(self.config, "seed", 0)):
                    batch["questions"].append(q)
                    batch["answers"].append(a)
                    batch["image_index"].append(j)
        else:
            batch["questions"] = [r["question"] for r in records]
            batch["answers"] = [r["answer"] for r in records]
        return batch


@DEFENSES.register("base", families=("clip", "captioner", "vqa"))
class BaseTask(RecordBatches):
    families = ("clip", "captioner", "vqa")
    Config = BaseConfig

    def __init__(self, model, config, data) -> None:
        super().__init__(model, config, data)
        if config.vision_init:
            if model.family != "vqa":
                raise ValueError("the vision_init option applies to vqa models only")
            from ..models import load
            from ..models.vqa import copy_vit_encoder_into_blip

            source = load("shapes-captioner", weights=config.vision_init)
            copy_vit_encoder_into_blip(source.model.encoder, model.model.vision_model)

    def lr_scales(self) -> dict[int, float]:
        if self.model.family != "vqa" or self.config.vision_lr_scale == 1.0:
            return {}
        return {id(p): self.config.vision_lr_scale for p in self.model.model.vision_model.parameters()}

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        m = self.model
        x = batch["pixels"]
        if m.family == "clip":
            return clip_contrastive_loss(m, x, batch["texts"])
        if m.family == "captioner":
            loss = m.caption_nll(x, batch["captions"]).mean()
            return loss, {"caption_ce": float(loss.detach())}
        loss = m.answer_nll(x, batch["questions"], batch["answers"], image_index=batch.get("image_index")).mean()
        return loss, {"answer_ce": float(loss.detach())}


def clip_contrastive_loss(model, pixels: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
    """Symmetric InfoNCE; identical texts are positives of each other."""
    image = model.encode_image(pixels)
    text = model.encode_text(texts)
    logits = (model.logit_scale * image @ text.t()).float()
    ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    tid = torch.tensor([ids[t] for t in texts], device=logits.device)
    same = (tid[:, None] == tid[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    return loss, {"contrastive": float(loss.detach()), "logit_scale": float(model.logit_scale.detach())}
