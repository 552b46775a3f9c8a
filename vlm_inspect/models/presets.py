"""The table of named model presets, as data: each row names its family, suite, builder
(:mod:`vlm_inspect.models.builders`), architecture, tokenizer and normalisation.

Embedded presets (``shapes-*``) are small models for the shapes world whose trained weights live in
``checkpoints/<name>/``; defended variants are any ``checkpoints/<base>+<defense>/`` folder.
Pretrained presets name the public source (open_clip OpenAI ViTs, nlpconnect ViT-GPT2, BLIP VQA).
Loading any of them is :func:`vlm_inspect.models.loading.load`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..checkpoints import is_vlm_checkpoint, read_config
from ..runtime import checkpoints_dir
from .architectures import (blip_vqa_base_architecture, shapes_captioner_architecture, shapes_clip_architecture,
                            shapes_vqa_architecture, vit_gpt2_architecture)
from .base import HALF_MEAN, HALF_STD
from .builders import BUILDERS, make_spec
from .conse import NAME as PHOTO_CLIP
from .tokenizers import shapes_tokenizer_ref

FAMILIES = ("clip", "captioner", "vqa")
SUITES = ("embedded", "pretrained")


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    suite: str
    builder: str                      # a key of models.builders.BUILDERS
    architecture: Callable[[], dict[str, Any]] = field(repr=False, default=dict)
    source: str | None = None         # hub id / open_clip pretrained tag
    description: str = ""
    # architecture -> tokenizer reference; None: the builder's default
    tokenizer: Callable[[dict[str, Any]], dict[str, Any]] | None = field(repr=False, default=None)
    mean: tuple[float, ...] | None = None   # normalisation; None: the builder's
    std: tuple[float, ...] | None = None

    def spec(self) -> dict[str, Any]:
        """The build spec (architecture + tokenizer reference + normalisation), random weights."""
        builder = BUILDERS.get(self.builder)
        if builder.spec is not None:
            return builder.spec(self.name)
        arch = self.architecture()
        tok = (self.tokenizer or builder.tokenizer)(arch)
        norm = {"mean": list(self.mean), "std": list(self.std)} if self.mean is not None else builder.normalisation()
        return make_spec(self.name, self.family, self.builder, arch, tok, **norm)


PRESETS: dict[str, Preset] = {}


def register_preset(p: Preset) -> Preset:
    if BUILDERS.get(p.builder).family != p.family:
        raise ValueError(f"preset {p.name}: builder {p.builder} makes {BUILDERS.get(p.builder).family} models, "
                         f"not {p.family}")
    PRESETS[p.name] = p
    return p


# Every embedded model reads the shapes-world vocabulary. The shapes VQA model normalises like ViT-GPT2
# (mean = std = 0.5), so that its vision model can start from the shapes captioner's encoder
# (docs/REPRODUCTION.md).
register_preset(Preset("shapes-clip", "clip", "embedded", "shapes-clip", shapes_clip_architecture,
                       description="open_clip ViT (conv stem, 64 px, 4 layers, width 128) trained on the shapes world",
                       tokenizer=shapes_tokenizer_ref))
register_preset(Preset("shapes-captioner", "captioner", "embedded", "vision-encoder-decoder",
                       shapes_captioner_architecture,
                       description="ViT encoder (conv stem) + 3-layer GPT-2 decoder trained on shapes captions",
                       tokenizer=shapes_tokenizer_ref))
register_preset(Preset("shapes-vqa", "vqa", "embedded", "blip-vqa", shapes_vqa_architecture,
                       description="small BLIP question-answering model trained on shapes questions",
                       tokenizer=shapes_tokenizer_ref, mean=HALF_MEAN, std=HALF_STD))
# the embedded suite's zero-shot model for real photos (the app's photo samples default to it)
register_preset(Preset(PHOTO_CLIP, "clip", "embedded", "conse",
                       description="ConSE zero-shot model for real photos, built from an ImageNet classifier "
                                   "(EfficientNet-Lite0) and a sentence encoder (MiniLM), not CLIP; from PyPI, offline"))
for _arch, _oc in (("ViT-B-32", "ViT-B-32-quickgelu"), ("ViT-B-16", "ViT-B-16"), ("ViT-L-14", "ViT-L-14")):
    register_preset(Preset(f"openai/{_arch}", "clip", "pretrained", "open_clip",
                           (lambda oc=_oc: {"open_clip_name": oc}), source="openai",
                           description=f"OpenAI CLIP {_arch} through open_clip"))
register_preset(Preset("nlpconnect/vit-gpt2-image-captioning", "captioner", "pretrained", "vision-encoder-decoder",
                       vit_gpt2_architecture, source="nlpconnect/vit-gpt2-image-captioning",
                       description="ViT-GPT2 captioner (transformers)"))
register_preset(Preset("Salesforce/blip-vqa-base", "vqa", "pretrained", "blip-vqa", blip_vqa_base_architecture,
                       source="Salesforce/blip-vqa-base", description="BLIP VQA base (transformers)"))


# what the app's pretrained suite selects by default (and what `python -m vlm_inspect.models.fetch` copies)
APP_PRETRAINED = ("openai/ViT-B-32", "nlpconnect/vit-gpt2-image-captioning", "Salesforce/blip-vqa-base")


def preset_spec(name: str) -> dict[str, Any]:
    """The build spec of a registered preset, random weights."""
    return PRESETS[name].spec()


def is_pretrained(name: str) -> bool:
    """A pretrained-suite preset or an open_clip hub name: weights from the hub or a local copy."""
    return name.startswith("hf-hub:") or (name in PRESETS and PRESETS[name].suite == "pretrained")


def _checkpoint_presets() -> dict[str, str]:
    """Defended/extra embedded checkpoints found on disk: name -> family."""
    found: dict[str, str] = {}
    root = checkpoints_dir()
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.is_dir() and d.name not in PRESETS and is_vlm_checkpoint(d):
                fam = read_config(d).get("family")
                if fam in FAMILIES:
                    found[d.name] = fam
    return found


def checkpoint_suite(config: dict[str, Any]) -> str:
    """The suite a checkpoint belongs to: that of the preset it was built from (or its base's)."""
    for ref in (config.get("base"), config.get("preset"), (config.get("model") or {}).get("preset")):
        if ref in PRESETS:
            return PRESETS[ref].suite
        if isinstance(ref, str) and ref.startswith("hf-hub:"):
            return "pretrained"
    return "embedded"


def list_presets(suite: str | None = None, family: str | None = None) -> list[str]:
    """Preset names, optionally filtered by suite (``embedded``/``pretrained``) and family."""
    if suite is not None and suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; valid: {', '.join(SUITES)}")
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")
    names = [p.name for p in PRESETS.values()
             if (suite is None or p.suite == suite) and (family is None or p.family == family)]
    if suite in (None, "embedded"):
        names += [n for n, f in _checkpoint_presets().items() if family is None or f == family]
    return names
