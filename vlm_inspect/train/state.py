"""Resumable training state, written atomically.

Layout of a run folder::

    out/model.safetensors, out/config.json      the latest model, loadable with load(..., weights=out)
    out/checkpoints/step-000500/                 one complete, consistent snapshot per save:
        model.safetensors  optimizer.safetensors  rng.safetensors  trainer.json
    out/checkpoints/LATEST                       name of the newest complete snapshot
    out/log.jsonl                                one JSON line per log / eval event

A snapshot is written into a hidden staging folder and renamed into place in one step, so a run
killed at any moment leaves either the previous snapshot or the new one, never half of one.
Optimiser tensors go to safetensors and the rest of its state to JSON: nothing is pickled.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..checkpoints import CheckpointError, atomic_save_weights, atomic_write_json, load_weights

KEEP = 2  # snapshots kept besides the newest


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
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    atomic_save_weights(module, staging / "model.safetensors")
    tensors, opt_meta = _optimizer_to_files(optimizer)
    save_file(tensors, str(staging / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    save_file(rng, str(staging / "rng.safetensors"))
    atomic_write_json(staging / "trainer.json", {"step": step, "optimizer": opt_meta,
                                                 "scheduler": scheduler.state_dict(), **extra})
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    tmp = root / f".LATEST.{os.getpid()}"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / "LATEST")
    snaps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in snaps[: -(KEEP + 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_snapshot(out: Path) -> Path:
    root = Path(out) / "checkpoints"
    latest = root / "LATEST"
    if latest.is_file():
        snap = root / latest.read_text().strip()
        if (snap / "trainer.json").is_file():
            return snap
    snaps = sorted(p for p in root.glob("step-*") if (p / "trainer.json").is_file())
    if not snaps:
        raise CheckpointError(f"nothing to resume in {out}: no complete snapshot under {root}")
    return snaps[-1]


def read_trainer_json(snap: Path) -> dict[str, Any]:
    path = snap / "trainer.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is missing or not valid JSON: {e}") from e


def restore_snapshot(snap: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: Any) -> dict[str, Any]:
    """Load weights, optimiser, scheduler and RNG state; returns trainer.json."""
    meta = read_trainer_json(snap)
    load_weights(module, snap / "model.safetensors")
    try:
        tensors = load_file(str(snap / "optimizer.safetensors"))
        rng = load_file(str(snap / "rng.safetensors"))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{snap}: optimizer or RNG state is unreadable: {e}") from e
    try:
        optimizer.load_state_dict(_optimizer_from_files(tensors, meta["optimizer"]))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{snap / 'optimizer.safetensors'} does not fit this optimiser: {e}") from e
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return meta
