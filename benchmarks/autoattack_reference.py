"""Agreement and speed of ``evaluate --attack autoattack`` against the original AutoAttack (``pyautoattack``,
the packaged reference implementation, ``version="standard"``), on the same images, in one run.

    pip install -r requirements-dev.txt      # pyautoattack is a dev dependency
    python benchmarks/autoattack_reference.py \\
        --models shapes-clip,shapes-clip+tecoa,shapes-clip+tga-zsr,shapes-clip+apd,shapes-clip+capt \\
        --eps 2/255,4/255 --samples 256 --out docs/autoattack_reference.json

For every model and eps: the robust accuracy after each attack of ours (APGD-CE, APGD-T, Square; no
FAB-T) and of the reference (APGD-CE, APGD-T, FAB-T, Square), the difference in points, and the time of
each (reference time / ours = the speed ratio). One pair takes up to an hour on one CPU thread, so the
output is written after every pair and a second run skips the pairs already in it (``--fresh`` redoes
them). ``docs/ATTACK_STUDIES.md`` and ``docs/BENCHMARKS.md`` show the tables this writes
(``--table`` prints them from the JSON without running anything).

The reference attacks the model as a user hands it over: eval mode, weights still requiring gradients,
fp32. Ours runs as ``evaluate`` does: frozen weights, early stop, fp32.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import sys
import time
from pathlib import Path

import torch

from apgd_check import Logits  # noqa: E402  (beside this script: pixels -> zero-shot logits)


class Collect(logging.Handler):
    """The reference logs "robust accuracy after APGD-CE: 65.62% (total time 4.3 s)": keep those lines."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.after: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.warnings: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        m = re.match(r"robust accuracy after ([\w-]+): ([\d.]+)% \(total time ([\d.]+) s\)", msg)
        if m:
            self.after[m.group(1).lower()] = float(m.group(2)) / 100
            self.seconds[m.group(1).lower()] = float(m.group(3))
        elif record.levelno >= logging.WARNING:
            self.warnings.append(msg)


def _inputs(name: str, data_spec: str, samples: int, seed: int):
    from vlm_inspect.data.sources import open_data
    from vlm_inspect.images import to_pixels
    from vlm_inspect.models import load

    clip = load(name)
    clip.eval()
    data = open_data(data_spec, "test", seed=seed, length=samples, image_size=clip.image_size)
    x = to_pixels([data[i]["image"] for i in range(len(data))], clip.image_size)
    y = torch.tensor([data[i]["label"] for i in range(len(data))])
    return clip, data.prompts, x, y


