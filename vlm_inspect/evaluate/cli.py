"""Command line of the evaluation module: JSON + markdown table (command shown above it) + plot."""
from __future__ import annotations


import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from ..attacks import ATTACKS, NORMS, add_region_arguments, attack_help, booster_help, is_bounded, taking
from ..attacks.boosters import check_diversity, check_momentum
from ..attacks.base import parse_fraction
from ..runtime import add_arguments, apply_weights_dir, resolve_device
from . import autoattack as AA
from .journal import Journal, journal_path
from .region import RegionSpec
from .run import AttackSpec, parse_eps, records


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vlm_inspect.evaluate",
        description=f"Clean and robust metrics of models on data sets, under {' / '.join(map(str.upper, ATTACKS.list()))} "
                    "or the AutoAttack ensemble. Many processes: torchrun --nproc_per_node=N -m vlm_inspect.evaluate "
                    "... shards the samples across them (the same table as one process).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", required=True, help="comma-separated preset names or checkpoint folders")
    p.add_argument("--vision-tower", default=None, metavar="CLIP",
                   help="every LLaVA in --models reads images through this CLIP's vision encoder (an open_clip name "
                        "or folder, or a transformers CLIPModel), as if named '<llava>|tower=<CLIP>'; to compare "
                        "both, list the LLaVA and '<llava>|tower=<CLIP>' in --models instead")
    p.add_argument("--data", default=None,
                   help="comma-free list separated by ';' of data specs; default: every shapes data set of the family")
    p.add_argument("--attack", default="pgd",
                   help=f"comma-separated: none, {', '.join(ATTACKS.list())} ({attack_help()}), or {AA.NAME}: the "
                        "standard ensemble for zero-shot models (APGD-CE, APGD-T, Square; their own budgets, "
                        "not --steps)")
    p.add_argument("--eps", default="1/255", help="comma-separated budgets, k/255 or decimals (pixel units)")
    p.add_argument("--steps", type=int, default=10, help=f"iterations ({taking('steps')})")
    p.add_argument("--alpha", default=None, help="step size: k/255, or eps/<n> for a fraction of each budget; default 2.5*eps/steps")
    p.add_argument("--no-random-start", action="store_true", help=f"start at the clean image ({taking('random_start')})")
    p.add_argument("--restarts", type=int, default=1,
                   help="restarts of the attacks with a random start; worst case per sample")
    p.add_argument("--norm", default="linf", choices=list(NORMS))
    p.add_argument("--momentum", type=float, default=0.0, help=booster_help("momentum"))
    p.add_argument("--diversity", type=float, default=0.0, help=booster_help("diversity"))
    p.add_argument("--transfer-from", default=None, metavar="MODEL[,MODEL...]",
                   help="also craft each attack on these models and score the images on every --models entry "
                        "(transfer robustness; sources and targets of one family)")
    region = add_region_arguments(p, "one word for every image (default: a wrong class per image; for captions "
                                     "a shape word the references do not use)", patch_side=0.1)
    region.add_argument("--universal", action="store_true",
                        help="patch: one patch fitted on --fit-samples train images, then applied to the test images "
                             "at random places (written as a PNG beside --out)")
    region.add_argument("--fit-samples", type=int, default=64, help="patch --universal: train images it is fitted on")
    p.add_argument("--samples", type=int, default=500, help="samples per data set (test split)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="data and random starts")
    add_arguments(p, precision_default="fp32")
    p.add_argument("--out", default=None, help="markdown file to write (JSON and PNG plot beside it)")
    p.add_argument("--title", default=None, help="heading above the table")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run with the same settings: every model x data set it finished "
                        "(recorded beside --out, in <out>.partial.jsonl) is read back, not computed again "
                        "(white-box and AutoAttack rows; transfer and region rows are computed again)")
    return p


def with_vision_tower(models: list[str], tower: str) -> list[str]:
    """``--vision-tower``: each LLaVA of ``models`` as ``<llava>|tower=<tower>``; refused without a LLaVA."""
    from ..models.llava import tower_name
    from ..models.loading import is_llava

    if not any(is_llava(m) for m in models):
        raise ValueError("--vision-tower swaps a LLaVA's vision encoder and --models names no LLaVA "
                         "(e.g. llava-hf/llava-1.5-7b-hf)")
    return [tower_name(m, tower) if is_llava(m) else m for m in models]


