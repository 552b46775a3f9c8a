"""Captioner adapter over transformers' VisionEncoderDecoderModel (ViT encoder + GPT-2 decoder)."""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import decoding
from .base import Adapter, as_text_list, install_vit_stem


class _UnpaddedBatch(logging.Filter):
    """Drops transformers' warning that a batch's attention mask cannot be inferred when the pad token is
    the end token (GPT-2's): every caption of a batch starts from the one start token, so no row is
    padded and the all-ones mask transformers falls back to is right (tests/test_service.py checks a
    batch against one image at a time). transformers emits it once per process (``warning_once``), so
    once dropped here it stays silent for the rest of the process."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "cannot be inferred from input because pad token is same as eos token" not in record.getMessage()


@contextlib.contextmanager
def _quiet_unpadded_batch():
    logger, quiet = logging.getLogger("transformers.generation.utils"), _UnpaddedBatch()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def token_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL over the unmasked target tokens of each sequence: (B,L,V),(B,L),(B,L) -> (B,)."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)


def pad_targets(seqs: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id sequences: (B, L) targets and a (B, L) float mask of real tokens."""
    length = max(len(s) for s in seqs)
    targets = torch.full((len(seqs), length), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), length))
    for i, s in enumerate(seqs):
        targets[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return targets.to(device), mask.to(device)


class CaptionerAdapter(Adapter):
    """``generate(pixels) -> list[str]`` and ``caption_nll(pixels, captions) -> (B,)``.

    Captions are scored as ``words <eos>`` after the decoder start token, under teacher forcing.
    """

    family = "captioner"

    def encoder_hidden(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 1+N, C) last hidden state of the vision encoder."""
        return self.model.encoder(pixel_values=self.normalize(pixels)).last_hidden_state

    def image_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C) mean of the encoder's output tokens, L2-normalised."""
        return F.normalize(self.encoder_hidden(pixels).mean(1), dim=-1)

    def _targets(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer
        eos = self.model.config.eos_token_id
        if eos is None:
            eos = tok.eos_token_id
        seqs = [ids + [eos] for ids in tok(captions, add_special_tokens=False)["input_ids"]]
        max_len = int(getattr(self.model.config.decoder, "n_positions", 1024))
        seqs = [s[: max_len - 1] for s in seqs]
        pad = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else eos
        return pad_targets(seqs, pad, self.device)

    def caption_logits(self, pixels: torch.Tensor, captions: str | Sequence[str]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced next-token logits (B, L, V) of each caption, with its (B, L) target ids and
        (B, L) mask of real tokens (the loss of a defense that reshapes the logits, e.g. PRSL)."""
        captions = as_text_list(captions, pixels.shape[0], "captions")
        targets, mask = self._targets(captions)
        start = torch.full((targets.shape[0], 1), self.model.config.decoder_start_token_id,
                           dtype=torch.long, device=self.device)
        decoder_input_ids = torch.cat([start, targets[:, :-1]], dim=1)
        out = self.model(pixel_values=self.normalize(pixels), decoder_input_ids=decoder_input_ids,
                         decoder_attention_mask=torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], 1).long())
        return out.logits, targets, mask

    def caption_nll(self, pixels: torch.Tensor, captions: str | Sequence[str]) -> torch.Tensor:
        """(B,) mean token NLL of each caption (one per image, or one for all) under teacher forcing."""
        return token_nll(*self.caption_logits(pixels, captions))

    @torch.no_grad()
    def generate(self, pixels: torch.Tensor, max_new_tokens: int = 20, num_beams: int = 1) -> list[str]:
        """Greedy (or beam) captions, one per image. The image encoder runs at the enclosing autocast's
        precision, the decoding loop at the decoding precision (:func:`vlm_inspect.runtime.decoding`)."""
        from transformers.modeling_outputs import BaseModelOutput

        cfg = self.model.config
        image = self.model.encoder(pixel_values=self.normalize(pixels)).last_hidden_state.float()
        with decoding(), _quiet_unpadded_batch():
            ids = self.model.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=image), max_new_tokens=max_new_tokens,
                num_beams=num_beams, do_sample=False, decoder_start_token_id=cfg.decoder_start_token_id,
                eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
            )
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def build_captioner(arch: dict[str, Any]) -> nn.Module:
    """A VisionEncoderDecoderModel with random weights from an architecture dict (HF config dict + stem)."""
    from transformers import VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    cfg = dict(arch)
    stem = cfg.pop("stem", None)
    config = VisionEncoderDecoderConfig.from_dict(cfg)
    model = VisionEncoderDecoderModel(config=config)
    install_vit_stem(model.encoder.embeddings.patch_embeddings, "projection", stem)
    return model


def make_captioner_adapter(name: str, model: nn.Module, tokenizer: Any, spec: dict[str, Any]) -> CaptionerAdapter:
    enc = model.config.encoder
    mean = tuple(spec.get("mean", (0.5, 0.5, 0.5)))
    std = tuple(spec.get("std", (0.5, 0.5, 0.5)))
    model.eval()
    return CaptionerAdapter(name, model, tokenizer, int(enc.image_size), mean, std, spec)
