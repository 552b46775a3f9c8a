"""A reproduction manifest: one TOML file in ``reproduce/`` that says how one table is made.

    title   = "..."                         # the table's heading
    out     = "docs/clip_seeds.md"          # the table (markdown; JSON beside it)
    runs    = "runs/reproduce/clip"         # where the runs go: <runs>/<name>/seed-<k>; default runs/reproduce/<manifest>
    seeds   = [0, 1, 2]                     # training seeds of every run
    note    = "..."                         # optional: a paragraph under the heading

    [train]                                 # arguments every run shares (python -m vlm_inspect.train)
    args = ["--model", "shapes-clip", "--steps", "300"]

    [train.runs.tecoa]                      # one training run per seed; its own arguments come last
    args = ["--defense", "tecoa", "--set", "attack_eps=4/255"]
    minutes = 10                            # the time of one seed on one thread (the plan's estimate)

    [evaluate]                              # python -m vlm_inspect.evaluate, per model and seed
    models = ["shapes-clip", "tecoa"]       # a run name (every seed) or a preset / folder (once)
    args = ["--data", "shapes:shapes-combo", "--attack", "autoattack", "--eps", "4/255", "--samples", "256"]
    minutes = 20                            # one model's evaluation on one thread
    minutes_of = { "shapes-clip" = 5 }      # optional: per model (or "<model> eps <e>" with split_eps)
    split_eps = true                        # optional: one job per --eps value (a kill loses less; two
                                            # jobs can share one model); minutes are then per budget

    [evaluate.also.styles]                  # optional: another protocol for some models (a name each):
    models = ["shapes-clip", "capt"]        # other data sets or budgets where only they are needed;
    args = ["--data", "shapes:shapes-combo@noisy", "--attack", "autoattack", "--eps", "4/255"]
    minutes = 10                            # minutes_of and split_eps as above

    [[claims]]                              # optional: a row of the claims table each
    paper = "TGA-ZSR"
    claim = "the attention terms add robustness over TeCoA"
    a = "tga-zsr"                           # the relation reads: a > b (or a ≈ b within margin)
    relation = ">"
    b = "tecoa"
    column = "autoattack 4/255"             # a column of the table ("clean", "<attack> <eps>")
    data = "shapes-combo"                   # a data set of the table, or "average"
    metric = "top1"                         # top1 (default), exact_match, cider, bleu4, rouge_l
    margin = 0.0

Relative paths (``out``, ``runs``, data folders) are read from the checkout for a manifest in ``reproduce/``,
else from the manifest's folder; the jobs run there.

Every problem is one sentence naming the file and the key, found before anything runs.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# what reproduce sets itself, or what would make a job print and exit instead of working
TRAIN_OWN = ("--out", "--seed", "--resume", "--no-progress", "--list-options", "--rank-report", "--help", "-h")
EVALUATE_OWN = ("--models", "--out", "--resume", "--title", "--help", "-h")
# the metrics evaluate writes (a claim names one): zero-shot, VQA, captions
METRICS = ("top1", "exact_match", "cider", "bleu4", "rouge_l")


class ManifestError(ValueError):
    """A manifest that cannot be run; the message names the file and what is wrong."""


@dataclass
class Run:
    name: str
    args: list[str]
    minutes: float


@dataclass
class Claim:
    paper: str
    claim: str
    a: str
    relation: str
    b: str
    column: str
    data: str
    margin: float = 0.0
    metric: str = "top1"


@dataclass
class Protocol:
    """One evaluation protocol: ``python -m vlm_inspect.evaluate <args>`` for each of ``models``. The
    manifest's ``[evaluate]`` is the first (``name`` ""); ``[evaluate.also.<name>]`` add others."""

    name: str
    models: list[str]
    args: list[str]
    minutes: float
    minutes_of: dict[str, float] = field(default_factory=dict)
    split_eps: bool = False

    @property
    def budgets(self) -> list[str]:
        """The ``--eps`` values of ``args``, as written."""
        return budgets(self.args)

    def eval_minutes(self, model: str, eps: str | None = None) -> float:
        """The estimate of one evaluation job: ``minutes_of["<model> eps <e>"]``, else ``minutes_of[model]``,
        else ``minutes``."""
        return float(self.minutes_of.get(f"{model} eps {eps}", self.minutes_of.get(model, self.minutes)))


