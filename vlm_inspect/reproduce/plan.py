"""What a manifest needs done, and what is done already: the jobs of one table.

A **training job** is one run at one seed, in ``<runs>/<name>/seed-<k>``. Its state comes from the folder:
``done`` when its ``config.json`` records every step of a run with the manifest's settings, ``resume``
when it holds a snapshot of such a run that stopped early (a kill: ``train --resume`` continues it
exactly), ``fresh`` when there is nothing. A folder holding a run with *other* settings is refused with
the setting that differs: reproduce never overwrites or silently reuses someone else's run.

An **evaluation job** is one model (a run at one seed, or a preset / folder once) under the manifest's
protocol, written to ``<runs>/eval/[<protocol>/]<model>[-seed-<k>].md`` and ``.json`` (a manifest's
first protocol has no folder of its own). It is ``done`` when that JSON
was written by exactly this command, ``resume`` when a killed one left finished model x data set units in
its journal (``evaluate --resume`` reads them back), else ``fresh``.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .manifest import Manifest, ManifestError, Protocol

DONE, RESUME, FRESH = "done", "resume", "fresh"
# settings that do not change what a run computes: where it writes, on which device, how many loaders
IGNORED = {"out", "device", "workers"}


@dataclass
class Job:
    kind: str                  # train | evaluate
    label: str                 # tecoa seed 1, shapes-clip, ...
    argv: list[str]            # after python -m vlm_inspect.<kind>
    minutes: float             # the manifest's estimate (one thread)
    state: str = FRESH
    model: str = ""            # the manifest's model entry (evaluate) or run name (train)
    seed: int | None = None
    folder: Path | None = None # the run folder (absolute): train's, or the trained model an evaluation reads
    out: Path | None = None    # evaluate: the markdown it writes (absolute)
    needs: list[str] = field(default_factory=list)  # labels of the jobs that must finish first
    steps: int = 0             # train: total optimiser steps (for progress)
    config: dict[str, Any] | None = None  # train: the resolved config the run must record (train_config)
    protocol: str = ""         # evaluate: the manifest's protocol ("" for [evaluate], else its also-name)
    units: int = 0             # evaluate: its data sets (0: every data set of the family, count unknown)
    journal: int = 0           # evaluate: the units its journal held when planned (a killed run's)

    @property
    def command(self) -> str:
        return f"python -m vlm_inspect.{self.kind} " + " ".join(shlex.quote(a) for a in self.argv)


def run_folder(m: Manifest, name: str, seed: int) -> Path:
    return m.runs_dir / name / f"seed-{seed}"


def eval_out(m: Manifest, model: str, seed: int | None, eps: str | None = None, protocol: str = "") -> Path:
    """``<runs>/eval/[<protocol>/]<model>[-seed-<k>][-eps-<e>].md``."""
    name = model + (f"-seed-{seed}" if seed is not None else "") + (f"-eps-{eps}" if eps else "")
    folder = m.runs_dir / "eval" / protocol if protocol else m.runs_dir / "eval"
    return folder / (name.replace("/", "_").replace(":", "_") + ".md")


def _jobs_of(p: Protocol) -> list[tuple[str | None, list[str]]]:
    """The evaluate arguments of each job of one model: all of them, or one job per budget (``split_eps``)."""
    if not p.split_eps:
        return [(None, p.args)]
    i = p.args.index("--eps")
    return [(e, [*p.args[:i + 1], e, *p.args[i + 2:]]) for e in p.budgets]


def train_config(m: Manifest, argv: list[str]) -> dict[str, Any]:
    """The resolved config ``python -m vlm_inspect.train argv`` would run, as a checkpoint records it."""
    from ..defenses import DEFENSES
    from ..defenses.common import make_config
    from ..train.cli import build_parser, config_from_args
    from ..train.loop import resolve_config

    parser = build_parser()

    def refuse(message: str):
        raise ManifestError(f"{m.path.name}: the training arguments {' '.join(argv)} do not parse: {message}")

    parser.error = refuse  # one sentence, not argparse's usage text and exit
    try:
        cfg = resolve_config(config_from_args(parser.parse_args(argv)))
        options = make_config(DEFENSES.get(cfg.defense).Config, cfg.options)
    except (ValueError, KeyError) as e:
        if isinstance(e, ManifestError):
            raise
        raise ManifestError(f"{m.path.name}: {' '.join(argv)}: {e}") from None
    loop = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "options"}
    return json.loads(json.dumps({"loop": loop, "defense": dataclasses.asdict(options)}, default=str))


def _differences(want: dict[str, Any], have: dict[str, Any]) -> list[str]:
    out = []
    for part in ("loop", "defense"):
        w, h = want.get(part, {}), have.get(part, {}) or {}
        for k in sorted(set(w) | set(h)):
            if k in IGNORED or part == "defense" and k == "seed":
                continue
            if w.get(k) != h.get(k):
                out.append(f"{k} {h.get(k)!r} there, {w.get(k)!r} here")
    return out


def _junk_only(folder: Path) -> bool:
    """What a run killed before its first snapshot leaves: its log and hidden staging / probe files."""
    return all(p.name == "log.jsonl" or p.name.startswith(".") for p in folder.iterdir())


def train_state(m: Manifest, folder: Path, want: dict[str, Any]) -> str:
    """``done`` / ``resume`` / ``fresh`` for the run folder (absolute), or ManifestError when it holds
    another run."""
    config_file = folder / "config.json"
    have, steps = None, None
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
            have, steps = config.get("hyperparameters"), config.get("steps")
        except (OSError, json.JSONDecodeError):
            have = None
    if have is None and (folder / "checkpoints").is_dir():
        from ..checkpoints import CheckpointError
        from ..defenses import DEFENSES
        from ..defenses.common import make_config
        from ..train.state import resume_config

        try:
            cfg = resume_config(folder)
            options = make_config(DEFENSES.get(cfg["defense"]).Config, cfg.get("options") or {})
            have = json.loads(json.dumps({"loop": {k: v for k, v in cfg.items() if k != "options"},
                                          "defense": dataclasses.asdict(options)}, default=str))
            steps = 0
        except (CheckpointError, KeyError, ValueError):
            have = None
    if have is None:
        if folder.is_dir() and not _junk_only(folder):
            raise ManifestError(f"{folder} is not empty and holds no run reproduce can read: move it away")
        return FRESH  # nothing, or a run killed before its first snapshot (train appends to its log)
    diff = _differences(want, have)
    if diff:
        raise ManifestError(f"{folder} holds a run with other settings ({'; '.join(diff[:3])}): move it away, or "
                            f"change 'runs' in {m.path.name}")
    return DONE if steps == want["loop"]["steps"] and (folder / "model.safetensors").is_file() else RESUME


def weights_hash(folder: Path) -> str | None:
    """The SHA-256 of a run's ``model.safetensors``: an evaluation is of these weights and no others."""
    from ..checkpoints import file_sha256

    f = folder / "model.safetensors"
    return file_sha256(f) if f.is_file() else None