def data_specs(args: argparse.Namespace) -> list[str] | None:
    """The data sets ``--data`` names (';'-separated); None when it names none: every data set of the family."""
    return [d.strip() for d in args.data.split(";") if d.strip()] if args.data else None


def attack_specs(args) -> list[AttackSpec]:
    names = [a.strip().lower() for a in args.attack.split(",") if a.strip()]
    names = [n for n in names if n not in ATTACKS or is_bounded(n)]  # the others: region_specs
    eps = [parse_eps(e) for e in args.eps.split(",") if e.strip()]
    for n in names:
        if n != "none" and n != AA.NAME and n not in ATTACKS:
            raise ValueError(f"unknown attack {n!r}; valid: none, {', '.join(ATTACKS.list())}, {AA.NAME}")
    for e in eps:
        if args.norm == "linf":
            AA.check_eps(e, "linf")
    if args.steps < 1 or args.restarts < 1 or args.samples < 1:
        raise ValueError("--steps, --restarts and --samples must be >= 1")
    check_momentum(args.momentum), check_diversity(args.diversity)  # one sentence before any model loads
    text = (args.alpha or "").strip().replace(" ", "")
    if text.startswith("eps/"):  # a fraction of each budget, e.g. eps/4
        try:
            ratio = parse_fraction(text[4:])
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"cannot read --alpha {args.alpha!r}; write eps/<number> or k/255") from None
        if ratio <= 0:
            raise ValueError(f"--alpha {args.alpha!r} must divide eps by a positive number")
        alpha_of = lambda e: e / ratio  # noqa: E731
    else:
        fixed = parse_eps(text) if text else None
        alpha_of = lambda e: fixed  # noqa: E731
    return [AttackSpec(n, e, args.steps, alpha_of(e), not args.no_random_start, args.restarts, args.norm,
                       momentum=args.momentum, diversity=args.diversity)
            for e in eps if e > 0 for n in names if n != "none"]


def region_specs(args) -> list[RegionSpec]:
    """The attacks without an epsilon that ``--attack`` names, checked before any model loads."""
    names = [a.strip().lower() for a in args.attack.split(",") if a.strip()]
    alpha = parse_eps(args.alpha) if args.alpha and not args.alpha.strip().startswith("eps/") else None
    specs = []
    for n in names:
        if n in ATTACKS and not is_bounded(n):
            settings = ({"text_size": args.text_size, "colour": args.colour, "opacity": args.opacity,
                         "font": args.font, "position": args.position} if n == "typographic" else
                        {"patch_side": args.patch_side, "steps": args.steps, "alpha": alpha, "position": args.position,
                         "random_start": not args.no_random_start})
            spec = RegionSpec(n, settings, word=args.word.strip(), universal=args.universal and n == "patch",
                              fit=args.fit_samples)
            spec.describe()  # builds the attack: a bad setting is one sentence now
            specs.append(spec)
    if args.universal and not any(s.universal for s in specs):
        raise ValueError("--universal applies to --attack patch")
    if args.fit_samples < 1:
        raise ValueError("--fit-samples must be >= 1")
    return specs


def training_info(name: str) -> dict[str, Any] | None:
    """How a checkpoint was trained (from its config.json): defense, part, steps, batch size, training time."""
    from ..checkpoints import CheckpointError, read_config
    from ..runtime import checkpoints_dir

    folder = Path(name) if Path(name).is_dir() else checkpoints_dir() / name
    try:
        config = read_config(folder)
    except CheckpointError:
        return None
    loop = config.get("hyperparameters", {}).get("loop", {})
    options = config.get("hyperparameters", {}).get("defense", {})
    seconds, steps = config.get("train_seconds"), config.get("steps")
    if seconds is None or not steps:
        return None
    keys = ("part", "k", "gamma", "attack_eps", "adv_fraction")
    return {"model": name, "defense": config.get("defense"), "init": config.get("base") or loop.get("init"),
            "options": ", ".join(f"{k}={options[k]}" for k in keys if k in options),
            "steps": steps, "batch_size": loop.get("batch_size"), "precision": loop.get("precision"),
            "train_seconds": seconds, "seconds_per_step": round(seconds / steps, 3)}


