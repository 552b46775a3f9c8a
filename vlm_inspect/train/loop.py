"""The training loop shared by every defense: read it top to bottom.

Optimiser and schedule from the config, gradient clipping, seeded, deterministic data order (the
batch of step ``s`` on rank ``r`` is a pure function of (s, r, seed)), progress bar with loss and
throughput, periodic evaluation, JSON-lines log, atomic snapshots every ``save_every`` steps and at
the end, exact resume (``--resume OUT``, from the newest snapshot that restores cleanly), and data
parallelism under torchrun. A run folder that cannot be written is one sentence, found before training.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import (CONFIG_FILE, FORMAT, WEIGHTS_FILE, atomic_save_tensors, atomic_save_weights, atomic_write_json,
                           checkpoint_config)
from ..data.sources import open_data
from ..defenses import DEFENSES
from ..defenses.common import make_config
from ..models import load
from ..models.base import serves
from ..runtime import autocast, resolve_device, resolve_precision
from .. import distributed as D
from .state import check_writable, restore_intact, resume_config, save_snapshot, writing

log = logging.getLogger("vlm_inspect.train")


@dataclass
class TrainConfig:
    """Every field has a default; ``auto`` ones depend on the defense, the CLI overrides all."""

    defense: str = "base"                 # key in vlm_inspect.defenses.DEFENSES
    model: str = "shapes-clip"            # preset name, or a checkpoint folder
    init: str = "auto"                    # start weights: random | default | <folder>; auto = random for base, else default
    data: str = "auto"                    # data spec (vlm_inspect.data.sources); auto = the defense's default_data
    out: str = "runs/run"                 # run folder (checkpoint + snapshots + log)
    steps: int = 1000                     # optimiser steps
    batch_size: int = 128                 # per rank
    optimizer: str = "adamw"              # adamw | sgd
    lr: float = 1e-3                      # peak learning rate
    weight_decay: float = 0.05            # AdamW / SGD weight decay
    momentum: float = 0.9                 # SGD momentum
    warmup_steps: int = 50                # linear warm-up, then the schedule
    schedule: str = "cosine"              # cosine (to 0) | constant
    grad_clip: float = 1.0                # max global grad norm; 0 disables
    seed: int = 0                         # model init, data order, attacks' random starts
    precision: str = "fp32"               # fp32 | bf16 | fp16 (autocast; fp16 on a GPU, with loss scaling) | auto
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    workers: int = 1                      # data-loading processes (render batches ahead)
    eval_every: int = 250                 # steps between evaluations; 0 = only at the end
    eval_samples: int = 240               # samples per evaluation set
    save_every: int = 250                 # steps between snapshots
    log_every: int = 10                   # steps between log lines
    shots: int | None = None              # few-shot: K samples per class (class-balanced)
    options: dict[str, Any] = field(default_factory=dict)   # the defense's own options (--set key=value)


def _lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter],
                   lr_scales: dict[int, float] | None = None) -> torch.optim.Optimizer:
    """AdamW/SGD with weight decay on matrices only; ``lr_scales`` (``id(param) -> factor``) gives some
    parameters a smaller or larger learning rate than ``cfg.lr`` (the schedule scales all alike)."""
    lr_scales = lr_scales or {}
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for p in params:  # biases, norms, logit scale, embeddings' 1-D bits get no decay
        groups.setdefault((p.ndim >= 2, float(lr_scales.get(id(p), 1.0))), []).append(p)
    param_groups = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": cfg.lr * scale}
                    for (decay, scale), ps in groups.items()]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; valid: adamw, sgd")


class _Batches(torch.utils.data.Dataset):
    """Item ``s`` is the collated batch of step ``s`` on this rank (rendered in a worker)."""

    def __init__(self, task, data, cfg: TrainConfig, info: D.DistInfo, start: int) -> None:
        self.task, self.data, self.cfg, self.info, self.start = task, data, cfg, info, start
        self.n = len(data)

    def __len__(self) -> int:
        return max(0, self.cfg.steps - self.start)

    def indices(self, step: int) -> list[int]:
        bs, world = self.cfg.batch_size, self.info.world
        first = (step * world + self.info.rank) * bs
        out = []
        for g in range(first, first + bs):
            epoch, pos = divmod(g, self.n)
            if self.n <= 10**7:  # finite data: a fresh permutation each epoch
                pos = self._permutation(epoch)[pos]
            out.append(pos)
        return out

    def _permutation(self, epoch: int) -> list[int]:
        if getattr(self, "_perm_epoch", None) != epoch:
            perm = list(range(self.n))
            random.Random(f"{self.cfg.seed}:{epoch}").shuffle(perm)
            self._perm_epoch, self._perm = epoch, perm
        return self._perm

    def __getitem__(self, i: int) -> dict[str, Any]:
        step = self.start + i
        idx = self.indices(step)
        records = []
        for j in idx:
            r = self.data[j]
            r.setdefault("index", j)
            records.append(r)
        batch = self.task.collate(records, step)
        batch["index"] = idx
        return batch


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    if cfg.defense not in DEFENSES:
        raise ValueError(f"unknown defense {cfg.defense!r}; valid: {', '.join(DEFENSES.list())}")
    cfg.device = resolve_device(cfg.device)
    cfg.precision = resolve_precision(cfg.precision, cfg.device)
    if cfg.init == "auto":
        cfg.init = "random" if cfg.defense == "base" else "default"
    if cfg.data == "auto":
        cfg.data = DEFENSES.get(cfg.defense).default_data
    for name, v in (("steps", cfg.steps), ("batch_size", cfg.batch_size)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    return cfg


def train(cfg: TrainConfig, resume: str | Path | None = None, progress: bool = True,
          rank_report: bool = False) -> Path:
    """Run (or resume) a training run; returns the run folder, whose model loads with ``load``."""
    if resume is not None:
        cfg = TrainConfig(**resume_config(Path(resume)))
        cfg.out = str(resume)
    cfg = resolve_config(cfg)
    info = D.setup(cfg.device)
    out = Path(cfg.out)
    if info.main:
        check_writable(out)  # before the model and data load, not at the first snapshot minutes later
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    task_cls = DEFENSES.get(cfg.defense)
    model = load(cfg.model, device=cfg.device, weights=cfg.init, private=True)  # trained in place: never shared
    if getattr(model, "kind", None) == "conse":
        raise ValueError(f"{model.name} cannot be trained here: the defenses train CLIP ViTs (e.g. shapes-clip, "
                         "openai/ViT-B-32), and the ConSE model loads only from its PyPI packages")
    if not any(serves(model, f) for f in task_cls.families):
        raise ValueError(f"defense {cfg.defense!r} applies to {', '.join(task_cls.families)} models, "
                         f"not {model.name!r} ({model.family})")
    data = open_data(cfg.data, "train", seed=cfg.seed, image_size=model.image_size, shots=cfg.shots)
    options = make_config(task_cls.Config, cfg.options)
    options.seed = cfg.seed
    task = task_cls(model, options, data)
    model = task.model  # a task may wrap the model (prompt tuning runs the base model with prompts)
    model.train()
    params = task.trainable_parameters()
    if not params:
        raise ValueError(f"defense {cfg.defense!r} left nothing to train")
    D.broadcast_parameters(task.modules_to_save(), info)
    optimizer = make_optimizer(cfg, params, task.lr_scales())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    # fp16 (GPU) needs loss scaling; for fp32 / bf16 the scaler is a pass-through
    scaler = torch.amp.GradScaler(torch.device(cfg.device).type, enabled=cfg.precision == "fp16")

    start, elapsed, metrics = 0, 0.0, {}
    if resume is not None:
        _, meta = restore_intact(out, task.modules_to_save(), optimizer, scheduler)
        start, elapsed, metrics = meta["step"], meta.get("elapsed", 0.0), meta.get("metrics", {})
        log.info("resumed %s at step %d", out, start)
        if start >= cfg.steps and info.main:  # killed after the last snapshot, before the checkpoint: write it
            with writing(out):
                _write_checkpoint(out, start, task, cfg, options, metrics, elapsed, model)
    elif info.main:
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)

    batches = _Batches(task, data, cfg, info, start)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=cfg.workers,
                                         prefetch_factor=4 if cfg.workers else None,
                                         generator=torch.Generator(), persistent_workers=False)
    bar = None
    if progress and info.main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.defense}:{model.name}", unit="step", dynamic_ncols=True)
    seen: list[int] = []
    logf = None
    if info.main:
        with writing(out):
            logf = (out / "log.jsonl").open("a")
    t_last, n_last = time.time(), 0
    step = start
    try:
        for batch in loader:
            t0 = time.time()
            model.train()
            pixels = batch["pixels"].to(cfg.device)
            batch["pixels"] = pixels
            if rank_report:
                seen += batch["index"]
            with autocast(cfg.device, cfg.precision):
                loss, parts = task.loss(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower --lr or check the data")
            scaler.scale(loss).backward()
            D.average_gradients(params, info)
            scaler.unscale_(optimizer)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed += time.time() - t0
            n_last += pixels.shape[0] * info.world
            if info.main and (step % cfg.log_every == 0 or step == cfg.steps):
                rate = n_last / max(1e-9, time.time() - t_last)
                t_last, n_last = time.time(), 0
                rec = {"step": step, "loss": float(loss.detach()), **parts, "lr": scheduler.get_last_lr()[0],
                       "samples_per_s": round(rate, 1)}
                _log(logf, out, rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}", samples_s=f"{rate:.0f}")
            if bar is not None:
                bar.update(1)
            do_eval = cfg.eval_every and step % cfg.eval_every == 0 or step == cfg.steps
            if do_eval and info.main:
                metrics = task_evaluate(task, model, cfg)
                _log(logf, out, {"step": step, "eval": metrics})
                log.info("step %d eval %s", step, metrics)
            if info.main and (step % cfg.save_every == 0 or step == cfg.steps):
                with writing(out):
                    _save(out, step, task, optimizer, scheduler, cfg, options, metrics, elapsed, model)
    finally:
        if bar is not None:
            bar.close()
        if logf is not None:
            with contextlib.suppress(OSError):  # a failed flush was already raised by the write that hit it
                logf.close()
    if rank_report:
        digest = float(sum(p.detach().double().sum() for p in task.modules_to_save().parameters()))
        with writing(out):
            atomic_write_json(out / f"rank-{info.rank}.json",
                              {"rank": info.rank, "indices": seen, "weights_sum": digest})
    D.teardown(info)
    return out


def _log(logf, out: Path, rec: dict[str, Any]) -> None:
    with writing(out):
        logf.write(json.dumps(rec) + "\n")
        logf.flush()


def task_evaluate(task, model, cfg: TrainConfig) -> dict[str, float]:
    """The task's own quick evaluation (defaults to the evaluate module's per-family metric)."""
    fn = getattr(task, "evaluate", None)
    if fn is not None:
        return fn(cfg.eval_samples)
    from ..evaluate.quick import quick_eval

    was = model.training
    model.eval()
    try:
        return quick_eval(model, cfg.data, cfg.eval_samples)
    finally:
        model.train(was)


def _save(out: Path, step: int, task, optimizer, scheduler, cfg: TrainConfig, options, metrics, elapsed, model):
    save_snapshot(out, step, task.modules_to_save(), optimizer, scheduler,
                  {"config": asdict(cfg), "elapsed": elapsed, "metrics": metrics})
    _write_checkpoint(out, step, task, cfg, options, metrics, elapsed, model)


def _write_checkpoint(out: Path, step: int, task, cfg: TrainConfig, options, metrics, elapsed, model):
    """The loadable ``model.safetensors`` + ``config.json`` of the run at ``step`` (after its snapshot)."""
    hyper = {"loop": {k: v for k, v in asdict(cfg).items() if k not in ("options",)},
             "defense": asdict(options) if dataclasses.is_dataclass(options) else dict(cfg.options)}
    base = None if cfg.init in ("random",) else (cfg.model if cfg.init == "default" else cfg.init)
    # a partial checkpoint (only the trained tensors) needs a base model to sit on
    tensors = task.checkpoint_tensors() if base is not None else None
    meta = {"format": FORMAT, "step": str(step)}
    if tensors is None:
        atomic_save_weights(task.checkpoint_module(), out / WEIGHTS_FILE, metadata=meta)
    else:
        atomic_save_tensors(tensors, out / WEIGHTS_FILE, metadata=meta)
    partial = {"partial": True, "base_digest": task.base_digest} if tensors is not None else {}
    atomic_write_json(out / CONFIG_FILE, checkpoint_config(
        preset=_preset_name(cfg, model), family=model.family, model=model.spec, base=base, defense=cfg.defense,
        hyperparameters=hyper, data=cfg.data, seed=cfg.seed, steps=step, metrics=metrics,
        train_seconds=round(elapsed, 1), **partial, **task.checkpoint_extra()))


def _preset_name(cfg: TrainConfig, model) -> str:
    base = model.name.split("+")[0]
    return base if cfg.defense == "base" else f"{base}+{cfg.defense}"