def stamp_path(out: Path) -> Path:
    return out.with_name(out.stem + ".weights")


def eval_state(job: Job) -> str:
    """``done`` when the evaluation's JSON was written by this very command and, for a trained model, of
    the weights now in its run folder (their hash was stamped when the evaluation started)."""
    try:
        if json.loads(job.out.with_suffix(".json").read_text()).get("command") != job.command:
            return FRESH
    except (OSError, json.JSONDecodeError, AttributeError):
        return FRESH
    if job.folder is None:
        return DONE
    stamp = stamp_path(job.out)
    return DONE if stamp.is_file() and stamp.read_text().strip() == weights_hash(job.folder) else FRESH


def journal_units(job: Job) -> int:
    """The finished model x data set units a killed evaluation left in its journal (an estimate: evaluate
    itself decides which of them still hold, by their settings and the weights' digest)."""
    from ..evaluate.journal import entries, journal_path

    try:
        text = journal_path(job.out).read_text(encoding="utf-8", errors="replace")
    except (OSError, TypeError):
        return 0
    return len({(e.get("model"), e.get("data")) for e in entries(text)})


def _same_data(claim_data: str, spec: str) -> bool:
    return claim_data in (spec, spec.removeprefix("shapes:"))


def check_claims(m: Manifest, bases: dict[str, str]) -> dict[str, list[str] | None]:
    """Every protocol parses, two protocols never evaluate one model on one data set (their figures would
    collide in a cell), and every claim names a column, a data set and a metric that one protocol gives
    both its models: a typo is found now, not after hours of work. ``bases``: each run's trained model.
    Returns each protocol's data sets, by name (None: every data set of the family)."""
    from ..attacks.base import eps_label
    from ..evaluate import cli as evaluate_cli

    given: list[tuple[Protocol, set[str], list[str] | None]] = []  # protocol, its columns, its data sets
    for p in m.protocols:
        key = f"evaluate.also.{p.name}" if p.name else "evaluate"
        parser = evaluate_cli.build_parser()

        def refuse(message: str, key=key):
            raise ManifestError(f"{m.path.name}: {key}.args do not parse: {message}")

        parser.error = refuse
        try:
            args = parser.parse_args([*p.args, "--models", "x"])
            specs = evaluate_cli.attack_specs(args)
        except ValueError as e:
            if isinstance(e, ManifestError):
                raise
            raise ManifestError(f"{m.path.name}: {key}.args: {e}") from None
        columns = {"clean"} | {f"{s.name} {eps_label(s.eps)}" for s in specs}
        by_eps: dict[float, int] = {}
        for s in specs:
            by_eps[s.eps] = by_eps.get(s.eps, 0) + 1
        columns |= {f"worst {eps_label(e)}" for e, k in by_eps.items() if k > 1}
        given.append((p, columns, evaluate_cli.data_specs(args)))
    for i, (p, _, dp) in enumerate(given):
        for q, _, dq in given[i + 1:]:
            shared = [x for x in p.models if x in q.models]
            both = None if dp is None or dq is None else [d for d in dp if d in dq]
            if shared and (both is None or both):
                where = "every data set of the family" if both is None else "; ".join(both)
                raise ManifestError(f"{m.path.name}: evaluate.also.{q.name} evaluates {shared[0]} on {where}, as "
                                    f"{'evaluate.also.' + p.name if p.name else '[evaluate]'} does: one model's "
                                    "protocols must cover different data sets (give each its own --data)")
    every_column = set().union(*(c for _, c, _ in given))
    for i, c in enumerate(m.claims):
        if c.column not in every_column:
            raise ManifestError(f"{m.path.name}: claims[{i}].column = {c.column!r} is not a column of this "
                                f"evaluation; valid: {', '.join(sorted(every_column))}")
        for side in (c.a, c.b):
            if not any(side in p.models and c.column in cols
                       and (c.data == "average" or dp is None or any(_same_data(c.data, d) for d in dp))
                       for p, cols, dp in given):
                raise ManifestError(f"{m.path.name}: claims[{i}]: no evaluation gives {side} the column "
                                    f"{c.column!r} on {c.data!r}")
        metrics = _metrics((bases.get(c.a, c.a), bases.get(c.b, c.b)))
        if metrics is not None and c.metric not in metrics:
            raise ManifestError(f"{m.path.name}: claims[{i}].metric = {c.metric!r} is not a metric these models "
                                f"are scored with; valid: {', '.join(metrics)}")
    return {p.name: dp for p, _, dp in given}


