"""Per-sample losses that an untargeted attack ascends (docs/ARCHITECTURE.md, "Objectives").

An objective is a callable ``pixels (B,3,H,W) -> loss (B,)`` that also carries ``.model`` (the
adapter), so attacks can put that model in eval mode and freeze its weights while they run.
Fixed inputs (class-prompt embeddings, clean image features) are computed once, without a graph.

:data:`OBJECTIVES` registers each with ``family`` (the models it applies to; None: any), ``inspects``
(the family whose model the app attacks with it), and the names of the curve's metric. The app builds
one from what the clean image gave (:class:`CleanView`, :meth:`Objective.for_inspection`), so a new
objective is one class plus its registration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..images import resize_pixels
from ..models.base import Adapter, as_text_list, families_of, serves
from ..registry import Registry

OBJECTIVES: Registry = Registry("objective")


@dataclass
class CleanView:
    """What an objective built for an inspection starts from: the request's texts and what the model said
    about the clean image (untargeted attacks push away from it; ``target`` pulls towards a class,
    caption or answer instead)."""

    pixels: torch.Tensor                       # (1, 3, H, W) the clean image at the model's input size
    prompts: Sequence[str] = ()
    classes: Sequence[str] = ()
    text_features: torch.Tensor | None = None  # (C, D) of ``prompts``, encoded once
    top1: int | None = None                    # the clean top-1 class
    caption: str | None = None                 # the clean caption
    question: str = ""
    answer: str | None = None                  # the clean answer
    target: str = ""


class Objective:
    """Base: subclasses set ``model`` and implement ``__call__``."""

    name = ""
    model: Adapter

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def for_inspection(cls, model: Adapter, view: CleanView) -> "Objective":  # pragma: no cover - interface
        """The objective an inspection of ``model`` attacks, from the clean image's :class:`CleanView`."""
        raise NotImplementedError

    def repeat(self, n: int) -> "Objective":
        """The same objective for a batch of ``n`` copies of its image (a robustness curve)."""
        return self

    @staticmethod
    def metric(loss: torch.Tensor) -> torch.Tensor:
        """The curve's metric from the loss: ``exp(-loss)`` (the probability of a label, the per-token
        probability of a text)."""
        return torch.exp(-loss)

    # Objectives that can tell whether the inputs of their last call are already misclassified support
    # early stopping (``Attack(..., early_stop=True)``): they implement ``fooled`` and ``subset``.
    def fooled(self) -> torch.Tensor:
        """(B,) bool: which inputs of the last call the model already gets wrong."""
        raise NotImplementedError(f"the {self.name} objective cannot tell when an attack has succeeded")

    def subset(self, index: torch.Tensor) -> "Objective":
        """The same objective for the images ``index`` of the batch."""
        raise NotImplementedError(f"the {self.name} objective cannot be restricted to part of a batch")

    def _require(self, family: str) -> None:
        if not serves(self.model, family):
            raise ValueError(f"the {self.name} objective needs a {family} model, got "
                             f"{getattr(self.model, 'name', self.model)!r} ({'/'.join(map(str, families_of(self.model)))})")


@OBJECTIVES.register("zero-shot", family="clip", inspects="clip", metric="p(clean top-1 class)",
                     target_metric="p(target class)")
