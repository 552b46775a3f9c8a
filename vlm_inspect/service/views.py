"""Each model's outputs on an image, computed once: :class:`ModelViews`.

The clean outputs of a model on an image (zero-shot probabilities with the heatmap, or the caption /
answer) are cached by model, weights, image, texts, heatmap, top-k and precision, so moving the
epsilon slider only recomputes the adversarial half. Class-prompt features are cached per model too.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..explain import HEATMAPS, attention_shift, overlay
from ..images import image_pixels, pixels_to_uint8
from ..objectives import OBJECTIVES, CleanView, Objective
from .outputs import ClipOutputs, Outputs, TextBatch, TextOutputs, display, top_k
from .request import InspectRequest

CLEAN_CACHE = 64   # clean outputs kept (model x image x texts)
TEXT_CACHE = 32    # class-prompt feature sets kept


class ModelViews:
    """Outputs of models on images for the requests of one service. ``stamp(name)`` tells when the
    weights behind a model name changed on disk (the cache keys carry it)."""

    def __init__(self, device: str, stamp: Callable[[str], Any]) -> None:
        self.device = device
        self._stamp = stamp
        self._clean: OrderedDict[tuple, Outputs] = OrderedDict()
        self._text: dict[tuple, torch.Tensor] = {}

    def pixels(self, model, img) -> torch.Tensor:
        return image_pixels(img, model.image_size, loaded=True).to(self.device)  # run_* loaded it once

    def class_features(self, model, prompts: list[str]) -> torch.Tensor:
        """(C, D) text features of the class prompts, encoded once per model and prompt list."""
        key = ((model.name, self._stamp(model.name)), tuple(prompts))
        hit = self._text.get(key)
        if hit is None:
            with torch.no_grad():
                hit = self._text[key] = model.encode_text(prompts).float()
            while len(self._text) > TEXT_CACHE:
                self._text.pop(next(iter(self._text)))
        return hit

    def clip_view(self, model, px: torch.Tensor, req: InspectRequest, top: int | None = None):
        """Zero-shot probabilities (C,), the heatmap (H, W) for class ``top`` (default: the top-1) and the
        model's notes for the report (e.g. a ConSE model's ImageNet classes). A heatmap that reads the
        tokens (text-guided attention) comes from the same forward pass as the probabilities."""
        text = self.class_features(model, req.prompts)
        with torch.no_grad():
            tokens, notes = model.tokens_and_notes(px)
            tokens = tokens.float()
        heatmap, uses_tokens = HEATMAPS.get(req.heatmap), HEATMAPS.meta(req.heatmap).get("uses_tokens", False)
        # the small products after the encoder run in fp32 even under autocast: exact probabilities
        with torch.no_grad(), torch.autocast(torch.device(self.device).type, enabled=False):
            probs = model.logits(F.normalize(tokens[:, 0], dim=-1), text).softmax(-1)[0]
            top = int(probs.argmax()) if top is None else top
            if uses_tokens:
                heat = heatmap(model, px, req.prompts[top], text[top:top + 1], tokens=tokens)[0].float()
                return probs, top, heat, notes
        return probs, top, heatmap(model, px, req.prompts[top], text[top:top + 1])[0].float(), notes

    def clean(self, model, img, digest: str, req: InspectRequest, texts: TextBatch | None = None,
              family: str | None = None) -> Outputs:
        """The model's outputs on the clean image as the ``family`` model (default: its own; a LLaVA is a
        captioner and a VQA model), cached. A caption or answer is queued in ``texts`` (filled in, and
        cached, by :meth:`generate`); without ``texts`` it is generated at once."""
        kind = torch.device(self.device).type  # the precision the outputs are computed at is part of the key
        precision = str(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else "fp32"
        family = family or model.family
        clip = family == "clip"
        key = ((model.name, self._stamp(model.name)), digest, family, tuple(req.prompts) if clip else (),
               req.question if family == "vqa" else "", req.heatmap if clip else "", req.top_k, precision)
        hit = self._clean.get(key)
        if hit is not None:
            self._clean.move_to_end(key)
            return hit
        if texts is not None and key in texts.pending:  # the other side's, same model: queued once
            return texts.pending[key]
        px = self.pixels(model, img)
        if clip:
            probs, top, heat, notes = self.clip_view(model, px, req)
            out = ClipOutputs(probs, top, heat, overlay(display(pixels_to_uint8(px)), heat),
                              top_k(probs, req.classes, req.top_k), notes, attention_text=req.prompts[top])
            self._remember(key, out)
            return out
        text_out = TextOutputs(question=req.question if family == "vqa" else None)
        queue = TextBatch() if texts is None else texts
        queue.add(model, px, req.question, text_out, key, family)
        if texts is None:
            self.generate(queue)
        return text_out

    def adversarial(self, model, adv: torch.Tensor, clean: Outputs, req: InspectRequest,
                    texts: TextBatch, family: str | None = None) -> Outputs:
        """The model's outputs on the adversarial image as the ``family`` model (default: its own); a caption
        or answer is queued in ``texts``."""
        if isinstance(clean, ClipOutputs):
            top = clean.top
            probs, _, adv_map, notes = self.clip_view(model, adv, req, top=top)  # the map for the clean top-1's text
            return ClipOutputs(probs, top, adv_map, overlay(display(pixels_to_uint8(adv)), adv_map),
                               top_k(probs, req.classes, req.top_k), notes,
                               confidence_change=round(float(probs[top] - clean.probs[top]), 6),
                               top1_changed=int(probs.argmax()) != top,
                               attention_shift=round(float(attention_shift(clean.heat[None], adv_map[None])[0]), 6))
        out = TextOutputs()
        texts.add(model, adv, req.question, out, family=family)
        return out

    def _remember(self, key: tuple, out: Outputs) -> None:
        self._clean[key] = out
        while len(self._clean) > CLEAN_CACHE:
            self._clean.popitem(last=False)

    def generate(self, texts: TextBatch, clean_only: bool = False) -> None:
        """Generate the queued captions and answers (one batched call per model; with ``clean_only`` those
        of the clean image) and cache the clean ones, now complete."""
        for key, out in texts.run(clean_only):
            self._remember(key, out)

    def objective(self, model, req: InspectRequest, clean: Outputs, px: torch.Tensor) -> Objective:
        """The objective the request attacks ``model`` with, from what the clean image gave."""
        view = CleanView(pixels=px, prompts=req.prompts, classes=req.classes, question=req.question,
                         target=req.target_text)
        if isinstance(clean, ClipOutputs):
            view.top1, view.text_features = clean.top, self.class_features(model, req.prompts)
        else:
            view.caption, view.answer = clean.caption, clean.answer
        return OBJECTIVES.get(req.target).for_inspection(model, view)