FAMILY_METRICS = {"clip": ("top1",), "captioner": ("cider", "bleu4", "rouge_l"), "vqa": ("exact_match",)}


def _metrics(models: tuple[str, ...]) -> tuple[str, ...] | None:
    """The metrics ``models`` (presets or shipped checkpoints) are scored with, from their families; None
    when a family cannot be told without loading the model (a folder of weights)."""
    out: list[str] = []
    for ref in models:
        families = _families(ref)
        if families is None:
            return None
        out += [x for f in families for x in FAMILY_METRICS.get(f, ())]
    return tuple(dict.fromkeys(out))


def _families(ref: str) -> tuple[str, ...] | None:
    """A preset's or shipped checkpoint's model families; None for anything else (a folder of weights)."""
    from ..models import PRESETS, checkpoints_dir

    if ref in PRESETS:
        return tuple(PRESETS[ref].families)
    try:
        return (json.loads((checkpoints_dir() / ref / "config.json").read_text())["family"],)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _units(data: list[str] | None, base: str) -> int:
    """How many data sets an evaluation of a ``base`` model scores (0: not known)."""
    from ..evaluate.run import default_data

    families = _families(base) or ()
    return len(data) if data is not None else len(default_data(families[0])) if len(families) == 1 else 0


def plan(m: Manifest) -> list[Job]:
    """Every job of the manifest, in an order that runs training before the evaluations that need it."""
    jobs: list[Job] = []
    for name, run in m.runs.items():
        for seed in m.seeds:
            folder = run_folder(m, name, seed)
            argv = [*m.train_args, *run.args, "--seed", str(seed), "--out", str(folder), "--no-progress"]
            want = train_config(m, argv)
            state = train_state(m, m.at(folder), want)
            if state == RESUME:  # the run's own settings come from its snapshot; where weights live does not
                argv = ["--resume", str(folder), "--no-progress", *_weights_dir(argv)]
            jobs.append(Job("train", f"{name} seed {seed}", argv, run.minutes, state, model=name, seed=seed,
                            folder=m.at(folder), steps=int(want["loop"]["steps"]), config=want))
    data = check_claims(m, {j.model: j.config["loop"]["model"] for j in jobs})
    for p in m.protocols:
        for model in p.models:
            jobs += _evaluations(m, p, model, jobs, data[p.name])
    return jobs


