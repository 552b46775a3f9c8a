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
from .llava import llava_15_7b_architecture
from .hf_clip import clip_vit_b32_architecture
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

    @property
    def families(self) -> tuple[str, ...]:
        """Every family the model serves (its builder's: a LLaVA is a captioner and a VQA model)."""
        served = BUILDERS.get(self.builder).served()
        return served if self.family in served else (self.family,)

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
# (docs/BASELINES.md).
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
# transformers CLIPModel hub ids (weights = a save_pretrained folder from the hub); a robust hub CLIP of the same
# shape (e.g. a LEAF-CLIP or FARE ViT-B/32 in transformers format) is one more row here
for _repo, _arch_fn, _what in (("openai/clip-vit-base-patch32", clip_vit_b32_architecture, "OpenAI CLIP ViT-B/32"),):
    register_preset(Preset(_repo, "clip", "pretrained", "hf-clip", _arch_fn, source=_repo,
                           description=f"{_what} through transformers (CLIPModel)"))
# Published robust CLIPs (open_clip ViT-L/14 fine-tunes of OpenAI's, ImageNet, L-inf): FARE (unsupervised,
# Schlarmann et al. 2024) and TeCoA (supervised, Mao et al. 2023) at 2/255 and 4/255, as their authors host them.
# The name is the open_clip hub name, so it reads the same on the page, on the command line and in a report.
for _repo, _what in (("chs20/fare2-clip", "FARE, eps 2/255"), ("chs20/fare4-clip", "FARE, eps 4/255"),
                     ("chs20/tecoa2-clip", "TeCoA, eps 2/255"), ("chs20/tecoa4-clip", "TeCoA, eps 4/255")):
    register_preset(Preset(f"hf-hub:{_repo}", "clip", "pretrained", "open_clip",
                           (lambda: {"open_clip_name": "ViT-L-14-quickgelu"}), source=f"hf-hub:{_repo}",
                           description=f"robust CLIP ViT-L/14 ({_what}) through open_clip"))
register_preset(Preset("nlpconnect/vit-gpt2-image-captioning", "captioner", "pretrained", "vision-encoder-decoder",
                       vit_gpt2_architecture, source="nlpconnect/vit-gpt2-image-captioning",
                       description="ViT-GPT2 captioner (transformers)"))
register_preset(Preset("Salesforce/blip-vqa-base", "vqa", "pretrained", "blip-vqa", blip_vqa_base_architecture,
                       source="Salesforce/blip-vqa-base", description="BLIP VQA base (transformers)"))
# listed after ViT-GPT2 and BLIP, so that they stay the suite's defaults (a 7B model is a choice, not a default)
register_preset(Preset("llava-hf/llava-1.5-7b-hf", "captioner", "pretrained", "llava", llava_15_7b_architecture,
                       source="llava-hf/llava-1.5-7b-hf",
                       description="LLaVA-1.5 7B (transformers), a captioner and a VQA model in one; "
                                   "'<name>|tower=<CLIP>' reads images through another CLIP's vision encoder"))


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
             if (suite is None or p.suite == suite) and (family is None or family in p.families)]
    if suite in (None, "embedded"):
        names += [n for n, f in _checkpoint_presets().items() if family is None or f == family]
    return names
