"""VQA adapter over transformers' BlipForQuestionAnswering."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import decoding
from .base import Adapter, as_text_list, image_index_of, install_vit_stem
from .captioner import token_nll, pad_targets


class VqaAdapter(Adapter):
    """``answer(pixels, questions) -> list[str]`` and ``answer_nll(pixels, questions, answers) -> (B,)``.

    As in BLIP: the question is encoded with cross-attention to the image; the answer decoder starts
    from ``bos_token_id`` and ends with ``sep_token_id``.
    """

    family = "vqa"

    def vision_hidden(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model(pixel_values=self.normalize(pixels)).last_hidden_state

    def image_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C) mean of the vision model's output tokens, L2-normalised (as for the captioner)."""
        return F.normalize(self.vision_hidden(pixels).mean(1), dim=-1)

    def _questions(self, questions: list[str]) -> dict[str, torch.Tensor]:
        max_len = int(self.model.config.text_config.max_position_embeddings)
        enc = self.tokenizer(questions, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def _encode(self, pixels: torch.Tensor, questions: list[str],
                image_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        image_embeds = self.vision_hidden(pixels)
        if image_index is not None:
            image_embeds = image_embeds[image_index]
        q = self._questions(questions)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        question_embeds = self.model.text_encoder(
            input_ids=q["input_ids"], attention_mask=q["attention_mask"],
            encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
        ).last_hidden_state
        return question_embeds, q["attention_mask"]

    def answer_logits(self, pixels: torch.Tensor, questions: str | Sequence[str], answers: str | Sequence[str],
                      image_index: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced next-token logits (N, L, V) of each answer (``answer [SEP]``), with its (N, L)
        target ids and (N, L) mask of real tokens; ``image_index`` as in :meth:`answer_nll`."""
        image_index = image_index_of(image_index, pixels.shape[0], self.device)
        b = pixels.shape[0] if image_index is None else len(image_index)
        questions = as_text_list(questions, b, "questions")
        answers = as_text_list(answers, b, "answers")
        tcfg = self.model.config.text_config
        seqs = [ids + [tcfg.sep_token_id] for ids in self.tokenizer(answers, add_special_tokens=False)["input_ids"]]
        targets, mask = pad_targets(seqs, tcfg.pad_token_id, self.device)
        start = torch.full((b, 1), tcfg.bos_token_id, dtype=torch.long, device=self.device)
        decoder_input_ids = torch.cat([start, targets[:, :-1]], dim=1)
        decoder_mask = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], 1).long()
        question_embeds, question_mask = self._encode(pixels, questions, image_index)
        out = self.model.text_decoder(
            input_ids=decoder_input_ids, attention_mask=decoder_mask,
            encoder_hidden_states=question_embeds, encoder_attention_mask=question_mask,
        )
        return out.logits, targets, mask

    def answer_nll(self, pixels: torch.Tensor, questions: str | Sequence[str],
                   answers: str | Sequence[str], image_index: Sequence[int] | None = None) -> torch.Tensor:
        """(N,) mean token NLL of each answer (``answer [SEP]``) under teacher forcing.

        Without ``image_index`` there is one question per image (N = B). With it, question ``k`` is
        about image ``image_index[k]``: several questions share one pass of the vision model.
        """
        return token_nll(*self.answer_logits(pixels, questions, answers, image_index))

    @torch.no_grad()
    def answer(self, pixels: torch.Tensor, questions: str | Sequence[str], max_new_tokens: int = 10) -> list[str]:
        """Greedy answers, one per image, as ``BlipForQuestionAnswering.generate`` computes them (the
        decoder starts from ``bos`` and attends every question position, as in BLIP's own inference).

        The vision model and the question encoder (whose cross-attention reads every image token: compute
        bound) run at the enclosing autocast's precision; the decoding loop at the decoding precision
        (:func:`vlm_inspect.runtime.decoding`)."""
        questions = as_text_list(questions, pixels.shape[0], "questions")
        question_embeds = self._encode(pixels, questions)[0].float()
        tcfg = self.model.config.text_config
        with decoding():
            bos = torch.full((question_embeds.shape[0], 1), self.model.decoder_start_token_id, device=self.device)
            ids = self.model.text_decoder.generate(
                input_ids=bos, eos_token_id=tcfg.sep_token_id, pad_token_id=tcfg.pad_token_id,
                encoder_hidden_states=question_embeds,
                encoder_attention_mask=torch.ones(question_embeds.shape[:-1], dtype=torch.long, device=self.device),
                max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def build_vqa(arch: dict[str, Any]) -> nn.Module:
    """A BlipForQuestionAnswering with random weights from an architecture dict (HF config dict + stem)."""
    from transformers import BlipConfig, BlipForQuestionAnswering

    cfg = dict(arch)
    stem = cfg.pop("stem", None)
    model = BlipForQuestionAnswering(BlipConfig.from_dict(cfg))
    install_vit_stem(model.vision_model.embeddings, "patch_embedding", stem)
    return model


def make_vqa_adapter(name: str, model: nn.Module, tokenizer: Any, spec: dict[str, Any]) -> VqaAdapter:
    from .base import OPENAI_MEAN, OPENAI_STD

    size = int(model.config.vision_config.image_size)
    model.eval()
    return VqaAdapter(name, model, tokenizer, size, tuple(spec.get("mean", OPENAI_MEAN)),
                      tuple(spec.get("std", OPENAI_STD)), spec)


@torch.no_grad()
def copy_vit_encoder_into_blip(vit_encoder: nn.Module, blip_vision: nn.Module) -> None:
    """Initialise a BLIP vision model from a transformers ViT encoder of the same size (e.g. the
    shapes captioner's): stem, class and position embeddings, every layer (q/k/v fused into BLIP's
    qkv) and the final norm. Both are pre-norm ViTs, so the copy computes the same features (up to
    the LayerNorm epsilon)."""
    src = dict(vit_encoder.named_parameters())
    dst = dict(blip_vision.named_parameters())

    def put(d: str, value: torch.Tensor) -> None:
        if dst[d].shape != value.shape:
            raise ValueError(f"cannot copy into {d}: shape {tuple(value.shape)} vs {tuple(dst[d].shape)}")
        dst[d].copy_(value)

    put("embeddings.class_embedding", src["embeddings.cls_token"])
    put("embeddings.position_embedding", src["embeddings.position_embeddings"])
    for k, v in src.items():
        if k.startswith("embeddings.patch_embeddings.projection."):
            put("embeddings.patch_embedding." + k.removeprefix("embeddings.patch_embeddings.projection."), v)
    put("post_layernorm.weight", src["layernorm.weight"])
    put("post_layernorm.bias", src["layernorm.bias"])
    for i in range(len(blip_vision.encoder.layers)):
        s, d = f"layers.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            put(d + f"self_attn.qkv.{kind}", torch.cat([src[s + f"attention.{p}_proj.{kind}"] for p in "qkv"]))
            put(d + f"self_attn.projection.{kind}", src[s + f"attention.o_proj.{kind}"])
            put(d + f"layer_norm1.{kind}", src[s + f"layernorm_before.{kind}"])
            put(d + f"layer_norm2.{kind}", src[s + f"layernorm_after.{kind}"])
            put(d + f"mlp.fc1.{kind}", src[s + f"mlp.fc1.{kind}"])
            put(d + f"mlp.fc2.{kind}", src[s + f"mlp.fc2.{kind}"])