def _evaluations(m: Manifest, p: Protocol, model: str, jobs: list[Job], data: list[str] | None) -> list[Job]:
    """The evaluation jobs of one model under one protocol (each seed of a run; each budget with split_eps);
    ``data``: the protocol's data sets."""
    out_jobs = []
    seeds: list[int | None] = list(m.seeds) if model in m.runs else [None]
    for seed in seeds:
        trainer = next((j for j in jobs if j.kind == "train" and j.label == f"{model} seed {seed}"), None)
        units = _units(data, trainer.config["loop"]["model"] if trainer else model)
        for eps, args in _jobs_of(p):
            ref = str(run_folder(m, model, seed)) if seed is not None else model
            out = eval_out(m, model, seed, eps, p.name)
            label = (model + (f" seed {seed}" if seed is not None else "") + (f" eps {eps}" if eps else "")
                     + (f" ({p.name})" if p.name else ""))
            job = Job("evaluate", label, [*args, "--models", ref, "--out", str(out), "--resume"],
                      p.eval_minutes(model, eps), model=model, seed=seed, out=m.at(out),
                      folder=m.at(run_folder(m, model, seed)) if seed is not None else None,
                      needs=[trainer.label] if trainer else [], protocol=p.name, units=units)
            if trainer is None or trainer.state == DONE:  # a model still training is evaluated again
                job.journal = journal_units(job)
                state = eval_state(job)
                job.state = RESUME if state == FRESH and job.journal else state
            out_jobs.append(job)
    return out_jobs


def _weights_dir(argv: list[str]) -> list[str]:
    for i, a in enumerate(argv):
        if a == "--weights-dir" and i + 1 < len(argv):
            return argv[i:i + 2]
        if a.startswith("--weights-dir="):
            return [a]
    return []
