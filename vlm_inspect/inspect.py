"""``python -m vlm_inspect.inspect IMAGE [IMAGE ...] --out DIR``: the app's inspection without a browser.

Runs the same :class:`~vlm_inspect.service.InspectService` inspection the page runs and writes
``report.png`` (the panel a person sees) and ``report.json`` (docs/ARCHITECTURE.md, "The report"). With several images, each
gets its own sub-folder of DIR named after the file. ``--curve`` adds ``curve.png`` and ``curve.json``;
``--check quick|standard`` runs the AutoAttack check of each side's zero-shot model and adds ``check.json``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .attacks import ATTACKS, NORMS, add_region_arguments, attack_help, booster_help, parse_eps, taking
from .explain import HEATMAPS, heatmap_help
from .models import FAMILIES, SUITES
from .runtime import add_arguments, apply_weights_dir


def build_parser() -> argparse.ArgumentParser:
    from .service import CHECK_BUDGETS, CRAFTED_ON, CURVE_EPS_K, label_sets, targets

    ap = argparse.ArgumentParser(prog="python -m vlm_inspect.inspect", description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--suite", choices=list(SUITES), default="embedded", help="model suite")
    ap.add_argument("--baseline", default="", metavar="FAMILY=NAME,...",
                    help="baseline models, e.g. 'clip=shapes-clip,vqa=none'; unnamed families use the suite default")
    ap.add_argument("--defended", default="", metavar="FAMILY=NAME,...",
                    help="defended models, e.g. 'clip=shapes-clip+tga-zsr'; default: the first <baseline>+<defense> "
                         "checkpoint, if any")
    ap.add_argument("--vision-tower", default=None, metavar="CLIP",
                    help="the defended side's LLaVA reads images through this CLIP's vision encoder (an open_clip "
                         "name or folder, e.g. hf-hub:chs20/fare2-clip, or a transformers CLIPModel); where the "
                         "defended side names no LLaVA, it takes the baseline's. Same as naming the model "
                         "'<llava>|tower=<CLIP>'")
    ap.add_argument("--attack", choices=ATTACKS.list(), default="pgd", help=attack_help())
    ap.add_argument("--norm", choices=list(NORMS), default="linf", help="threat model")
    ap.add_argument("--eps", default="4/255", help="budget in pixel units, as k/255 or a decimal (at most 32/255)")
    ap.add_argument("--steps", type=int, default=10, help=f"iterations ({taking('steps')})")
    ap.add_argument("--alpha", default="0", help="step size as k/255 or a decimal; 0 = 2.5*eps/steps (Madry et al.)")
    ap.add_argument("--no-random-start", action="store_true", help=f"no random start ({taking('random_start')})")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random start")
    ap.add_argument("--crafted-on", default="own", choices=list(CRAFTED_ON),
                    help="what each side's image is crafted on: " + "; ".join(f"{k}: {v}" for k, v in CRAFTED_ON.items()))
    ap.add_argument("--momentum", type=float, default=0.0, help=booster_help("momentum"))
    ap.add_argument("--diversity", type=float, default=0.0, help=booster_help("diversity"))
    region = add_region_arguments(ap, "the text to write (default: --target-text)", patch_side=0.2)
    region.add_argument("--patch", default=None, metavar="PNG",
                        help="patch: apply this patch image (e.g. a universal patch from evaluate) instead of optimising")
    ap.add_argument("--target", choices=targets(), default="zero-shot", help="the task whose loss is attacked")
    ap.add_argument("--target-text", default="", help="a class, caption or answer: makes the attack targeted")
    ap.add_argument("--label-set", choices=list(label_sets()), default=None,
                    help="class list and prompt template (default: the suite's)")
    ap.add_argument("--classes", default="", help="comma-separated class names (overrides --label-set)")
    ap.add_argument("--template", default="", help="prompt template with {} for the class")
    ap.add_argument("--question", default=None, help="VQA question (default: the suite's)")
    ap.add_argument("--heatmap", choices=HEATMAPS.list(), default="attention", help=heatmap_help())
    ap.add_argument("--curve", action="store_true",
                    help=f"also write the robustness curve at eps {', '.join(map(str, CURVE_EPS_K))} /255")
    ap.add_argument("--check", choices=list(CHECK_BUDGETS), default=None,
                    help="also run the AutoAttack check (APGD-CE, APGD-T, Square) of each side's zero-shot model "
                         "with this budget, and write check.json")
    add_arguments(ap)
    return ap


def parse_models(text: str, what: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        fam, sep, name = item.partition("=")
        if not sep or fam.strip() not in FAMILIES:
            raise ValueError(f"--{what}: expected FAMILY=NAME with FAMILY one of {', '.join(FAMILIES)}, got {item!r}")
        out[fam.strip()] = None if name.strip().lower() == "none" else name.strip()
    return out


def apply_vision_tower(fields: dict, tower: str, named_defended: dict[str, str | None]) -> dict:
    """``--vision-tower``: each defended LLaVA (or, for a family the defended side was not given, the
    baseline's LLaVA) becomes ``<llava>|tower=<tower>``; a selection without a LLaVA is refused."""
    from .models.llava import tower_name
    from .models.loading import is_llava

    swapped = False
    for fam in FAMILIES:
        defended, baseline = fields["defended"].get(fam), fields["baseline"].get(fam)
        base = defended if defended and is_llava(defended) else \
            baseline if baseline and is_llava(baseline) and fam not in named_defended else None
        if base:
            fields["defended"][fam] = tower_name(base, tower)
            swapped = True
    if not swapped:
        raise ValueError("--vision-tower swaps a LLaVA's vision encoder: name a LLaVA in --baseline or --defended "
                         "(e.g. captioner=llava-hf/llava-1.5-7b-hf,vqa=llava-hf/llava-1.5-7b-hf)")
    return fields


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import torch

    from .attacks.patch import save_patch
    from .images import ImageError
    from .report import curve_figure, render_png, write_json
    from .policy import ModelPolicy
    from .service import SIDES, InputError, InspectRequest, InspectService, check_text
    from .checkpoints import CheckpointError, atomic_write_json
    from .models import ModelUnavailableError

    try:
        apply_weights_dir(args)
        service = InspectService(suite=args.suite, device=args.device, precision=args.precision,
                                 policy=ModelPolicy.local())  # a local command: its user owns the machine
        named = {"baseline": parse_models(args.baseline, "baseline"), "defended": parse_models(args.defended, "defended")}
        fields = service.suite_fields(args.suite, named, args.classes, args.template, args.question, args.label_set)
        if args.vision_tower:
            fields = apply_vision_tower(fields, args.vision_tower.strip(), named["defended"])
        req = InspectRequest(
            **fields, attack=args.attack, norm=args.norm, eps_k=parse_eps(args.eps) * 255, steps=args.steps,
            alpha_k=parse_eps(args.alpha) * 255, random_start=not args.no_random_start, seed=args.seed,
            momentum=args.momentum, diversity=args.diversity, crafted_on=args.crafted_on,
            target=args.target, target_text=args.target_text, heatmap=args.heatmap, word=args.word,
            text_size=args.text_size, colour=args.colour, opacity=args.opacity, font=args.font,
            position=args.position, patch_side=args.patch_side, patch=args.patch).validate()
        out = Path(args.out)
        for path in args.images:
            folder = out if len(args.images) == 1 else out / Path(path).stem
            ins = service.inspect(path, req)
            render_png(ins, folder / "report.png")
            write_json(ins, folder / "report.json")
            print(f"{path}: wrote {folder / 'report.png'} and {folder / 'report.json'} ({ins.report['seconds']:.2f} s)")
            for w in ins.warnings:
                print(f"  warning: {w}")
            for side, patch in ((k.split("/")[1], v) for k, v in ins.images.items() if k.startswith("patch/")):
                # lossless, with its side: `--patch` (or the page's patch image) applies it again
                save_patch(torch.from_numpy(patch).permute(2, 0, 1).float() / 255, folder / f"patch_{side}.png",
                           req.patch_side)
                print(f"  wrote {folder / f'patch_{side}.png'} (the {side} side's patch)")
            for c in ins.report["transfer"]["cells"]:  # the transfer matrix, a line per cell
                print(f"  crafted on {c['crafted_on']} -> shown to {c['shown_to']} ({c['model']}): {c['output']!r} "
                      f"{'fooled' if c['fooled'] else 'held'} ({c['threat']})")
            if args.curve:
                curve = service.curve(path, req)
                fig = curve_figure(curve)
                fig.savefig(folder / "curve.png", dpi=100)
                atomic_write_json(folder / "curve.json", curve)
                print(f"  wrote {folder / 'curve.png'}")
            if args.check:
                check = service.check(path, req, args.check)
                atomic_write_json(folder / "check.json", check)
                for side in SIDES:
                    if side in check["sides"]:
                        print(f"  {side}: {check_text(check, side, gap=chr(10) + '    ')}")
                print(f"  wrote {folder / 'check.json'}")
    except (InputError, ImageError, ModelUnavailableError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