class ZeroShotCE(Objective):
    """Cross-entropy of the zero-shot logits against ``labels`` (indices into ``class_texts``)."""

    name = "zero-shot"

    def __init__(self, model: Adapter, class_texts: Sequence[str], labels: int | Sequence[int] | torch.Tensor,
                 text_features: torch.Tensor | None = None):
        self.model = model
        self._require("clip")
        self.class_texts = as_text_list(class_texts, what="class texts")
        if len(self.class_texts) < 2:
            raise ValueError("zero-shot classification needs at least two class texts")
        self.labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if ((self.labels < 0) | (self.labels >= len(self.class_texts))).any():
            raise ValueError(f"labels must be class indices in [0, {len(self.class_texts) - 1}]")
        if text_features is not None:  # already encoded (a training loop reuses them every step)
            self.text_features = text_features.detach()
        else:
            with torch.no_grad():
                self.text_features = model.encode_text(self.class_texts)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.logits(self.model.encode_image(pixels), self.text_features)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        labels = self.labels.to(pixels.device).expand(pixels.shape[0]) if self.labels.numel() == 1 else \
            self.labels.to(pixels.device)
        if labels.shape[0] != pixels.shape[0]:
            raise ValueError(f"got {labels.shape[0]} labels for {pixels.shape[0]} images")
        logits = self.logits(pixels)
        self._fooled = (logits.detach().argmax(-1) != labels)
        return self._loss(logits, labels)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, reduction="none")

    def fooled(self) -> torch.Tensor:
        return self._fooled

    @classmethod
    def for_inspection(cls, model: Adapter, view: CleanView) -> "ZeroShotCE":
        label = list(view.classes).index(view.target) if view.target else view.top1
        return cls(model, view.prompts, [label], text_features=view.text_features)

    # subclasses that change only the loss (DLR, margin) inherit these: the same objective, other labels
    def repeat(self, n: int) -> "ZeroShotCE":
        return type(self)(self.model, self.class_texts, self.labels.repeat(n), text_features=self.text_features)

    def subset(self, index: torch.Tensor) -> "ZeroShotCE":
        labels = self.labels if self.labels.numel() == 1 else self.labels[index.to(self.labels.device)]
        return type(self)(self.model, self.class_texts, labels, text_features=self.text_features)


@OBJECTIVES.register("caption", family="captioner", inspects="captioner", metric="per-token p(clean caption)",
                     target_metric="per-token p(target caption)")
class CaptionNLL(Objective):
    """Mean token NLL of ``captions`` (the clean caption, or a target caption for targeted attacks)."""

    name = "caption"

    def __init__(self, model: Adapter, captions: str | Sequence[str]):
        self.model = model
        self._require("captioner")
        self.captions = captions

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.caption_nll(pixels, self.captions)

    @classmethod
    def for_inspection(cls, model: Adapter, view: CleanView) -> "CaptionNLL":
        return cls(model, [view.target or view.caption])

    def repeat(self, n: int) -> "CaptionNLL":
        return CaptionNLL(self.model, _repeat(self.captions, n))


@OBJECTIVES.register("vqa", family="vqa", inspects="vqa", metric="per-token p(clean answer)",
                     target_metric="per-token p(target answer)")
class AnswerNLL(Objective):
    """Mean token NLL of ``answers`` to ``questions``."""

    name = "vqa"

    def __init__(self, model: Adapter, questions: str | Sequence[str], answers: str | Sequence[str]):
        self.model = model
        self._require("vqa")
        self.questions, self.answers = questions, answers

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.answer_nll(pixels, self.questions, self.answers)

    @classmethod
    def for_inspection(cls, model: Adapter, view: CleanView) -> "AnswerNLL":
        return cls(model, [view.question], [view.target or view.answer])

    def repeat(self, n: int) -> "AnswerNLL":
        return AnswerNLL(self.model, _repeat(self.questions, n), _repeat(self.answers, n))


# any family's image embedding; the app attacks the CLIP side's with it. It has no target, and its
# gradient is zero at the clean image (so it needs an attack with a random start).
@OBJECTIVES.register("embedding", family=None, inspects="clip", metric="cos(adversarial, clean embedding)",
                     target_metric=None, targetable=False, needs_random_start=True)
class EmbeddingCosine(Objective):
    """Task-agnostic feature attack: ``1 - cos(f(x'), f(x_clean))`` on the model's image embedding.
    Works for every family (CLIP image embedding, captioner/VQA vision encoder).

    The gradient is zero at the clean image itself (the cosine is maximal there), so attack it with
    a random start (PGD): FGSM/BIM started from the clean image do not move."""

    name = "embedding"

    def __init__(self, model: Adapter, clean_pixels: torch.Tensor):
        self.model = model
        with torch.no_grad():
            self.clean_features = model.image_embedding(clean_pixels)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        ref = self.clean_features
        if ref.shape[0] == 1 and pixels.shape[0] > 1:
            ref = ref.expand(pixels.shape[0], -1)
        return 1.0 - F.cosine_similarity(self.model.image_embedding(pixels), ref, dim=-1)

    @classmethod
    def for_inspection(cls, model: Adapter, view: CleanView) -> "EmbeddingCosine":
        return cls(model, view.pixels)

    @staticmethod
    def metric(loss: torch.Tensor) -> torch.Tensor:
        return 1.0 - loss  # the cosine itself


