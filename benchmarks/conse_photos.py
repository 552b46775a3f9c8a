"""The typographic and patch attacks on the ConSE photo model (the embedded suite's zero-shot model for
photos), on the four sample photos in ``assets/``: the photo rows of docs/ATTACK_STUDIES.md.

There is no photo data set offline, so these are four inspections, not an accuracy: for each photo
the clean top-1 of the 12 everyday classes, then, through the app's own service, the typographic attack
(each photo gets the name of a wrong class, the next one in the list after its clean top-1) and the patch attack (optimised on the photo, PGD, ``--steps`` steps) at ``--position`` at each side
in ``--sides``. A universal patch needs a training set of photos, which the machine does not have.

    python benchmarks/conse_photos.py --steps 50 --sides 0.1,0.2
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sides", default="0.1,0.2", help="patch sides, fractions of the image side")
    ap.add_argument("--text-size", type=float, default=0.2)
    ap.add_argument("--position", default="auto", help="of the word and the patch: auto, random or a grid cell")
    args = ap.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from vlm_inspect.models.conse import PHOTO_CLIP
    from vlm_inspect.service import InspectRequest, InspectService, label_sets

    classes, template = label_sets()["everyday objects (12)"]
    sides = [float(s) for s in args.sides.split(",") if s.strip()]
    if not sides:
        ap.error("--sides needs at least one patch side")
    service = InspectService(suite="embedded")
    none = {"captioner": None, "vqa": None}
    base = dict(baseline={"clip": PHOTO_CLIP, **none}, defended={"clip": None, **none}, classes=classes,
                template=template, question="", seed=0)

    def top1(report) -> tuple[str, float]:
        zs = report["models"][PHOTO_CLIP]["adversarial"]["zero_shot"]
        return zs["labels"][0], zs["probs"][0]

    head = ["photo", "clean top-1", "typographic word", "after the word"] + [f"patch {s:g}" for s in sides]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    t0 = time.time()
    for photo in sorted((ROOT / "assets").glob("photo_*.jpg")):
        # the patches first: their reports carry the clean top-1 that picks the word
        patched = [service.inspect(photo, InspectRequest(**base, attack="patch", patch_side=s, steps=args.steps,
                                                         position=args.position)).report for s in sides]
        clean = patched[0]["models"][PHOTO_CLIP]["clean"]["zero_shot"]
        label, p = clean["labels"][0], clean["probs"][0]
        word = classes[(classes.index(label) + 1) % len(classes)]
        typo = service.inspect(photo, InspectRequest(**base, attack="typographic", word=word, text_size=args.text_size,
                                                     position=args.position))
        cells = [photo.stem.removeprefix("photo_"), f"{label} ({p:.2f})", word, "%s (%.2f)" % top1(typo.report)]
        cells += ["%s (%.2f)" % top1(r) for r in patched]
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], file=sys.stderr)
    print(f"Produced by: python benchmarks/conse_photos.py {' '.join(argv if argv is not None else sys.argv[1:])}"
          f" ({time.time() - t0:.0f} s)\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
