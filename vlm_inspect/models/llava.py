"""LLaVA (transformers ``LlavaForConditionalGeneration``, e.g. ``llava-hf/llava-1.5-7b-hf``) as a captioner
and a VQA model at once, and the swap of its CLIP vision tower for another CLIP's.

What is faithful to LLaVA-1.5 and what is our choice:

* **The conversation** is the model's own chat template: the template files of its folder
  (``chat_template.jinja``, the processor's ``chat_template.json``), else ``tokenizer.chat_template``,
  applied with ``add_generation_prompt=True`` to one user turn holding the image and the prompt (the
  content-list format of LLaVA's processor). Only a folder with no template at all falls back to
  LLaVA-1.5's ``USER: <image>\\n{prompt} ASSISTANT:`` (:data:`LLAVA15_CHAT_TEMPLATE`). A BOS token is put
  first unless the template writes it, as ``LlavaProcessor`` tokenizes.
* **The image tokens**: the one ``<image>`` token of the prompt is expanded to as many tokens as the vision
  tower gives features, as ``LlavaProcessor`` does: ``(image_size / patch_size)^2``, plus one (the class
  token) under ``vision_feature_select_strategy="full"``; the projected features of the tower's layer
  ``vision_feature_layer`` take their place, as in transformers' own forward (a test checks it is equal).
* **Captions** answer :data:`CAPTION_PROMPT` (our choice); **answers** follow LLaVA-1.5's short-answer
  prompt for VQAv2 / GQA: the question, a new line, :data:`SHORT_ANSWER`.
* **Pixels**: (B, 3, H, W) in [0, 1] at the vision tower's ``image_size`` (shorter side resized, centre
  crop: the package's one preprocessing, which is ``CLIPImageProcessor``'s; LLaVA-1.5's original code pads
  to a square instead), normalised inside the adapter with the folder's ``preprocessor_config.json`` mean
  and std (OpenAI CLIP's when it has none).
* **Scores**: teacher-forced mean token NLL of ``target <eos>`` after the prompt, (B,), differentiable to
  the pixels. Sequences are right-padded for scoring (a causal model's real tokens do not see the padding
  after them) and left-padded for batched greedy / beam generation (positions follow the attention mask).
* **Precision**: the weights keep the dtype their folder was saved in (transformers' ``dtype="auto"``;
  float16 for llava-1.5-7b); nothing here casts them (a swapped tower is cast to the LLaVA's dtype). float32
  weights follow the service's autocast (the request's precision; the decoding loop at the decoding
  precision, :func:`vlm_inspect.runtime.decoding`); float16 / bfloat16 weights compute in their own dtype
  with autocast off (:meth:`LlavaAdapter.own_precision`). Pixels, their gradient and the NLL stay float32.
  fp16 / bf16 on a GPU could not be exercised on the CPU-only machine this was written on; the tests run a
  tiny fp32 model, and the same model cast to float16 under a CPU bfloat16 autocast.

**Vision-tower swap** (:func:`with_vision_tower`): ``<llava>|tower=<clip>`` is a model name (the
service caches it, a page side holds it) whose LLaVA reads images through the vision encoder of another
CLIP (e.g. a robust one, as in Schlarmann et al. 2024, "Robust CLIP"): an open_clip ViT (its weights
mapped onto transformers' ``CLIPVisionModel``) or a transformers ``CLIPModel``'s ``vision_model``. The
projector and the language model are LLaVA's own, *shared* with every other loaded variant of the same
LLaVA (one copy of the language model in memory, however many towers). The tower must give the width
the projector reads and have the layer LLaVA reads; its image size and patch may differ (the number of
image tokens follows the tower).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import weakref
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import CheckpointError
from ..runtime import decoding
from .base import OPENAI_MEAN, OPENAI_STD, Adapter, as_text_list, image_index_of
from .captioner import token_nll

log = logging.getLogger(__name__)

TOWER_SEP = "|tower="  # ``<llava>|tower=<clip>``; "|" appears in no preset, hub id or sane folder name
CAPTION_PROMPT = "Describe the image in one sentence."
SHORT_ANSWER = "Answer the question using a single word or phrase."
# llava-hf's template (its processor's chat_template.json) without the training-only generation tags
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
_PROMPT_CACHE = 1024  # tokenised prompts kept per adapter (the caption prompt, the questions seen)


# ---- names -------------------------------------------------------------------------------------------

def split_tower(name: str) -> tuple[str, str | None]:
    """``"<llava>|tower=<clip>"`` -> (``<llava>``, ``<clip>``); any other name -> (name, None)."""
    base, sep, tower = str(name).partition(TOWER_SEP)
    if not sep:
        return base, None
    if not base.strip() or not tower.strip():
        raise ValueError(f"{name!r}: write a vision-tower swap as <llava>{TOWER_SEP}<clip>, both parts named")
    if TOWER_SEP in tower:
        raise ValueError(f"{name!r}: a vision tower cannot itself carry a {TOWER_SEP} part")
    return base, tower


def tower_name(base: str, tower: str) -> str:
    """The model name of LLaVA ``base`` reading images through ``tower`` (replacing any tower it had)."""
    return f"{split_tower(base)[0]}{TOWER_SEP}{tower}"


# ---- the adapter -------------------------------------------------------------------------------------

class LlavaAdapter(Adapter):
    """A LLaVA serving two families: ``generate`` / ``caption_logits`` / ``caption_nll`` (captioner) and
    ``answer`` / ``answer_logits`` / ``answer_nll`` (VQA), plus ``image_embedding``. ``self.model`` is the
    ``LlavaForConditionalGeneration``. See the module docstring for what is LLaVA-1.5's and what is ours."""

    family = "captioner"              # the primary family: what a checkpoint's config records
    families = ("captioner", "vqa")   # every family it serves (models.base.serves)

    def __init__(self, name: str, model: nn.Module, tokenizer: Any, spec: dict[str, Any], image_size: int,
                 mean: Sequence[float], std: Sequence[float], chat_template: str) -> None:
        super().__init__(name, model, tokenizer, image_size, mean, std, spec)
        cfg = model.config
        self.chat_template = chat_template
        self.image_token_id = int(cfg.image_token_id)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else cfg.text_config.eos_token_id
        self.eos_id = int(eos[0] if isinstance(eos, (list, tuple)) else eos)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else cfg.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        self.caption_prompt = str(spec.get("caption_prompt", CAPTION_PROMPT))
        self._prompts: dict[str, list[int]] = {}

    # ---- image -------------------------------------------------------------------------------------
    @property
    def n_image_tokens(self) -> int:
        """How many tokens one image takes in the prompt (what the vision tower gives)."""
        return _tokens(self.model.config)

    def own_precision(self) -> contextlib.AbstractContextManager:
        """Autocast off when the weights are already float16 / bfloat16 (a hub LLaVA): they fix the precision,
        and torch's autocast to another low precision fails on them (a float16 tensor in a bfloat16 'promote'
        op such as CLIP's torch.cat). float32 weights follow the enclosing autocast."""
        if self.model.lm_head.weight.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, enabled=False)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, N, D): the projected image tokens the language model reads (D = its hidden size): the hidden
        state(s) of ``vision_feature_layer``, without the class token under the ``default`` strategy, through
        the projector; ``LlavaModel.get_image_features`` without its per-image list (whose unbind / stack
        backward breaks under an autocast to another precision than the weights')."""
        cfg, inner = self.model.config, self.model.model
        layers = cfg.vision_feature_layer
        with self.own_precision():
            hidden = inner.vision_tower(pixel_values=self.normalize(pixels), output_hidden_states=True).hidden_states
            picked = [hidden[i] for i in ([layers] if isinstance(layers, int) else layers)]
            if cfg.vision_feature_select_strategy == "default":
                picked = [h[:, 1:] for h in picked]
            return inner.multi_modal_projector(torch.cat(picked, dim=-1) if len(picked) > 1 else picked[0])

    def vision_module(self) -> nn.Module:
        """The vision tower (what ``--part encoder`` trains; ``decoder``, the default, trains the projector and
        the language model)."""
        return self.model.model.vision_tower

    def image_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, D) mean of the projected image tokens, L2-normalised."""
        return F.normalize(self.image_features(pixels).float().mean(1), dim=-1)

    # ---- prompts -----------------------------------------------------------------------------------
    def render(self, prompt: str) -> str:
        """The chat-template text of one user turn (the image, then ``prompt``), ready for the answer."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template,
                                                  add_generation_prompt=True, tokenize=False)

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the rendered prompt, with its image token expanded to :attr:`n_image_tokens`."""
        hit = self._prompts.get(prompt)
        if hit is not None:
            return hit
        text = self.render(prompt)
        bos = self.tokenizer.bos_token
        ids = self.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
        where = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(where) != 1:
            raise ValueError(f"{self.name}: its chat template puts {len(where)} image tokens in a prompt; "
                             "this adapter gives LLaVA one image")
        k = where[0]
        ids = ids[:k] + [self.image_token_id] * self.n_image_tokens + ids[k + 1:]
        if len(self._prompts) >= _PROMPT_CACHE:
            self._prompts.pop(next(iter(self._prompts)))
        self._prompts[prompt] = ids
        return ids

    def question_prompt(self, question: str) -> str:
        """LLaVA-1.5's short-answer prompt (its VQAv2 / GQA evaluation prompt)."""
        return f"{question}\n{SHORT_ANSWER}"

    def _embeds(self, ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """(B, L, D) input embeddings of ``ids`` with the image features in place of the image tokens."""
        embeds = self.model.get_input_embeddings()(ids)
        mask = (ids == self.image_token_id).unsqueeze(-1)
        return embeds.masked_scatter(mask, features.to(embeds.dtype))

    # ---- teacher forcing ---------------------------------------------------------------------------
    def scoring_batch(self, prompts: list[str], targets: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                               torch.Tensor, torch.Tensor]:
        """Right-padded ``prompt target <eos>`` sequences: (B, L) ids, (B, L) attention mask, (B, T) positions
        whose logits predict the targets, (B, T) target ids, (B, T) float mask of real target tokens."""
        limit = int(getattr(self.model.config.text_config, "max_position_embeddings", 4096))
        rows = []
        for p, t in zip(prompts, targets):
            pre = self.prompt_ids(p)
            tgt = (self.tokenizer(t, add_special_tokens=False)["input_ids"] + [self.eos_id])[: max(1, limit - len(pre))]
            rows.append((pre, tgt))
        length, span = max(len(p) + len(t) for p, t in rows), max(len(t) for _, t in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        positions = torch.zeros((len(rows), span), dtype=torch.long)
        target_ids = torch.full((len(rows), span), self.pad_id, dtype=torch.long)
        target_mask = torch.zeros((len(rows), span))
        for i, (pre, tgt) in enumerate(rows):
            n = len(pre) + len(tgt)
            ids[i, :n] = torch.tensor(pre + tgt)
            attention[i, :n] = 1
            # the logits at position j predict token j + 1; the padded tail points at the last real token
            positions[i] = (len(pre) - 1 + torch.arange(span)).clamp(max=n - 2)
            target_ids[i, : len(tgt)] = torch.tensor(tgt)
            target_mask[i, : len(tgt)] = 1
        dev = self.device
        return ids.to(dev), attention.to(dev), positions.to(dev), target_ids.to(dev), target_mask.to(dev)

    def _score_logits(self, pixels: torch.Tensor, prompts: list[str], targets: list[str],
                      image_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, attention, positions, target_ids, target_mask = self.scoring_batch(prompts, targets)
        features = self.image_features(pixels)
        if image_index is not None:
            features = features[image_index]
        # logits only where a target is predicted: the vocabulary projection of every prompt position
        # would be (B, ~600, 32k) floats for nothing
        with self.own_precision():
            out = self.model(inputs_embeds=self._embeds(ids, features), attention_mask=attention,
                             logits_to_keep=positions, use_cache=False)
        return out.logits, target_ids, target_mask

    def caption_logits(self, pixels: torch.Tensor, captions: str | Sequence[str]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced next-token logits (B, T, V) of each caption (``caption <eos>`` after the caption
        prompt), with its (B, T) target ids and (B, T) mask of real tokens."""
        captions = as_text_list(captions, pixels.shape[0], "captions")
        return self._score_logits(pixels, [self.caption_prompt] * len(captions), captions)

    def caption_nll(self, pixels: torch.Tensor, captions: str | Sequence[str]) -> torch.Tensor:
        """(B,) mean token NLL of each caption (one per image, or one for all) under teacher forcing."""
        return token_nll(*self.caption_logits(pixels, captions))

    def answer_logits(self, pixels: torch.Tensor, questions: str | Sequence[str], answers: str | Sequence[str],
                      image_index: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced next-token logits (N, T, V) of each answer (``answer <eos>`` after the short-answer
        prompt of its question), with (N, T) target ids and (N, T) mask; ``image_index`` as in :meth:`answer_nll`."""
        index = image_index_of(image_index, pixels.shape[0], self.device)
        b = pixels.shape[0] if index is None else len(index)
        questions = as_text_list(questions, b, "questions")
        answers = as_text_list(answers, b, "answers")
        return self._score_logits(pixels, [self.question_prompt(q) for q in questions], answers, index)

    def answer_nll(self, pixels: torch.Tensor, questions: str | Sequence[str], answers: str | Sequence[str],
                   image_index: Sequence[int] | None = None) -> torch.Tensor:
        """(N,) mean token NLL of each answer under teacher forcing. Without ``image_index`` there is one
        question per image (N = B); with it, question ``k`` is about image ``image_index[k]``."""
        return token_nll(*self.answer_logits(pixels, questions, answers, image_index))

    # ---- generation --------------------------------------------------------------------------------
    @torch.no_grad()
    def _generate(self, pixels: torch.Tensor, prompts: list[str], max_new_tokens: int, num_beams: int) -> list[str]:
        """Greedy (or beam) continuations of ``prompts``, one per image, left-padded into one batch."""
        seqs = [self.prompt_ids(p) for p in prompts]
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, length - len(s):] = torch.tensor(s)
            attention[i, length - len(s):] = 1
        ids, attention = ids.to(self.device), attention.to(self.device)
        embeds = self._embeds(ids, self.image_features(pixels))  # the vision tower at the request's precision
        with decoding(), self.own_precision():
            # given only embeddings, generate returns the new tokens alone; positions follow the mask
            out = self.model.generate(inputs_embeds=embeds, attention_mask=attention, max_new_tokens=max_new_tokens,
                                      num_beams=num_beams, do_sample=False, eos_token_id=self.eos_id,
                                      pad_token_id=self.pad_id)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def generate(self, pixels: torch.Tensor, max_new_tokens: int = 20, num_beams: int = 1) -> list[str]:
        """Captions, one per image: LLaVA's answer to the caption prompt."""
        return self._generate(pixels, [self.caption_prompt] * pixels.shape[0], max_new_tokens, num_beams)

    def answer(self, pixels: torch.Tensor, questions: str | Sequence[str], max_new_tokens: int = 10) -> list[str]:
        """Greedy answers, one per image, to the short-answer prompt of each question."""
        questions = as_text_list(questions, pixels.shape[0], "questions")
        return self._generate(pixels, [self.question_prompt(q) for q in questions], max_new_tokens, 1)


# ---- building and wrapping ---------------------------------------------------------------------------

def llava_15_7b_architecture() -> dict[str, Any]:
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px (layer -2, class token dropped: 576 image tokens),
    a 2-layer GELU projector, Vicuna-7B (Llama, vocabulary 32064 with ``<image>`` = 32000, ``<pad>`` = 32001),
    float16 (its published config)."""
    from transformers import LlavaConfig

    cfg = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                       "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 14, "image_size": 336,
                       "projection_dim": 768, "hidden_act": "quick_gelu"},
        text_config={"model_type": "llama", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                     "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
                     "pad_token_id": 32001},
        image_token_index=32000, pad_token_id=32001, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=576, tie_word_embeddings=False)
    arch = cfg.to_dict()
    arch["dtype"] = "float16"
    return arch


def _dtype(value: Any) -> torch.dtype | None:
    if isinstance(value, torch.dtype):
        return value
    found = getattr(torch, str(value).removeprefix("torch."), None) if value else None
    return found if isinstance(found, torch.dtype) else None


def build_llava(arch: dict[str, Any]) -> nn.Module:
    """A random-weight ``LlavaForConditionalGeneration`` from an architecture dict (``LlavaConfig.to_dict()``),
    built in the dtype the dict names (a float16 model is not built in float32 first)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig.from_dict(dict(arch))
    dtype = _dtype(arch.get("dtype") or arch.get("torch_dtype"))
    if dtype is None or dtype == torch.get_default_dtype():
        return LlavaForConditionalGeneration(config)
    return LlavaForConditionalGeneration._from_config(config, dtype=dtype)


def folder_spec(folder: Path) -> dict[str, Any]:
    """What a LLaVA folder adds to its spec, read as text / JSON (nothing is executed): the chat template of
    its processor files, ``chat_template.jinja`` or else ``chat_template.json`` (its normalisation comes from
    ``preprocessor_config.json``, read for every transformers folder by models/loading.py)."""
    jinja, js = folder / "chat_template.jinja", folder / "chat_template.json"
    try:
        if jinja.is_file():
            return {"chat_template": jinja.read_text()}
        if js.is_file():
            template = json.loads(js.read_text()).get("chat_template")
            return {"chat_template": template} if isinstance(template, str) and template else {}
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{folder}: could not read its chat template ({e})") from e
    return {}


def make_llava_adapter(name: str, model: nn.Module, tokenizer: Any, spec: dict[str, Any]) -> LlavaAdapter:
    """Wrap a ``LlavaForConditionalGeneration``: input size from its vision config, normalisation and chat
    template from the spec (its folder's files) or the tokenizer, else OpenAI CLIP's and LLaVA-1.5's."""
    if type(model).__name__ != "LlavaForConditionalGeneration":
        raise CheckpointError(f"{name}: a LLaVA preset needs a LlavaForConditionalGeneration, got "
                              f"{type(model).__name__}")
    template = spec.get("chat_template")
    if not isinstance(template, str) or not template:
        own = getattr(tokenizer, "chat_template", None)
        template = own if isinstance(own, str) and own else None
    if template is None:
        log.info("%s has no chat template: using LLaVA-1.5's 'USER: <image>\\n{prompt} ASSISTANT:'", name)
        template = LLAVA15_CHAT_TEMPLATE
    model.eval()
    return LlavaAdapter(name, model, tokenizer, spec, int(model.config.vision_config.image_size),
                        tuple(spec.get("mean", OPENAI_MEAN)), tuple(spec.get("std", OPENAI_STD)), template)


# ---- the vision-tower swap ---------------------------------------------------------------------------

def _refuse(tower: str, why: str) -> CheckpointError:
    return CheckpointError(f"vision tower {tower}: {why}")


def open_clip_vit_to_hf(visual: nn.Module, tower: str = "open_clip ViT") -> nn.Module:
    """A transformers ``CLIPVisionModel`` computing what the open_clip ``VisionTransformer`` ``visual``
    computes: conv1 -> patch_embedding, class / positional embedding, ln_pre -> pre_layrnorm, each block's
    ln_1 / attn (in_proj split into q, k, v; out_proj) / ln_2 / mlp.c_fc / mlp.c_proj -> layer_norm1 /
    self_attn / layer_norm2 / mlp.fc1 / mlp.fc2, ln_post -> post_layernorm; quick_gelu where open_clip uses
    QuickGELU. ``proj`` (the contrastive projection) is not part of a LLaVA tower. Refuses, in one sentence,
    a ViT whose blocks do not map (layer scale, custom attention, attention pooling, no ln_pre, a conv stem)."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if not isinstance(visual, VisionTransformer):
        raise _refuse(tower, f"its image encoder is a {type(visual).__name__}, not a ViT; only ViTs map onto "
                             "LLaVA's CLIP vision tower")
    conv, blocks = visual.conv1, list(visual.transformer.resblocks)
    checks = [
        (isinstance(conv, nn.Conv2d) and conv.kernel_size == conv.stride and conv.bias is None,
         "its stem is not a plain patchify convolution"),
        (not isinstance(visual.ln_pre, nn.Identity), "it has no ln_pre (transformers' CLIP always has one)"),
        (getattr(visual, "attn_pool", None) is None, "it pools with attention"),
        (bool(blocks) and all(type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv")
                              and isinstance(b.attn, nn.MultiheadAttention) and b.attn._qkv_same_embed_dim
                              and isinstance(b.ls_1, nn.Identity) and isinstance(b.ls_2, nn.Identity)
                              for b in blocks),
         "its blocks are not plain CLIP blocks (layer scale or custom attention)"),
    ]
    for ok, why in checks:
        if not ok:
            raise _refuse(tower, why + "; it does not map onto transformers' CLIPVisionModel")
    act = type(blocks[0].mlp.gelu).__name__
    if act not in ("QuickGELU", "GELU") or (act == "GELU" and getattr(blocks[0].mlp.gelu, "approximate", "none") != "none"):
        raise _refuse(tower, f"its MLP activation {act} has no transformers CLIP equivalent")
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size
    width = conv.out_channels
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=blocks[0].mlp.c_fc.out_features,
                              num_hidden_layers=len(blocks), num_attention_heads=blocks[0].attn.num_heads,
                              image_size=int(size), patch_size=int(patch), num_channels=conv.in_channels,
                              hidden_act="quick_gelu" if act == "QuickGELU" else "gelu",
                              layer_norm_eps=float(visual.ln_pre.eps),
                              projection_dim=int(visual.proj.shape[1]) if visual.proj is not None else width)
    src = visual.state_dict()
    out = {"embeddings.patch_embedding.weight": src["conv1.weight"],
           "embeddings.class_embedding": src["class_embedding"],
           "embeddings.position_embedding.weight": src["positional_embedding"]}
    for kind in ("weight", "bias"):
        out[f"pre_layrnorm.{kind}"] = src[f"ln_pre.{kind}"]
        out[f"post_layernorm.{kind}"] = src[f"ln_post.{kind}"]
        for i in range(len(blocks)):
            s, d = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
            for q, part in zip(("q", "k", "v"), src[s + f"attn.in_proj_{kind}"].chunk(3)):
                out[d + f"self_attn.{q}_proj.{kind}"] = part
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[d + f"{b}.{kind}"] = src[s + f"{a}.{kind}"]
    model = CLIPVisionModel(config)
    try:
        missing, unexpected = model.load_state_dict(out, strict=False)
    except RuntimeError as e:  # a shape that does not fit (e.g. positions of another grid)
        raise _refuse(tower, f"its weights do not fit a CLIP ViT of its own config ({str(e).splitlines()[0][:160]})") from e
    missing = [k for k in missing if not k.endswith("position_ids")]  # a buffer transformers computes
    if missing or unexpected:
        raise _refuse(tower, f"its weights do not map ({(missing or unexpected)[0]})")
    return model.eval()


def hf_clip_vision(clip: nn.Module, tower: str = "CLIPModel") -> nn.Module:
    """A transformers ``CLIPModel``'s vision encoder, itself (no copy): in transformers 5 its ``vision_model``
    is the ``CLIPVisionModel`` a LLaVA's ``vision_tower`` is."""
    from transformers import CLIPVisionModel

    vision = getattr(clip, "vision_model", None)
    if not isinstance(vision, CLIPVisionModel):
        raise _refuse(tower, f"its vision_model is a {type(vision).__name__}, not the CLIPVisionModel LLaVA reads "
                             "(a transformers version before 5?)")
    return vision.eval()


def vision_tower_of(tower: Any, name: str) -> tuple[nn.Module, tuple[float, ...], tuple[float, ...]]:
    """(``CLIPVisionModel``, mean, std) of a loaded CLIP adapter: an open_clip CLIP's ``visual`` or a
    transformers ``CLIPModel``'s ``vision_model``; anything else is refused in one sentence."""
    model = getattr(tower, "model", None)
    mean = tuple(tower.pixel_mean.flatten().tolist()) if hasattr(tower, "pixel_mean") else OPENAI_MEAN
    std = tuple(tower.pixel_std.flatten().tolist()) if hasattr(tower, "pixel_std") else OPENAI_STD
    if getattr(getattr(model, "config", None), "model_type", None) == "clip" and hasattr(model, "vision_model"):
        return hf_clip_vision(model, name), mean, std
    visual = getattr(model, "visual", None)
    if visual is not None and getattr(tower, "family", None) == "clip":
        return open_clip_vit_to_hf(visual, name), mean, std
    what = type(model).__name__ if model is not None else type(tower).__name__
    fams = "/".join(getattr(tower, "families", ()) or (str(getattr(tower, "family", "?")),))
    raise _refuse(name, f"it is a {what} ({fams} model); a vision tower must be a CLIP ViT: an open_clip CLIP "
                        "or a transformers CLIPModel")


def check_tower(config: Any, vision_config: Any, projector_width: int, name: str) -> None:
    """Refuse, in one sentence, a tower whose width the projector cannot read or that lacks the layer LLaVA reads."""
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    want = projector_width // len(layers)
    width, depth = int(vision_config.hidden_size), int(vision_config.num_hidden_layers)
    if width != want:
        raise _refuse(name, f"it has width {width} but LLaVA's projector expects {want}")
    bad = [i for i in layers if not -(depth + 1) <= int(i) <= depth]
    if bad:
        raise _refuse(name, f"it has {depth} layers but LLaVA reads the output of its layer {bad[0]}")


def with_vision_tower(base: Any, tower: Any, name: str, tower_label: str) -> LlavaAdapter:
    """The LLaVA adapter ``base`` reading images through ``tower``'s vision encoder, named ``name``.

    The new model shares ``base``'s projector, language model and LM head (the same modules: one copy in
    memory) and owns only its vision tower. It keeps ``base`` alive, so that loading the plain LLaVA later
    (or another tower) reuses the same language model (:func:`shared`)."""
    from transformers import LlavaForConditionalGeneration

    if not isinstance(base, LlavaAdapter):
        what = type(getattr(base, "model", base)).__name__
        raise CheckpointError(f"{name}: {split_tower(name)[0]} is a {what}, not a LLaVA; only a LLaVA "
                              "(LlavaForConditionalGeneration) can swap its vision tower")
    vision, mean, std = vision_tower_of(tower, tower_label)
    src = base.model
    projector = src.model.multi_modal_projector
    check_tower(src.config, vision.config, int(projector.linear_1.in_features), tower_label)
    config = copy.deepcopy(src.config)
    config.vision_config = copy.deepcopy(vision.config)
    with torch.device("meta"):  # a shell: every part is replaced by a real module below
        model = LlavaForConditionalGeneration(config)
    weight = projector.linear_1.weight
    model.model.vision_tower = vision.to(device=weight.device, dtype=weight.dtype)  # the base's dtype, not ours
    model.model.multi_modal_projector = projector
    model.model.language_model = src.model.language_model
    model.lm_head = src.lm_head
    model.generation_config = src.generation_config
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a transformers version with another part at the top level
        raise CheckpointError(f"{name}: could not share LLaVA's modules ({left[0]} has no weights)")
    object.__setattr__(model, "_shares_with", base)  # not a submodule: its parameters stay the base's
    size = int(vision.config.image_size)
    if size != base.image_size or base.n_image_tokens != _tokens(config):
        log.info("%s: the tower reads %d px images (%d image tokens); %s was trained with %d px (%d)", name, size,
                 _tokens(config), split_tower(name)[0], base.image_size, base.n_image_tokens)
    spec = {**base.spec, "preset": name, "architecture": config.to_dict(), "vision_tower": tower_label,
            "mean": list(mean), "std": list(std)}
    adapter = LlavaAdapter(name, model, base.tokenizer, spec, size, mean, std, base.chat_template).eval()
    adapter.to(base.device)
    adapter.weights = f"{base.weights} + the vision tower of {getattr(tower, 'weights', tower_label)}"
    return adapter


def _tokens(config: Any) -> int:
    """Image tokens of a LLaVA config: (image_size / patch)^2, plus the class token under "full"."""
    vc = config.vision_config
    return (int(vc.image_size) // int(vc.patch_size)) ** 2 + int(config.vision_feature_select_strategy == "full")


# ---- one language model per LLaVA in memory ----------------------------------------------------------
# models.load looks here before loading a name and remembers the LLaVAs it loads, keyed by the name, the
# weights and a stamp of the files behind them. Weak: an adapter nobody holds (the service dropped it)
# leaves; a tower variant holds its base, so the plain LLaVA and every tower share one language model.
_SHARED: "weakref.WeakValueDictionary[tuple, LlavaAdapter]" = weakref.WeakValueDictionary()


def shared(key: tuple) -> LlavaAdapter | None:
    """The LLaVA adapter already loaded under ``key``, if one is still held somewhere."""
    return _SHARED.get(key)


def remember(key: tuple, adapter: Any) -> Any:
    """Remember ``adapter`` under ``key`` if it is a LLaVA; returns it."""
    if isinstance(adapter, LlavaAdapter):
        _SHARED[key] = adapter
    return adapter
