"""Command line of the training module. Every option shows its default; ``--set KEY=VALUE`` passes a
defense's own options (listed with ``--list-options``)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from ..defenses import DEFENSES
from ..defenses.generative import PARTS
from ..runtime import DEVICE_HELP, PRECISION_HELP, add_arguments, apply_weights_dir
from .loop import TrainConfig

HELP = {
    "defense": "training objective: base (plain training) or a defense",
    "model": "preset name or checkpoint folder to train",
    "init": "start weights: random, default (shipped/hub) or a folder; auto = random for base, else default",
    "data": "data spec: shapes:<dataset>[@style], imagefolder:<dir>, coco:<imgs>,<captions.json>, "
            "flickr8k:<imgs>,<Flickr8k.token.txt>, vqav2:<imgs>,<questions.json>,<annotations.json>; "
            "auto = shapes:shapes-combo for the CLIP defenses, shapes:shapes-scenes otherwise",
    "out": "run folder: model.safetensors + config.json, snapshots, log.jsonl",
    "device": DEVICE_HELP,
    "precision": PRECISION_HELP + " (fp16 with loss scaling)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vlm_inspect.train",
        description="Train an embedded baseline or reproduce a defense; writes a checkpoint the app loads.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Multi-process / multi-GPU: torchrun --nproc_per_node=N -m vlm_inspect.train ... "
               "(multi-node: add --nnodes, --node_rank, --rdzv_endpoint). --batch-size is per process.")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "options":
            continue
        default = f.default
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" |")[0].replace("'", ""), str)
        if f.name == "shots":
            kind = int
        text = HELP.get(f.name, f.name.replace("_", " "))
        if f.name == "defense":  # the registered defenses, with the families each applies to
            text += ": " + ", ".join(f"{k} ({'/'.join(DEFENSES.meta(k)['families'])})"
                                     for k in DEFENSES.list() if k != "base")
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=default, help=text)
    p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="a defense option (repeatable); see --list-options")
    p.add_argument("--part", default=None, choices=list(PARTS),
                   help="captioning / VQA defenses: which part trains (same as --set part=...); "
                        "decoder = the language side with the vision encoder frozen")
    p.add_argument("--resume", default=None, metavar="OUT", help="continue the run in this folder from its last snapshot")
    p.add_argument("--list-options", action="store_true", help="print the chosen defense's options and defaults, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--rank-report", action="store_true", help=argparse.SUPPRESS)
    add_arguments(p, device=False, precision=False)  # --weights-dir
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config from parsed arguments (``--set`` and ``--part`` become the defense's options)."""
    options = {}
    for item in args.options:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        options[k.strip()] = v.strip()
    if args.part is not None:
        options["part"] = args.part
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "options"}
    return TrainConfig(**values, options=options)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from ..checkpoints import CheckpointError
    from ..data.sources import DataError
    from .loop import train
    from .state import RunFolderError

    if args.list_options:
        cls = DEFENSES.get(args.defense)
        for f in dataclasses.fields(cls.Config):
            print(f"{f.name} = {f.default!r}")
        return 0
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ..models import ModelUnavailableError

    try:
        apply_weights_dir(args)
        out = train(cfg, resume=args.resume, progress=not args.no_progress, rank_report=args.rank_report)
    except (DataError, CheckpointError, ValueError, FileNotFoundError, FloatingPointError,
            ModelUnavailableError, RunFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {Path(out) / 'model.safetensors'}; load it with vlm_inspect.load({cfg.model!r}, weights={str(out)!r})")
    return 0