# ---- difference-of-logits-ratio losses -----------------------------------------------------------
# Difference-of-logits-ratio losses for zero-shot classification — Croce & Hein, ICML 2020
# (https://arxiv.org/abs/2003.01690), the losses of APGD-DLR and APGD-T.
#
# With the zero-shot logits ``z`` sorted decreasingly (``z_π1 ≥ z_π2 ≥ …``):
#
# - DLR: ``−(z_y − max_{i≠y} z_i) / (z_π1 − z_π3)``, which is invariant to shifting and rescaling the
#   logits (so a model cannot hide behind a large or small logit scale); it needs three classes;
# - targeted DLR (towards class ``t``): ``−(z_y − z_t) / (z_π1 − (z_π3 + z_π4) / 2)``; four classes.
#
# Both are climbed (an untargeted attack: ``targeted=False``), both tell which images are wrong
# (``fooled``: the top-1 is no longer ``y``) and can be restricted to part of a batch. Faithful to the
# paper's definitions (checked against the authors' code in tests/test_apgd.py, with its 1e-12 in the
# denominator). They are registered without ``inspects``: the app's task list keeps the CE objective,
# the ensemble uses these.

def dlr(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) DLR of (B, C) logits for the true ``labels``."""
    ranked = logits.sort(dim=1, descending=True).values
    true = logits.gather(1, labels.view(-1, 1))[:, 0]
    top_is_true = logits.argmax(1) == labels
    other = torch.where(top_is_true, ranked[:, 1], ranked[:, 0])
    return -(true - other) / (ranked[:, 0] - ranked[:, 2] + 1e-12)


def targeted_dlr(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) targeted DLR of (B, C) logits: the true class against the target class."""
    ranked = logits.sort(dim=1, descending=True).values
    true = logits.gather(1, labels.view(-1, 1))[:, 0]
    target = logits.gather(1, targets.view(-1, 1))[:, 0]
    return -(true - target) / (ranked[:, 0] - 0.5 * (ranked[:, 2] + ranked[:, 3]) + 1e-12)


@OBJECTIVES.register("zero-shot-dlr", family="clip")
class ZeroShotDLR(ZeroShotCE):
    """DLR of the zero-shot logits against ``labels`` (see the module docstring)."""

    name = "zero-shot-dlr"
    least_classes = 3

    def __init__(self, model, class_texts: Sequence[str], labels, text_features: torch.Tensor | None = None):
        super().__init__(model, class_texts, labels, text_features)
        if len(self.class_texts) < self.least_classes:
            raise ValueError(f"the {self.name} loss needs at least {self.least_classes} classes, "
                             f"got {len(self.class_texts)}")

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return dlr(logits.float(), labels)



@OBJECTIVES.register("zero-shot-dlr-targeted", family="clip")
class ZeroShotTargetedDLR(ZeroShotDLR):
    """Targeted DLR of the zero-shot logits: ``labels`` against ``targets`` (see the module docstring)."""

    name = "zero-shot-dlr-targeted"
    least_classes = 4

    def __init__(self, model, class_texts: Sequence[str], labels, targets, text_features: torch.Tensor | None = None):
        self.targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
        super().__init__(model, class_texts, labels, text_features)
        if self.targets.shape != self.labels.shape:
            raise ValueError(f"got {self.targets.numel()} targets for {self.labels.numel()} labels")

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = self.targets.to(labels.device).expand_as(labels) if self.targets.numel() == 1 else \
            self.targets.to(labels.device)
        return targeted_dlr(logits.float(), labels, targets)

    def subset(self, index: torch.Tensor) -> "ZeroShotTargetedDLR":
        pick = (lambda t: t if t.numel() == 1 else t[index.to(t.device)])
        return ZeroShotTargetedDLR(self.model, self.class_texts, pick(self.labels), pick(self.targets),
                                   text_features=self.text_features)

    def repeat(self, n: int) -> "ZeroShotTargetedDLR":
        return ZeroShotTargetedDLR(self.model, self.class_texts, self.labels.repeat(n), self.targets.repeat(n),
                                   text_features=self.text_features)