@dataclass
class Manifest:
    path: Path
    title: str
    out: Path
    runs_dir: Path
    seeds: list[int]
    train_args: list[str]
    runs: dict[str, Run]
    protocols: list[Protocol]
    claims: list[Claim] = field(default_factory=list)
    note: str = ""

    @property
    def models(self) -> list[str]:
        """Every model any protocol evaluates, in the order the manifest names them (the table's rows)."""
        return list(dict.fromkeys(x for p in self.protocols for x in p.models))

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def root(self) -> Path:
        """What ``out``, ``runs`` and the jobs' paths are relative to (the jobs run there): the checkout for a
        manifest in its ``reproduce/`` folder, else the manifest's own folder."""
        folder = self.path.resolve().parent
        return folder.parent if folder.name == "reproduce" else folder

    def at(self, path: Path) -> Path:
        return self.root / path


def budgets(evaluate_args: list[str]) -> list[str]:
    if "--eps" not in evaluate_args[:-1]:
        return []
    return [e.strip() for e in evaluate_args[evaluate_args.index("--eps") + 1].split(",") if e.strip()]


def manifest_dir() -> Path:
    """``reproduce/`` of the checkout this package runs from (an editable install), else of the cwd."""
    here = Path(__file__).resolve().parents[2] / "reproduce"
    return here if here.is_dir() else Path("reproduce")


def find(name: str) -> Path:
    """A manifest by path, or by name in ``reproduce/`` (``clip-defenses`` = ``reproduce/clip-defenses.toml``)."""
    p = Path(name)
    if p.is_file():
        return p
    q = manifest_dir() / (name if name.endswith(".toml") else f"{name}.toml")
    if q.is_file():
        return q
    known = ", ".join(sorted(x.stem for x in manifest_dir().glob("*.toml"))) or "(none)"
    raise ManifestError(f"no manifest {name!r}: give a .toml file or one of {known}")