def _run_info() -> dict:
    """When and on which boot of which machine a side ran: two sides' times make a speed ratio only when
    they ran on the same boot."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
            "boot": boot.read_text().strip() if boot.is_file() else None}


def run_ours(name: str, data_spec: str, eps: float, samples: int, seed: int, batch_size: int) -> dict:
    from vlm_inspect.evaluate.autoattack import autoattack

    clip, prompts, x, y = _inputs(name, data_spec, samples, seed)
    info = _run_info()
    t = time.perf_counter()
    ours = autoattack(clip, x, y, prompts, eps, seed=seed, batch_size=batch_size)
    return {"clean": ours.clean_accuracy, "robust": ours.robust_accuracy, "seconds": round(time.perf_counter() - t, 1),
            "after": {s.attack.lower(): s.robust for s in ours.stages},
            "attack_seconds": {s.attack.lower(): s.seconds for s in ours.stages},
            "flags": [f.code for f in ours.flags], **info}


def run_reference(name: str, data_spec: str, eps: float, samples: int, seed: int, batch_size: int) -> dict:
    from pyautoattack import AutoAttack

    clip, prompts, x, y = _inputs(name, data_spec, samples, seed)
    net = Logits(clip, prompts).eval()
    for p in clip.parameters():  # as a user hands a model over
        p.requires_grad_(True)
    log = logging.getLogger("auto-attack")
    log.setLevel(logging.DEBUG)
    collect = Collect()
    log.addHandler(collect)
    info = _run_info()
    try:
        ref = AutoAttack(net, norm="Linf", eps=eps, version="standard", seed=seed, device="cpu")
        t = time.perf_counter()
        _, y_adv = ref.run_standard_evaluation(x, y, batch_size=batch_size)
        ref_s = time.perf_counter() - t
    finally:
        log.removeHandler(collect)
    return {"robust": float((y_adv == y).float().mean()), "seconds": round(ref_s, 1), "after": collect.after,
            "elapsed_after": collect.seconds, "warnings": collect.warnings, **info}


def derive(r: dict) -> dict:
    """The difference and the speed ratio, once both sides are in; the ratio only for sides timed on the same
    boot (``side_by_side`` when their runs overlapped)."""
    o, f = r.get("ours"), r.get("reference")
    for k in ("difference_points", "speed_ratio"):
        r.pop(k, None)
    if o and "clean" in o:
        r["clean"] = o["clean"]
    if o and f:
        r["difference_points"] = round((o["robust"] - f["robust"]) * 100, 2)
        if o.get("boot", "old") == f.get("boot", "old"):
            r["speed_ratio"] = round(f["seconds"] / o["seconds"], 2)
    return r


def table(results: list[dict]) -> str:
    lines = ["| model | eps | clean | ours: APGD-CE → APGD-T → Square | reference: APGD-CE → APGD-T → FAB-T → Square "
             "| ours − reference (points) | time ours / reference | speed ratio | ratio without FAB-T |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        o, f = r.get("ours"), r.get("reference")
        ours = " → ".join(f"{o['after'][k]:.3f}" for k in ("apgd-ce", "apgd-t", "square") if k in o["after"]) \
            if o else "not run yet"
        ref = " → ".join(f"{f['after'][k]:.3f}" for k in ("apgd-ce", "apgd-t", "fab-t", "square")
                         if k in f["after"]) if f else "not run yet"
        if f and len(f["after"]) < 4:  # the reference stops once no image is left standing
            ref += f" (stopped: {f['robust']:.3f})"
        diff = f"{r['difference_points']:+.2f}" if "difference_points" in r else "–"
        times = " / ".join(f"{s['seconds']:.0f} s" if s else "–" for s in (o, f))
        ratio = f"{r['speed_ratio']:.2f}×" if "speed_ratio" in r else "–"
        clean = f"{r['clean']:.3f}" if "clean" in r else "–"
        lines.append(f"| {r['model']} | {r['eps']:g}/255 | {clean} | {ours} | {ref} | {diff} | {times} | "
                     f"{ratio} | {_without_fab(r) if 'speed_ratio' in r else '–'} |")
    return "\n".join(lines)


def _without_fab(r: dict) -> str:
    """The reference's time minus its FAB-T (from its cumulative log times), over ours."""
    t = r["reference"].get("elapsed_after")
    if not t:
        return "–"
    fab = t["fab-t"] - t["apgd-t"] if "fab-t" in t else 0.0
    return f"{(r['reference']['seconds'] - fab) / r['ours']['seconds']:.2f}×"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="shapes-clip,shapes-clip+tecoa,shapes-clip+tga-zsr,shapes-clip+apd,shapes-clip+capt")
    ap.add_argument("--data", default="shapes:shapes-combo")
    ap.add_argument("--eps", default="2/255,4/255")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/autoattack_reference.json")
    ap.add_argument("--side", choices=("both", "ours", "reference"), default="both",
                    help="run one side only: two processes, one per side on its own core, time both under the "
                         "same load and halve a pair's wall time")
    ap.add_argument("--fresh", action="store_true", help="redo the pairs already in --out")
    ap.add_argument("--table", action="store_true", help="print the table from --out and stop")
    args = ap.parse_args()
    from vlm_inspect.attacks.base import parse_eps

    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() and not args.fresh else {"results": []}
    if args.table:
        print(table(doc["results"]))
        return 0
    torch.set_num_threads(args.threads)
    doc.update(command="python " + " ".join(sys.argv), machine=f"{platform.machine()}, {args.threads} thread(s), "
                                                                f"torch {torch.__version__}")
    sides = ("ours", "reference") if args.side == "both" else (args.side,)
    same = lambda x, key: (x["model"], x["data"], x["eps"], x["samples"], x["seed"]) == key  # noqa: E731
    for eps_text in args.eps.split(","):
        eps = parse_eps(eps_text)
        for name in args.models.split(","):
            key = (name, args.data, round(eps * 255, 4), args.samples, args.seed)
            for side in sides:
                if any(same(r, key) and side in r for r in doc["results"]):
                    continue
                run = run_ours if side == "ours" else run_reference
                result = run(name, args.data, eps, args.samples, args.seed, args.batch_size)
                # re-read before writing: another run (the other side or eps, on the other core) may have
                # written since; a side is written as soon as it is done, so a cut loses at most one side
                latest = json.loads(out.read_text()) if out.is_file() else {"results": []}
                entry = next((x for x in latest["results"] if same(x, key)), None)
                if entry is None:
                    entry = dict(zip(("model", "data", "eps", "samples", "seed"), key))
                    latest["results"].append(entry)
                entry[side] = result
                derive(entry)
                doc = {**latest, "command": doc["command"], "machine": doc["machine"]}
                tmp = out.with_suffix(f".{side}.tmp")
                tmp.write_text(json.dumps(doc, indent=1) + "\n")
                tmp.replace(out)
                print(table([entry]).splitlines()[-1], flush=True)
    print(table(doc["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