# The score Square climbs in the ensemble: the margin ``max_{i≠y} z_i − z_y`` of the zero-shot logits
# (positive once the image is misclassified), the authors' default loss for their Square attack.
def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) best other logit minus the true logit."""
    true = logits.gather(1, labels.view(-1, 1))[:, 0]
    others = logits.scatter(1, labels.view(-1, 1), float("-inf"))
    return others.max(1).values - true


@OBJECTIVES.register("zero-shot-margin", family="clip")
class ZeroShotMargin(ZeroShotCE):
    """Logit margin of the zero-shot logits against ``labels`` (climbed: the best other class minus the true one)."""

    name = "zero-shot-margin"

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return margin(logits.float(), labels)



def _repeat(texts: str | Sequence[str], n: int) -> str | list[str]:
    """One text per image for ``n`` copies of one image (a single string already serves every image)."""
    return texts if isinstance(texts, str) else list(texts) * n


def zero_shot_ce(model: Adapter, class_texts: Sequence[str], labels,
                 text_features: torch.Tensor | None = None) -> ZeroShotCE:
    return ZeroShotCE(model, class_texts, labels, text_features=text_features)


def caption_nll(model: Adapter, captions: str | Sequence[str]) -> CaptionNLL:
    return CaptionNLL(model, captions)


def answer_nll(model: Adapter, questions: str | Sequence[str], answers: str | Sequence[str]) -> AnswerNLL:
    return AnswerNLL(model, questions, answers)


def embedding_cosine(model: Adapter, clean_pixels: torch.Tensor) -> EmbeddingCosine:
    return EmbeddingCosine(model, clean_pixels)


# ---- one image against several models at once ----------------------------------------------------
# The ensemble attack of Liu et al., "Delving into Transferable Adversarial Examples and Black-box
# Attacks", ICLR 2017 (https://arxiv.org/abs/1611.02770): an image that fools several white-box models
# together is more likely to fool an unseen one. Faithful: the loss is the mean of the models' losses on
# the same image. Our choices: equal weights (the paper tunes them); each model sees the image at its
# own input size (bilinear, antialiased: the resize the app uses to show one side's image to the other
# side's model, so a model is judged on the image it was attacked through); ``fooled`` means every model
# is fooled, so early stop keeps attacking an image until none of the models gets it right.

class Ensemble(Objective):
    """The mean of ``parts``' losses on one batch; ``sizes[i]`` is part i's input size (None: as given)."""

    name = "ensemble"

    def __init__(self, parts: Sequence[Objective], sizes: Sequence[int | None] | None = None) -> None:
        self.parts = list(parts)
        if not self.parts:
            raise ValueError("an ensemble needs at least one objective")
        self.sizes = list(sizes) if sizes is not None else [None] * len(self.parts)
        if len(self.sizes) != len(self.parts):
            raise ValueError(f"got {len(self.sizes)} input sizes for {len(self.parts)} objectives")
        # the attack's model guard (eval mode, frozen weights) must reach every model; a model two
        # parts share is guarded once
        models = list({id(p.model): p.model for p in self.parts if isinstance(p.model, nn.Module)}.values())
        self.model = nn.ModuleList(models)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        total = None
        for part, size in zip(self.parts, self.sizes):
            loss = part(pixels if size is None else resize_pixels(pixels, size)).float()
            total = loss if total is None else total + loss
        return total / len(self.parts)

    def repeat(self, n: int) -> "Ensemble":
        return Ensemble([p.repeat(n) for p in self.parts], self.sizes)

    def fooled(self) -> torch.Tensor:
        return torch.stack([p.fooled() for p in self.parts]).all(0)

    def subset(self, index: torch.Tensor) -> "Ensemble":
        return Ensemble([p.subset(index) for p in self.parts], self.sizes)

__all__ = ["OBJECTIVES", "CleanView", "Ensemble", "ZeroShotDLR", "ZeroShotMargin", "margin", "ZeroShotTargetedDLR", "dlr", "targeted_dlr", "AnswerNLL", "CaptionNLL", "EmbeddingCosine", "Objective", "ZeroShotCE", "answer_nll",
           "caption_nll", "embedding_cosine", "zero_shot_ce"]
