"""CLIP-family adapter over transformers' ``CLIPModel`` (``openai/clip-vit-base-patch32``, robust hub CLIPs,
any ``save_pretrained`` folder with ``model_type: "clip"``).

It computes what :class:`~vlm_inspect.models.clip.ClipAdapter` computes for an open_clip ViT, with the same
shapes and meaning, so every attack, heatmap and CLIP defense runs on it unchanged:

* image feature = ``visual_projection(post_layernorm(CLS))`` (``CLIPModel.get_image_features``), L2-normalised;
* text feature = ``CLIPModel.get_text_features`` (pooled at the end-of-text token), L2-normalised;
* ``projected_tokens`` = every token of the last hidden state through ``post_layernorm`` and
  ``visual_projection`` (index 0 = the class token), as TGA-ZSR's modified CLIP gives them;
* ``logit_scale`` = ``exp(logit_scale)`` capped at 100, as CLIP does.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import OPENAI_MEAN, OPENAI_STD, use_patchify_matmul
from .clip import ClipAdapter


def _pooled(out: Any) -> torch.Tensor:
    """The projected pooled feature: transformers 5 returns an output object (``pooler_output``), 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFClipAdapter(ClipAdapter):
    """Zero-shot classification, embeddings and patch tokens of a transformers ``CLIPModel``.

    Shapes: ``pixels`` (B,3,H,W) in [0,1]; ``encode_image`` -> (B,D); ``encode_text`` -> (T,D);
    ``projected_tokens`` -> (B,1+N,D) with N = ``grid**2``; D = ``config.projection_dim``.
    """

    # ---- text -------------------------------------------------------------------------------
    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """(T, D) L2-normalised text embeddings. No attention mask is needed: the text tower is causal and
        pools at the first end-of-text token, so the padding after it changes nothing."""
        return F.normalize(_pooled(self.model.get_text_features(input_ids=self.tokenize(texts))), dim=-1)

    # ---- image ------------------------------------------------------------------------------
    @property
    def grid(self) -> int:
        """Patches per side of the visual token grid."""
        vc = self.model.config.vision_config
        return int(vc.image_size) // int(vc.patch_size)

    def projected_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 1+N, D): every token of the last hidden state after ``post_layernorm`` and
        ``visual_projection``, *not* normalised; index 0 is the class token (the pooled image feature)."""
        vision = self.model.vision_model
        hidden = vision(pixel_values=self.normalize(pixels)).last_hidden_state  # (B, 1+N, width), before the norm
        return self.model.visual_projection(vision.post_layernorm(hidden))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised image embeddings (``get_image_features``)."""
        return F.normalize(_pooled(self.model.get_image_features(pixel_values=self.normalize(pixels))), dim=-1)

    # ---- what the defenses and Grad-CAM reach for ---------------------------------------------
    def vision_module(self) -> nn.Module:
        """The trainable vision tower: the vision transformer and its projection (open_clip's ``visual``)."""
        return nn.ModuleList([self.model.vision_model, self.model.visual_projection])

    def vision_blocks(self) -> nn.ModuleList:
        """The vision transformer's blocks, each (B, 1+N, width) -> (B, 1+N, width) (open_clip's
        ``visual.transformer.resblocks``)."""
        return self.model.vision_model.encoder.layers

    # ---- zero-shot --------------------------------------------------------------------------
    @property
    def logit_scale(self) -> torch.Tensor:
        """exp(logit_scale), capped at 100 as CLIP does (transformers' own forward does not cap it)."""
        return self.model.logit_scale.exp().clamp(max=100.0)


def make_hf_clip_adapter(name: str, model: nn.Module, tokenizer: Any, spec: dict[str, Any]) -> HFClipAdapter:
    """Wrap a ``CLIPModel``: input size from its config, normalisation from the spec (a folder's
    ``preprocessor_config.json``, else OpenAI's), context length from the text config."""
    cfg = model.config
    # the attacks and defenses compute in fp32 (precision is autocast's job); a hub folder saved in fp16 is cast
    model.float()
    # same parameters and state-dict keys, a matrix product instead of the slow CPU convolution (docs/BENCHMARKS.md)
    use_patchify_matmul(model.vision_model.embeddings, "patch_embedding")
    model.eval()
    return HFClipAdapter(name, model, tokenizer, spec, image_size=int(cfg.vision_config.image_size),
                         mean=tuple(spec.get("mean", OPENAI_MEAN)), std=tuple(spec.get("std", OPENAI_STD)),
                         context_length=int(cfg.text_config.max_position_embeddings))


def build_hf_clip(arch: dict[str, Any]) -> nn.Module:
    """A random-weight ``CLIPModel`` from an architecture dict (``CLIPConfig.to_dict()``)."""
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig.from_dict(arch))


def clip_vit_b32_architecture() -> dict[str, Any]:
    """openai/clip-vit-base-patch32: ViT-B/32 at 224 px (width 768, 12 layers), text width 512, 12 layers,
    77 tokens, vocabulary 49408, projection 512 (transformers' ``CLIPConfig`` defaults are this model)."""
    from transformers import CLIPConfig

    return CLIPConfig().to_dict()
