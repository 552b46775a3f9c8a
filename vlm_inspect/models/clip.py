"""CLIP-family adapter over open_clip models (the embedded ``shapes-clip`` and OpenAI / hub CLIPs)."""
from __future__ import annotations

import copy
import logging
from typing import Any, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention_from_tokens
from .base import (OPENAI_MEAN, OPENAI_STD, Adapter, PatchifyConv, as_text_list, install_vit_stem,
                   use_patchify_matmul)

log = logging.getLogger(__name__)


class ClipAdapter(Adapter):
    """Zero-shot classification, image/text embeddings and patch embeddings of an open_clip ViT.

    Shapes: ``pixels`` (B,3,H,W) in [0,1]; ``encode_image`` -> (B,D); ``encode_text`` -> (T,D);
    ``zero_shot_logits`` -> (B,T); ``patch_embeddings`` -> (B,N,D) with N = ``grid**2``.
    All embeddings are L2-normalised.
    """

    family = "clip"

    def __init__(self, name: str, model: nn.Module, tokenizer: Any, spec: dict[str, Any],
                 image_size: int, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD,
                 context_length: int = 77) -> None:
        super().__init__(name, model, tokenizer, image_size, mean, std, spec)
        self.context_length = int(context_length)

    # ---- text -------------------------------------------------------------------------------
    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """(T, context_length) token ids."""
        texts = as_text_list(texts)
        if hasattr(self.tokenizer, "unk_token_id"):  # a transformers tokenizer (the shapes vocabulary)
            ids = self.tokenizer(texts, padding="max_length", truncation=True,
                                 max_length=self.context_length, return_tensors="pt")["input_ids"]
        else:  # open_clip's own tokenizer object
            ids = self.tokenizer(texts)
        return ids.to(self.device)

    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """(T, D) L2-normalised text embeddings."""
        return F.normalize(self.model.encode_text(self.tokenize(texts)), dim=-1)

    # ---- image ------------------------------------------------------------------------------
    @property
    def grid(self) -> int:
        """Patches per side of the visual token grid."""
        g = self.model.visual.grid_size
        return int(g[0] if isinstance(g, (tuple, list)) else g)

    def projected_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 1+N, D): every token of the visual transformer after the final LayerNorm and the
        projection, *not* normalised; index 0 is the class token (the pooled image feature).

        One pass gives the image feature and the patch tokens, as TGA-ZSR's modified CLIP does.
        """
        visual = self.model.visual
        if not class_token_pooling(visual):
            raise NotImplementedError(f"{self.name}: patch tokens need a ViT with class-token pooling")
        x = visual._embeds(self.normalize(pixels))
        x = visual.transformer(x)
        x = visual.ln_post(x)
        if visual.proj is not None:
            x = x @ visual.proj
        return x

    def tokens_and_notes(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """:meth:`projected_tokens` and anything else the same forward pass tells about the first image,
        for the report (nothing, for a CLIP)."""
        return self.projected_tokens(pixels), {}

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised image embeddings.

        With class-token pooling only the class token leaves the last block, so that block runs its
        attention query, projection and MLP for the class token alone (keys and values still come from
        every token): the same result as open_clip's ``encode_image`` (tested to 1e-6 with gradients to
        the pixels) with a twelfth of ViT-B-32's work skipped, 4-9 % of an attack step
        (docs/BENCHMARKS.md). Any other visual tower runs open_clip's own path."""
        if not class_token_only_last_block(self.model.visual):
            return F.normalize(self.model.encode_image(self.normalize(pixels)), dim=-1)
        visual = self.model.visual
        x = visual._embeds(self.normalize(pixels))
        *blocks, last = visual.transformer.resblocks
        for block in blocks:
            x = block(x)
        y = last.ln_1(x)
        cls = x[:, :1] + last.ls_1(last.attention(q_x=y[:, :1], k_x=y, v_x=y))
        cls = cls + last.ls_2(last.mlp(last.ln_2(cls)))
        cls = visual.ln_post(cls[:, 0])
        if visual.proj is not None:
            cls = cls @ visual.proj
        return F.normalize(cls, dim=-1)

    def image_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode_image(pixels)

    def patch_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, N, D) patch tokens after the final norm and projection, each L2-normalised."""
        return F.normalize(self.projected_tokens(pixels)[:, 1:], dim=-1)

    def attention_map(self, tokens: torch.Tensor, text_features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, H, W) text-guided attention from :meth:`projected_tokens` (TGA-ZSR's map, docs/METHODS.md)."""
        return attention_from_tokens(tokens, text_features, self.grid, size)

    # ---- zero-shot --------------------------------------------------------------------------
    @property
    def logit_scale(self) -> torch.Tensor:
        """exp(logit_scale), capped at 100 as CLIP does."""
        return self.model.logit_scale.exp().clamp(max=100.0)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """(B,T) = scale * image_features @ text_features.T, both already normalised."""
        return self.logit_scale * image_features @ text_features.t()

    def zero_shot_logits(self, pixels: torch.Tensor, class_texts: str | Sequence[str]) -> torch.Tensor:
        """(B, T) scaled cosine similarities between each image and each class prompt."""
        return self.logits(self.encode_image(pixels), self.encode_text(class_texts))