def _strings(where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise ManifestError(f"{where} must be a list of strings (command-line arguments)")
    return [str(v) for v in value]


def _refuse_own(where: str, args: list[str], own: tuple[str, ...]) -> None:
    for a in args:
        if a.split("=", 1)[0] in own:
            raise ManifestError(f"{where} must not give {a.split('=', 1)[0]}: reproduce sets it")


def _minutes(where: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ManifestError(f"{where} must be a positive number of minutes")
    return float(value)


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"cannot read the manifest {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"{path} is not valid TOML: {e}") from None
    w = lambda key: f"{path.name}: {key}"  # noqa: E731
    known = {"title", "out", "runs", "seeds", "note", "train", "evaluate", "claims"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ManifestError(f"{w(unknown[0])} is not a manifest key; valid: {', '.join(sorted(known))}")
    for key in ("title", "out", "evaluate"):
        if key not in doc:
            raise ManifestError(f"{w(key)} is missing")
    seeds = doc.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ManifestError(f"{w('seeds')} must be a list of distinct whole numbers >= 0")
    train = doc.get("train", {})
    runs_table = train.get("runs", {}) if isinstance(train, dict) else {}
    if not isinstance(train, dict) or not isinstance(runs_table, dict):
        raise ManifestError(f"{w('train')} must be a table with args and [train.runs.<name>] tables")
    train_args = _strings(w("train.args"), train.get("args", []))
    _refuse_own(w("train.args"), train_args, TRAIN_OWN)
    runs = {}
    for name, spec in runs_table.items():
        key = f"train.runs.{name}"
        if not isinstance(spec, dict) or "args" not in spec or "minutes" not in spec:
            raise ManifestError(f"{w(key)} needs args and minutes")
        if "/" in name or name.startswith("."):
            raise ManifestError(f"{w(key)}: a run name is a folder name (no '/', no leading '.')")
        args = _strings(w(key + ".args"), spec["args"])
        _refuse_own(w(key + ".args"), args, TRAIN_OWN)
        runs[name] = Run(name, args, _minutes(w(key + ".minutes"), spec["minutes"]))
    ev = doc["evaluate"]
    if not isinstance(ev, dict):
        raise ManifestError(f"{w('evaluate')} needs models, args and minutes")
    also = ev.get("also", {})
    if not isinstance(also, dict) or not all(isinstance(v, dict) for v in also.values()):
        raise ManifestError(f"{w('evaluate.also')} must hold [evaluate.also.<name>] tables")
    protocols = [_protocol(w, "evaluate", "", {k: v for k, v in ev.items() if k != "also"})]
    for name, spec in also.items():
        if "/" in name or name.startswith(".") or not name:
            raise ManifestError(f"{w('evaluate.also.' + name)}: a protocol name is a folder name (no '/', no leading '.')")
        protocols.append(_protocol(w, f"evaluate.also.{name}", name, spec))
    models = list(dict.fromkeys(x for p in protocols for x in p.models))
    claims = []
    for i, c in enumerate(doc.get("claims", [])):
        key = f"claims[{i}]"
        need = ("paper", "claim", "a", "relation", "b", "column", "data")
        if not isinstance(c, dict) or any(k not in c for k in need):
            raise ManifestError(f"{w(key)} needs {', '.join(need)}")
        for side in ("a", "b"):
            if c[side] not in models:
                raise ManifestError(f"{w(key + '.' + side)} = {c[side]!r} is not a model of any evaluation")
        if c["relation"] not in (">", "≈", "~"):
            raise ManifestError(f"{w(key + '.relation')} must be '>' or '≈'")
        margin = c.get("margin", 0.0)
        if not isinstance(margin, (int, float)) or isinstance(margin, bool) or margin < 0:
            raise ManifestError(f"{w(key + '.margin')} must be a number >= 0")
        if c["relation"] != ">" and margin <= 0:
            raise ManifestError(f"{w(key + '.margin')}: a '≈' claim needs a margin > 0")
        metric = c.get("metric", "top1")
        if metric not in METRICS:
            raise ManifestError(f"{w(key + '.metric')} = {metric!r}; valid: {', '.join(METRICS)}")
        claims.append(Claim(str(c["paper"]), str(c["claim"]), c["a"], c["relation"], c["b"], str(c["column"]),
                            str(c["data"]), float(margin), metric))
    return Manifest(path=path, title=str(doc["title"]), out=Path(doc["out"]),
                    runs_dir=Path(doc.get("runs", f"runs/reproduce/{path.stem}")),
                    seeds=seeds, train_args=train_args, runs=runs, protocols=protocols, claims=claims,
                    note=str(doc.get("note", "")))


def _protocol(w, key: str, name: str, ev: dict[str, Any]) -> Protocol:
    """``[evaluate]`` or ``[evaluate.also.<name>]``, checked."""
    known = {"models", "args", "minutes", "minutes_of", "split_eps"}
    unknown = sorted(set(ev) - known - ({"also"} if not name else set()))
    if unknown:
        raise ManifestError(f"{w(key + '.' + unknown[0])} is not a key of an evaluation; valid: {', '.join(sorted(known))}")
    if "models" not in ev or "args" not in ev or "minutes" not in ev:
        raise ManifestError(f"{w(key)} needs models, args and minutes")
    models = _strings(w(f"{key}.models"), ev["models"])
    if not models or len(set(models)) != len(models):
        raise ManifestError(f"{w(key + '.models')} must name each model once")
    args = _strings(w(f"{key}.args"), ev["args"])
    _refuse_own(w(f"{key}.args"), args, EVALUATE_OWN)
    minutes_of = ev.get("minutes_of", {})
    if not isinstance(minutes_of, dict):
        raise ManifestError(f"{w(key + '.minutes_of')} must be a table of model = minutes")
    minutes_of = {k: _minutes(w(f"{key}.minutes_of.{k}"), v) for k, v in minutes_of.items()}
    split_eps = ev.get("split_eps", False)
    if not isinstance(split_eps, bool):
        raise ManifestError(f"{w(key + '.split_eps')} must be true or false")
    if split_eps and "--eps" not in args:
        raise ManifestError(f"{w(key + '.split_eps')} splits the --eps list of {key}.args, which gives none")
    jobs_named = set(models) | {f"{m} eps {e}" for m in models for e in budgets(args) if split_eps}
    for k in minutes_of:
        if k not in jobs_named:
            raise ManifestError(f"{w(key + '.minutes_of')}: {k!r} is no model of {key}.models"
                                + (" (nor '<model> eps <e>' of its --eps)" if split_eps else ""))
    return Protocol(name, models, args, _minutes(w(f"{key}.minutes"), ev["minutes"]), minutes_of, split_eps)