def markdown(rows: list[dict[str, Any]], command: str, specs: list[AttackSpec], title: str | None,
             trained: list[dict[str, Any]] | None = None) -> str:
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    eps_cols = list(dict.fromkeys(r["eps"] for r in rows if r["eps"] != "0"))
    lines = []
    if title:
        lines += [f"## {title}", ""]
    lines += ["Produced by:", "", "```", command, "```", ""]
    if specs:
        shown = lambda v: " ".join(f"{k2} {v2}" for k2, v2 in v.items()) if isinstance(v, dict) else v  # noqa: E731
        desc = "; ".join(sorted({", ".join(f"{k}={shown(v)}" for k, v in s.describe().items() if k != "eps")
                                 for s in specs}))
        lines += [f"Attacks: {desc}. Samples per data set: {rows[0]['n'] if rows else 0}. "
                  "\"worst\" = worst case per sample over the attacks at that eps.", ""]
    for metric in metrics:
        mrows = [r for r in rows if r["metric"] == metric]
        attacks = list(dict.fromkeys(r["attack"] for r in mrows if r["attack"] != "none"))
        cols = ["clean"] + [f"{a} {e}" for e in eps_cols for a in attacks
                            if any(r["attack"] == a and r["eps"] == e for r in mrows)]
        lines += [f"**{metric}**", "", "| model | data | " + " | ".join(cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        keys = list(dict.fromkeys((r["model"], r["data"]) for r in mrows))
        for model, data in keys:
            cell = {("clean" if r["attack"] == "none" else f"{r['attack']} {r['eps']}"): r["value"]
                    for r in mrows if r["model"] == model and r["data"] == data}
            lines.append(f"| {model} | {data.removeprefix('shapes:')} | " +
                         " | ".join(f"{cell[c]:.3f}" if c in cell else "–" for c in cols) + " |")
        # average over data sets, per model
        if len({d for _, d in keys}) > 1:
            for model in dict.fromkeys(m for m, _ in keys):
                vals = {c: [r["value"] for r in mrows if r["model"] == model and
                            ("clean" if r["attack"] == "none" else f"{r['attack']} {r['eps']}") == c] for c in cols}
                lines.append(f"| {model} | **average** | " +
                             " | ".join(f"{sum(v) / len(v):.3f}" if v else "–" for v in vals.values()) + " |")
        lines.append("")
    ensemble = [r for r in rows if r.get("stages") is not None]
    if ensemble:
        lines += [f"**{AA.NAME}**: robust accuracy after each attack, each run on the images still correct; "
                  f"{AA.LEFT_OUT}", "",
                  "| model | data | eps | clean | " + " | ".join(f"after {a}" for a in AA.LABELS.values()) +
                  " | time | flags |", "|---|---|---|---|" + "---|" * len(AA.LABELS) + "---|---|"]
        for r in ensemble:
            clean = next((c["value"] for c in rows if c["model"] == r["model"] and c["data"] == r["data"]
                          and c["attack"] == "none" and c["metric"] == r["metric"]), None)
            after = {st["attack"]: st["robust"] for st in r["stages"]}
            lines.append(f"| {r['model']} | {r['data'].removeprefix('shapes:')} | {r['eps']} | "
                         f"{clean:.3f} | " + " | ".join(f"{after[a]:.3f}" if a in after else "–" for a in AA.LABELS.values())
                         + f" | {sum(st['seconds'] for st in r['stages']):.0f} s | "
                         + (", ".join(f["code"] for f in r["flags"]) or "–") + " |")
        notes = list(dict.fromkeys(f"{f['code']}: {f['text']}" for r in ensemble for f in r["flags"]))
        notes += list(dict.fromkeys(x for r in ensemble for x in r["skipped"] if x != AA.LEFT_OUT))
        lines += [""] + [f"- {t}" for t in notes] + ([""] if notes else [])
    if trained:
        lines += ["**training** (from each checkpoint's config.json; loop time, without evaluation and saving)", "",
                  "| model | defense | options | from | steps x batch | precision | train time | s / step |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in trained:
            lines.append(f"| {t['model']} | {t['defense']} | {t['options'] or '–'} | {t['init']} | "
                         f"{t['steps']} x {t['batch_size']} | {t['precision']} | {t['train_seconds']:.0f} s | "
                         f"{t['seconds_per_step']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        mrows = [r for r in rows if r["metric"] == metric]
        for model in dict.fromkeys(r["model"] for r in mrows):
            pts: dict[float, list[float]] = {}
            for r in mrows:
                if r["model"] != model or r["attack"] not in ("none", "worst") and \
                        any(o["attack"] == "worst" for o in mrows if o["eps"] == r["eps"]):
                    continue
                e = 0.0 if r["eps"] == "0" else parse_eps(r["eps"])
                pts.setdefault(e * 255, []).append(r["value"])
            xs = sorted(pts)
            ax.plot(xs, [sum(pts[x]) / len(pts[x]) for x in xs], marker="o", label=model)
        ax.set_xlabel("eps (x/255)")
        ax.set_ylabel(f"{metric} (mean over data sets)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    command = "python -m vlm_inspect.evaluate " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    from ..checkpoints import CheckpointError
    from ..data.sources import DataError
    from ..models import ModelUnavailableError
    from .run import evaluate

    from .. import distributed as D

    try:
        specs = attack_specs(args)
        regions = region_specs(args)
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        if args.vision_tower:
            models = with_vision_tower(models, args.vision_tower.strip())
        data = data_specs(args)
        apply_weights_dir(args)
    except (DataError, CheckpointError, ValueError, ModelUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.resume and not args.out:
        print("error: --resume continues the run that writes --out; give the same --out", file=sys.stderr)
        return 2
    shard = D.setup(args.device)  # under torchrun: the samples are sharded across the ranks
    if shard.world > 1:
        logging.getLogger("vlm_inspect.evaluate").info("rank %d of %d: every %d-th batch of samples",
                                                       shard.rank, shard.world, shard.world)
        batches = -(-args.samples // args.batch_size)
        if batches < shard.world and shard.main:  # the ranks without a batch would wait, not work
            logging.getLogger("vlm_inspect.evaluate").warning(
                "%d sample(s) in batches of %d make %d batch(es) per data set, fewer than the %d processes: the "
                "others wait; --batch-size %d or less keeps every process busy", args.samples, args.batch_size,
                batches, shard.world, max(1, args.samples // shard.world))
    try:
        rows = []
        if args.transfer_from:  # first: a source of another family stops the run before the long part
            from .transfer import evaluate_transfer

            sources = [m.strip() for m in args.transfer_from.split(",") if m.strip()]
            rows += evaluate_transfer(sources, models, data, specs, args.samples, args.batch_size, args.seed,
                                      args.device, args.precision, shard=shard)
        if regions:
            from .region import evaluate_region

            if shard.world > 1:
                raise ValueError("the typographic and patch rows run in one process: run them without torchrun")
            rows += evaluate_region(models, data, regions, args.samples, args.batch_size, args.seed, args.device,
                                    args.precision, out=args.out)
        journal = None
        if args.out and (specs or not regions):  # every rank reads it, before any unit is done; rank 0 writes
            journal = Journal(journal_path(args.out), {
                "attacks": [s.describe() for s in specs], "samples": args.samples, "batch_size": args.batch_size,
                "seed": args.seed, "precision": args.precision, "device": str(resolve_device(args.device))},
                              args.resume, shard.main)
        if specs or not regions:
            rows += evaluate(models, data, specs, args.samples, args.batch_size, args.seed, args.device,
                             precision=args.precision, shard=shard, journal=journal)
    except (DataError, CheckpointError, ValueError, ModelUnavailableError) as e:
        if shard.main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        D.teardown(shard)
    if not shard.main:  # rank 0 writes; every rank computed the same rows
        return 0
    trained = [t for t in map(training_info, models) if t]
    from .region import region_markdown
    from .transfer import transfer_markdown

    white = [r for r in rows if "source" not in r and not r.get("region")]
    table = "\n".join(filter(None, [markdown(white, command, specs, args.title, trained), transfer_markdown(rows),
                                    region_markdown(rows, regions)]))
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
        out.with_suffix(".json").write_text(json.dumps({"command": command, "attacks": [s.describe() for s in specs],
                                                        "rows": rows, "records": records(white, specs, args.seed, args.norm),
                                                        "region_attacks": [s.describe() for s in regions],
                                                        "training": trained}, indent=1) + "\n")
        written = [out, out.with_suffix(".json")]
        if white:  # the plot is of epsilon; the typographic and patch rows have none
            plot(white, out.with_suffix(".png"))
            written.append(out.with_suffix(".png"))
        print("wrote " + ", ".join(map(str, written)))
        if journal:
            journal.finish()
    return 0