def class_token_pooling(visual: nn.Module) -> bool:
    """The image feature is the class token after ``ln_post`` (no attention pooling, no pooling first)."""
    return getattr(visual, "attn_pool", None) is None and getattr(visual, "pool_type", "tok") == "tok" \
        and not getattr(visual, "final_ln_after_pool", False)


def class_token_only_last_block(visual: nn.Module) -> bool:
    """True for an open_clip ViT whose image feature is its class token after ``ln_post`` (and ``proj``)
    and whose blocks are plain batch-first self-attention blocks: then :meth:`ClipAdapter.encode_image`
    may compute the last block for the class token alone."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    transformer = getattr(visual, "transformer", None)
    return (isinstance(visual, VisionTransformer) and class_token_pooling(visual) and transformer is not None
            and getattr(transformer, "batch_first", False)
            and not getattr(transformer, "grad_checkpointing", False) and len(transformer.resblocks) >= 1
            and all(type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv") for b in transformer.resblocks))


# ---- building --------------------------------------------------------------------------------

def build_shapes_clip(arch: dict[str, Any], tokenizer: Any) -> nn.Module:
    """An open_clip ``CLIP`` from a custom architecture dict (embed_dim, vision_cfg, text_cfg, stem)."""
    cfg = copy.deepcopy(arch)
    stem = cfg.pop("stem", None)
    model = open_clip.model.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"],
                                 quick_gelu=cfg.get("quick_gelu", False))
    install_vit_stem(model.visual, "conv1", stem)
    return model


class SelfAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (batch first, self-attention) computed on contiguous 2-D matrices.

    Same parameters, state-dict keys and result as the module it replaces. PyTorch's version
    transposes a batch-first input to (N, B, D) before its projections, so their backward multiplies a
    non-contiguous 3-D gradient, which falls back to a batched product over a copy of the weight per
    image (the slowest part of a ViT-B-32 attack step under bf16 autocast; docs/BENCHMARKS.md has the
    measurement). Here the projections see (B*N, D) matrices and attention runs in
    ``scaled_dot_product_attention``.
    """

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if (key is not None and key is not query) or (value is not None and value is not query) \
                or key_padding_mask is not None or need_weights or query.dim() != 3:
            return super().forward(query, key if key is not None else query, value if value is not None else query,
                                   key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        b, n, d = query.shape
        h = self.num_heads
        qkv = F.linear(query.reshape(b * n, d), self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # the CPU's bf16 attention backward is ~7x slower than fp32 (ViT-B-32, batch 16); attention
            # is a small share of the FLOPs, so it runs in fp32 and the projections stay bf16
            q, k, v = q.float(), k.float(), v.float()
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = F.linear(out.transpose(1, 2).reshape(b * n, d), self.out_proj.weight, self.out_proj.bias)
        return out.view(b, n, d), None


def speed_up(model: nn.Module) -> nn.Module:
    """Swap the modules that are slow for attacks on CPU for exact equivalents with the same parameters:
    the patchify convolution (a matrix product) and batch-first self-attention (contiguous
    projections). State dicts, digests and results are unchanged; the speed-up is measured in
    docs/BENCHMARKS.md."""
    for mod in model.modules():
        if type(mod) is nn.MultiheadAttention and mod.batch_first and mod._qkv_same_embed_dim \
                and mod.in_proj_weight is not None and mod.bias_k is None and not mod.add_zero_attn:
            mod.__class__ = SelfAttention
    visual = getattr(model, "visual", None)
    if visual is not None:
        use_patchify_matmul(visual, "conv1")
    return model


def stock_copy(adapter):
    """A deep copy of ``adapter`` with open_clip's own modules back (undoes :func:`speed_up`), and how
    many modules were swapped back: the reference for the equivalence test and the torchattacks
    benchmark."""
    other = copy.deepcopy(adapter)
    swapped = 0
    for mod in other.modules():
        if type(mod) is SelfAttention:
            mod.__class__ = nn.MultiheadAttention
            swapped += 1
        for name, child in list(mod.named_children()):
            if type(child) is PatchifyConv:
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                 bias=child.bias is not None)
                conv.weight, conv.bias = child.weight, child.bias
                setattr(mod, name, conv)
                swapped += 1
    return other, swapped


def make_clip_adapter(name: str, model: nn.Module, tokenizer: Any, spec: dict[str, Any]) -> ClipAdapter:
    visual = model.visual
    size = visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    pre = getattr(visual, "preprocess_cfg", None) or {}
    mean = tuple(pre.get("mean", OPENAI_MEAN))
    std = tuple(pre.get("std", OPENAI_STD))
    ctx = int(getattr(model, "context_length", 77))
    speed_up(model)
    model.eval()
    return ClipAdapter(name, model, tokenizer, spec, image_size=size, mean=mean, std=std, context_length=ctx)
