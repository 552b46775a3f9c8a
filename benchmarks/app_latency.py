"""Latency of a full inspection through the app's API (gradio_client -> /inspect), and the app's memory.

    python benchmarks/app_latency.py [--n 30] [--out docs/BENCHMARKS.md]
    python benchmarks/app_latency.py --suite pretrained --weights-dir W [--defended-clip RUN] [--tasks zero-shot]

The app runs as its own process (``python app.py`` on a free port, with the given suite, precision and
weights folder); its peak resident memory (``VmHWM``) is read from /proc after the calls.

One inspection = PGD-10 (L-inf, 4/255) on the zero-shot task for the baseline *and* the defended side
(each attacked white-box), the three tasks (zero-shot top-5 over 48 classes, caption, VQA answer) on
the clean and adversarial images of both sides, and text-guided attention heatmaps. When no defended
checkpoint exists the baseline models stand in on the defended side, so both sides are computed.
Two cases: a new image each call (clean results computed) and a slider move (same image, new eps:
clean results come from the cache). Reports the median and 90th percentile over ``--n`` calls after
two warm-up calls. ``--tasks zero-shot`` sets the captioner and VQA models to none on both sides.
``--check`` also times the "check with AutoAttack" (``/check``, quick budget) on the zero-shot models of
both sides: per call, and per side (the seconds each side's verdict reports), at eps 1/255 (the defended
side mostly survives: every attack runs its whole budget) and 4/255. With ``--suite pretrained``, the weights folder holds full-size models (``python -m
vlm_inspect.models.fetch --random --out W`` writes them with random weights: the real FLOPs).
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def peak_memory_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in open(f"/proc/{pid}/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=30, help="timed calls per case")
    ap.add_argument("--suite", default="embedded", choices=["embedded", "pretrained"])
    ap.add_argument("--weights-dir", default=None, help="the app's --weights-dir (pretrained suite)")
    ap.add_argument("--precision", default="auto", help="the app's --precision")
    ap.add_argument("--defended-clip", default=None, help="the defended CLIP (default: the suite's, else the baseline)")
    ap.add_argument("--models-dir", default=None, help="the app's --models-dir")
    ap.add_argument("--tasks", default="all", choices=["all", "zero-shot"])
    ap.add_argument("--check", action="store_true", help="also time the AutoAttack check (/check)")
    ap.add_argument("--only-check", action="store_true", help="time the AutoAttack check only")
    ap.add_argument("--out", default=None, help="markdown file to append the results to")
    args = ap.parse_args()

    import gradio
    import torch
    from gradio_client import Client, handle_file
    from PIL import Image

    from vlm_inspect import __version__
    from vlm_inspect.data.shapes import ShapesDataset
    from vlm_inspect.service import InspectService

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--suite", args.suite,
           "--precision", args.precision, "--models-dir", args.models_dir or str(Path(tempfile.mkdtemp())),
           "--rate-limit", "100000"]  # one client sends every timed call: the per-client limit would stop it
    if args.weights_dir:
        cmd += ["--weights-dir", args.weights_dir]
    app = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if app.poll() is not None:
                    sys.exit(f"the app exited: {app.stderr.read()[-2000:]}")
                time.sleep(0.5)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        d = InspectService(suite=args.suite, model_dirs=[]).defaults()
        defended = {f: d["defended"][f] or d["baseline"][f] for f in d["baseline"]}
        if args.defended_clip:
            defended["clip"] = args.defended_clip
        if args.tasks == "zero-shot":
            defended.update(captioner="none", vqa="none")
        kw = {"attack": "pgd", "steps": 10, "norm": "linf", "target": "zero-shot", "heatmap": "attention",
              "suite": args.suite, **{f"defended_{f}": defended[f] for f in defended}}
        if args.tasks == "zero-shot":
            kw.update(baseline_captioner="none", baseline_vqa="none")
        n_models = 2 if args.tasks == "zero-shot" else 6
        tmp = Path(tempfile.mkdtemp())
        ds = ShapesDataset("shapes-scenes", split="test", length=1000, image_size=128)
        paths = []
        for i in range(args.n + 2):
            Image.fromarray(ds.image(i)).save(tmp / f"{i}.png")
            paths.append(tmp / f"{i}.png")

        def timed(path, eps):
            t = time.perf_counter()
            rep = client.predict(handle_file(str(path)), eps=eps, api_name="/inspect", **kw)
            assert len([m for m in rep["models"].values() if "adversarial" in m]) == n_models, rep["models"].keys()
            timed.runtime = rep["runtime"]
            return time.perf_counter() - t

        results = {}
        if not args.only_check:
            for p in paths[:2]:
                timed(p, 4.0)
            results["new image each call"] = [timed(p, 4.0) for p in paths[2:]]
            results["slider move (same image, cached clean results)"] = [timed(paths[2], 1.0 + (i % 16))
                                                                         for i in range(args.n)]
        if args.check or args.only_check:
            timed.runtime = "as above"
            ckw = {k: v for k, v in kw.items() if k not in ("heatmap",)}
            for eps in (1.0, 4.0):
                calls, sides, survived = [], [], 0
                client.predict(handle_file(str(paths[0])), eps=eps, api_name="/check", **ckw)  # warm-up
                for p in paths[2:]:
                    t = time.perf_counter()
                    res = client.predict(handle_file(str(p)), eps=eps, api_name="/check", **ckw)
                    calls.append(time.perf_counter() - t)
                    sides += [e["seconds"] for e in res["sides"].values()]
                    survived += sum(e["survives"] for e in res["sides"].values())
                results[f"AutoAttack check (quick), eps {eps:g}/255, both sides, per call"] = calls
                results[f"AutoAttack check (quick), eps {eps:g}/255, per side ({survived} of {len(sides)} survived)"] = sides
        memory = peak_memory_mb(app.pid)
    finally:
        app.terminate()
        app.wait(30)

    def p90(xs):
        return sorted(xs)[max(0, int(round(0.9 * len(xs))) - 1)]

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    models = {f"baseline {f}": d["baseline"][f] for f in d["baseline"]} | {f"defended {f}": v for f, v in defended.items()}
    if args.tasks == "zero-shot":
        models = {k: v for k, v in models.items() if k.endswith("clip")}
    lines = [f"### App latency ({time.strftime('%Y-%m-%d')}, {args.suite} suite, {args.tasks} tasks)", "",
             f"`python benchmarks/app_latency.py {' '.join(sys.argv[1:])}` — {cpu}, {os.cpu_count()} cores, torch "
             f"{torch.__version__}, gradio {gradio.__version__}, vlm_inspect {__version__}, "
             f"Python {platform.python_version()}. App runtime: {timed.runtime}. Models: "
             + ", ".join(f"{k} `{v}`" for k, v in models.items()) + ".", "",
             "| case | calls | median (s) | p90 (s) |", "|---|---|---|---|"]
    for case, xs in results.items():
        lines.append(f"| {case} | {len(xs)} | {statistics.median(xs):.3f} | {p90(xs):.3f} |")
    lines += ["", f"Peak resident memory of the app process (VmHWM): **{memory['VmHWM']:.0f} MB** "
              f"(resident at the end: {memory['VmRSS']:.0f} MB)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    sys.exit(main())
