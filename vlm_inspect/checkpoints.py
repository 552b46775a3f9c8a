"""Checkpoint folders: ``model.safetensors`` + ``config.json`` (docs/ARCHITECTURE.md, "Checkpoints").

Writes are atomic (temp file in the same folder, then ``os.replace``). Loading never unpickles:
safetensors and JSON only. A missing, truncated or mismatched file gives a :class:`CheckpointError`
that names the file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from safetensors import SafetensorError
import torch
from safetensors.torch import load_model, save_file, save_model
from torch import nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "vlm_inspect-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not fit the model; the message names the file."""


def _atomic_path(final: Path) -> Path:
    """A new, empty temp file beside ``final``, with the mode the umask gives (mkstemp's would be 0600)."""
    while True:
        tmp = final.parent / f".{final.name}.{os.urandom(6).hex()}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


@contextlib.contextmanager
def _atomic(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file beside ``path`` to write; it replaces ``path`` in one step if the body succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_path(path)
    mode = tmp.stat().st_mode & 0o7777  # what the umask gives a new file
    try:
        yield tmp
        os.chmod(tmp, mode)  # safetensors renames its own 0600 temp file onto tmp
        os.replace(tmp, path)
    except SafetensorError as e:  # its I/O errors (a full disk: "... (os error 28)") are OS errors to the caller
        code = str(e).rpartition("(os error ")[2].rstrip(")")
        if not code.isdigit():
            raise
        raise OSError(int(code), os.strerror(int(code)), str(path)) from e
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | Path, data: Any) -> None:
    with _atomic(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_save_weights(module: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save ``module``'s parameters and buffers (shared tensors once) with safetensors, atomically."""
    with _atomic(path) as tmp:
        save_model(module, str(tmp), metadata=metadata)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | Path,
                        metadata: dict[str, str] | None = None) -> None:
    """Save named tensors (e.g. only the trained part of a model) with safetensors, atomically."""
    with _atomic(path) as tmp:
        save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(tmp), metadata=metadata)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_digest(module: nn.Module) -> str:
    """sha256 over a module's parameters and buffers (names, dtypes, shapes, bytes), in name order: which
    base model a prompt or partial checkpoint was trained on."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_base_digest(base: Any, config: dict[str, Any], folder: Path, what: str = "it was") -> None:
    """Refuse a base model whose weights are not the ones a prompt / partial checkpoint was trained on."""
    want = config.get("base_digest")
    found = weights_digest(base.model) if want else None
    if want and found != want:
        raise CheckpointError(f"{folder}: {what} trained on a different {config.get('base')} (weights digest "
                              f"{want}, found {found}); use the base it was trained on")


def load_weights(module: nn.Module, path: str | Path, strict: bool = True, partial: bool = False) -> None:
    """Load safetensors weights into ``module``; clear errors for missing/truncated/mismatched files.

    ``partial``: the file holds some of the module's tensors (a partial checkpoint): none may be
    missing from the module, and it must hold at least one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        missing, unexpected = load_model(module, str(path), strict=False)
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    except RuntimeError as e:  # size mismatches from load_state_dict
        msg = str(e).split("\n")
        detail = "; ".join(m.strip() for m in msg[1:4] if m.strip()) or msg[0]
        raise CheckpointError(f"{path} does not match the model architecture: {detail}") from e
    if partial and (unexpected or len(missing) == len(module.state_dict())):
        raise CheckpointError(f"{path} does not fit the model: " + (
            f"{len(unexpected)} unexpected tensors (e.g. {', '.join(list(unexpected)[:3])})" if unexpected
            else "it holds none of its tensors"))
    if strict and not partial and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {', '.join(list(missing)[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(list(unexpected)[:3])})")
        raise CheckpointError(f"{path} does not match the model architecture: {'; '.join(parts)}")


def read_config(folder: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint config not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def is_vlm_checkpoint(folder: str | Path) -> bool:
    try:
        return read_config(folder).get("format") == FORMAT
    except CheckpointError:
        return False


def checkpoint_config(*, preset: str, family: str, model: dict[str, Any], base: str | None = None,
                      defense: str | None = None, hyperparameters: dict[str, Any] | None = None, data: Any = None,
                      seed: int | None = None, steps: int = 0, metrics: dict[str, Any] | None = None,
                      **extra: Any) -> dict[str, Any]:
    """The one layout of a checkpoint's ``config.json`` (docs/ARCHITECTURE.md, "Checkpoints"): format and
    project version, preset name, family, the base model it sits on (prompt and partial checkpoints),
    the model spec (builder, architecture, tokenizer reference), defense and hyper-parameters, data spec,
    seed, steps, metrics, then any ``extra`` entries (training time, the prompts' shape, ``partial``)."""
    from . import __version__

    return {"format": FORMAT, "version": __version__, "preset": preset, "family": family, "base": base,
            "model": model, "defense": defense, "hyperparameters": hyperparameters or {}, "data": data,
            "seed": seed, "steps": steps, "metrics": metrics or {}, **extra}


def save_adapter(adapter: Any, out_dir: str | Path, *, preset: str | None = None, defense: str | None = None,
                 hyperparameters: dict[str, Any] | None = None, data: Any = None, seed: int | None = None,
                 steps: int = 0, metrics: dict[str, Any] | None = None, base: str | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write ``adapter`` as a checkpoint folder: weights, tokenizer files if needed, then config.json.

    ``config.json`` is :func:`checkpoint_config`'s layout.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = dict(adapter.spec)
    if spec.get("tokenizer", {}).get("kind") == "files":
        adapter.tokenizer.save_pretrained(str(out))
    atomic_save_weights(adapter.model, out / WEIGHTS_FILE, metadata={"format": FORMAT, "preset": preset or adapter.name})
    config = checkpoint_config(preset=preset or adapter.name, family=adapter.family, model=spec, base=base,
                               defense=defense, hyperparameters=hyperparameters, data=data, seed=seed, steps=steps,
                               metrics=metrics)
    config.update(extra or {})  # extra entries may also override the standard ones
    atomic_write_json(out / CONFIG_FILE, config)  # last: a folder with a config is complete
    return out
