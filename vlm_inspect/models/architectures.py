"""The architectures of the presets, as JSON-able dicts (what a checkpoint's ``config.json`` stores
under ``model.architecture``): the embedded shapes-world models and the full-size pretrained ones.

Building a module from one of these dicts is the job of :mod:`vlm_inspect.models.builders`.
"""
from __future__ import annotations

import copy
from typing import Any

from .tokenizers import build_shapes_tokenizer, shapes_vocabulary

SHAPES_CONTEXT = 24  # longest shapes-world text is ~20 tokens with <bos>/<eos>

# A ViT everywhere (TGA-ZSR needs patch tokens, CAPT/APD need deep prompts), with a small conv stem
# in place of the 8x8 patchify: a plain 8x8-patchify ViT learns shape slowly on this world while
# convolutions learn it fast. 64 px input, 8x8 grid of tokens, width 128.
# Measured here (docs/BASELINES.md): a bare 3-conv stem left shape at chance after 300 steps;
# one extra 3x3 conv per scale with GroupNorm started learning shape within 250 steps.
_STEM = {"type": "conv", "channels": [32, 64], "extra": 1, "norm": "group"}


def _shapes_vocab_size() -> int:
    return len(shapes_vocabulary())


def shapes_clip_architecture() -> dict[str, Any]:
    v = _shapes_vocab_size()
    return {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32,
                       "mlp_ratio": 4.0},
        "text_cfg": {"context_length": SHAPES_CONTEXT, "vocab_size": v, "width": 128, "heads": 4, "layers": 4,
                     "pool_type": "eos", "eos_id": v - 1, "pad_id": 0},
        "stem": copy.deepcopy(_STEM),
    }


def shapes_captioner_architecture() -> dict[str, Any]:
    from transformers import GPT2Config, ViTConfig, VisionEncoderDecoderConfig

    tok = build_shapes_tokenizer()
    enc = ViTConfig(image_size=64, patch_size=8, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                    intermediate_size=512)
    dec = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=128, n_layer=3, n_head=4,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id = tok.bos_token_id
    cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    return {**cfg.to_dict(), "stem": copy.deepcopy(_STEM)}


def shapes_vqa_architecture() -> dict[str, Any]:
    from transformers import BlipConfig

    tok = build_shapes_tokenizer()
    cfg = BlipConfig(
        # BLIP's vision default initializer_range is 1e-10 (it is always fine-tuned from pretrained
        # weights); from scratch that leaves every vision weight ~1e-10 and the model answers from the
        # question alone (measured: exact match stuck at 0.38), so use the usual 0.02.
        vision_config={"image_size": 64, "patch_size": 8, "hidden_size": 128, "intermediate_size": 512,
                       "num_hidden_layers": 4, "num_attention_heads": 4, "initializer_range": 0.02},
        text_config={"vocab_size": len(tok), "hidden_size": 128, "encoder_hidden_size": 128,
                     "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4,
                     "max_position_embeddings": 32, "bos_token_id": tok.bos_token_id,
                     "sep_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id},
        projection_dim=128, image_text_hidden_size=128,
    )
    return {**cfg.to_dict(), "stem": copy.deepcopy(_STEM)}


def vit_gpt2_architecture() -> dict[str, Any]:
    """nlpconnect/vit-gpt2-image-captioning: ViT-B/16 224 (in21k) encoder + GPT-2 (124M) decoder."""
    from transformers import GPT2Config, ViTConfig, VisionEncoderDecoderConfig

    enc = ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, qkv_bias=True)
    dec = GPT2Config(bos_token_id=50256, eos_token_id=50256)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id = 50256, 50256, 50256
    return cfg.to_dict()


def blip_vqa_base_architecture() -> dict[str, Any]:
    """Salesforce/blip-vqa-base: ViT-B/16 at 384 px + BERT-base question encoder and answer decoder."""
    from transformers import BlipConfig

    return BlipConfig(text_config={"vocab_size": 30524, "bos_token_id": 30522, "sep_token_id": 102,
                                   "pad_token_id": 0}).to_dict()
