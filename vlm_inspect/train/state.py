"""Resumable training state, written atomically.

Layout of a run folder::

    out/model.safetensors, out/config.json      the latest model, loadable with load(..., weights=out)
    out/checkpoints/step-000500/                 one complete, consistent snapshot per save:
        model.safetensors  optimizer.safetensors  rng.safetensors  trainer.json
    out/checkpoints/LATEST                       name of the newest complete snapshot
    out/log.jsonl                                one JSON line per log / eval event

A snapshot is written into a hidden staging folder and renamed into place in one step, so a run
killed at any moment leaves either the previous snapshot or the new one, never half of one; a write
that fails (full disk, read-only folder) removes the staging folder. Resuming falls back from an
unreadable snapshot to the newest earlier one that restores cleanly.
Optimiser tensors go to safetensors and the rest of its state to JSON: nothing is pickled.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file

from ..checkpoints import CheckpointError, atomic_save_tensors, atomic_save_weights, atomic_write_json, load_weights

KEEP = 2  # snapshots kept besides the newest

log = logging.getLogger("vlm_inspect.train")


class RunFolderError(Exception):
    """The run folder cannot be written (full disk, read-only, no permission); the message names it."""


@contextlib.contextmanager
def writing(out: Path) -> Iterator[None]:
    """Turn an OS error of the writes in the body into one sentence naming the run folder."""
    try:
        yield
    except OSError as e:
        raise RunFolderError(f"cannot write the run folder {out}: {e.strerror or e}") from e


def check_writable(out: Path) -> None:
    """Create and remove a file in ``out`` (or, not made yet, in the nearest folder that will hold it): a
    read-only folder is refused before training starts, and a run that fails early leaves no empty folder."""
    folder = out
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    with writing(out):
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        plain_state[str(pid)] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().clone()
            else:
                plain_state[str(pid)][k] = v
    return tensors, {"param_groups": sd["param_groups"], "state": plain_state}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(pid): dict(v) for pid, v in meta["state"].items()}
    for key, t in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = t
    return {"state": state, "param_groups": meta["param_groups"]}


def save_snapshot(out: Path, step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: Any, extra: dict[str, Any]) -> Path:
    """Write ``out/checkpoints/step-N`` atomically and point LATEST at it."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    staging = root / f".staging-{name}-{os.getpid()}"
    tmp = root / f".LATEST.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        atomic_save_weights(module, staging / "model.safetensors")
        tensors, opt_meta = _optimizer_to_files(optimizer)
        atomic_save_tensors(tensors, staging / "optimizer.safetensors")  # atomic for the umask's file mode
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda{i}"] = s
        atomic_save_tensors(rng, staging / "rng.safetensors")
        atomic_write_json(staging / "trainer.json", {"step": step, "optimizer": opt_meta,
                                                     "scheduler": scheduler.state_dict(), **extra})
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        tmp.write_text(name + "\n")
        os.replace(tmp, root / "LATEST")
    except BaseException:  # a full disk or an interrupt: leave no half-written files behind
        shutil.rmtree(staging, ignore_errors=True)
        tmp.unlink(missing_ok=True)
        raise
    snaps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in snaps[: -(KEEP + 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def snapshots(out: Path) -> list[Path]:
    """The snapshots to resume from, best first: the one LATEST names, then the older ones, newest first."""
    root = Path(out) / "checkpoints"
    snaps = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    latest = root / "LATEST"
    if latest.is_file():
        named = root / latest.read_text().strip()
        if named in snaps:  # LATEST decides: a newer folder (killed before LATEST moved, or a rewind) is passed over
            snaps = [named] + [p for p in snaps if p.name < named.name]
    if not snaps:
        raise CheckpointError(f"nothing to resume in {out}: no complete snapshot under {root}")
    return snaps


def read_trainer_json(snap: Path) -> dict[str, Any]:
    path = snap / "trainer.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is missing or not valid JSON: {e}") from e
    missing = [k for k in ("step", "config", "optimizer", "scheduler") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    return meta


def resume_config(out: Path) -> dict[str, Any]:
    """The run's training config, from the best snapshot whose trainer.json reads."""
    problems = []
    for snap in snapshots(out):
        try:
            return read_trainer_json(snap)["config"]
        except CheckpointError as e:
            problems.append((snap, e))
    raise _none_intact(out, problems)


def restore_intact(out: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: Any) -> tuple[Path, dict[str, Any]]:
    """Restore the best snapshot that restores cleanly (see :func:`snapshots`); returns it and its trainer.json.

    An unreadable one is skipped with a warning. One that failed half-way leaves no trace: the complete
    restore after it overwrites every weight, the whole optimiser state, the scheduler and the RNG."""
    problems = []
    for snap in snapshots(out):
        try:
            meta = restore_snapshot(snap, module, optimizer, scheduler)
        except CheckpointError as e:
            problems.append((snap, e))
            continue
        if problems:
            bad = "; ".join(f"{_rel(out, p)} is unreadable ({_oneline(e)})" for p, e in problems)
            log.warning("%s; resuming from the intact %s", bad, _rel(out, snap))
        return snap, meta
    raise _none_intact(out, problems)


def _rel(out: Path, snap: Path) -> str:
    return str(snap.relative_to(out)) if snap.is_relative_to(out) else str(snap)


def _oneline(e: Exception) -> str:
    return " ".join(str(e).split())


def _none_intact(out: Path, problems: list[tuple[Path, Exception]]) -> CheckpointError:
    return CheckpointError(f"cannot resume {out}: no snapshot restores cleanly ("
                           + "; ".join(f"{_rel(out, p)}: {_oneline(e)}" for p, e in problems) + ")")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path} is missing or not a readable safetensors file (truncated or corrupt?): "
                              f"{e}") from e


def restore_snapshot(snap: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: Any) -> dict[str, Any]:
    """Load weights, optimiser, scheduler and RNG state; returns trainer.json.

    Every file is read and checked before anything is applied, so a corrupt or truncated snapshot raises
    :class:`CheckpointError` and changes nothing; one that does not fit (another architecture or optimiser)
    can fail after the weights are in, which :func:`restore_intact` undoes with the next complete restore."""
    meta = read_trainer_json(snap)
    tensors = _read_tensors(snap / "optimizer.safetensors")
    rng = _read_tensors(snap / "rng.safetensors")
    state = rng.get("torch")
    if state is None or state.dtype != torch.uint8 or state.shape != torch.get_rng_state().shape:
        raise CheckpointError(f"{snap / 'rng.safetensors'} holds no CPU RNG state")
    try:
        opt_state = _optimizer_from_files(tensors, meta["optimizer"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{snap / 'trainer.json'}: the optimizer state is malformed: {e}") from e
    load_weights(module, snap / "model.safetensors")  # reads the whole file before copying any of it
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{snap / 'optimizer.safetensors'} does not fit this optimiser: {e}") from e
    try:
        scheduler.load_state_dict(meta["scheduler"])
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{snap / 'trainer.json'}: the scheduler state is malformed: {e}") from e
    torch.set_rng_state(state)
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return meta
