"""Latency of a full inspection through the app's API (gradio_client -> /inspect) on the embedded suite.

    python benchmarks/app_latency.py [--n 30] [--out docs/BENCHMARKS.md]

One inspection = PGD-10 (L-inf, 4/255) on the zero-shot task for the baseline *and* the defended side
(each attacked white-box), the three tasks (zero-shot top-5 over 48 classes, caption, VQA answer) on
the clean and adversarial images of both sides, and text-guided attention heatmaps. When no defended
checkpoint exists the baseline models stand in on the defended side, so both sides are computed.
Two cases: a new image each call (clean results computed) and a slider move (same image, new eps:
clean results come from the cache). Reports the median and 90th percentile over ``--n`` calls after
two warm-up calls.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=30, help="timed calls per case")
    ap.add_argument("--out", default=None, help="markdown file to append the results to")
    args = ap.parse_args()

    import gradio
    import torch
    from gradio_client import Client, handle_file
    from PIL import Image

    from vlm_inspect import __version__
    from vlm_inspect.data.shapes import ShapesDataset
    from vlm_inspect.service import InspectService
    from vlm_inspect.ui import build_demo

    service = InspectService(model_dirs=[])
    d = service.defaults()
    defended = {f: d["defended"][f] or d["baseline"][f] for f in d["baseline"]}
    demo = build_demo(service)
    demo.queue(default_concurrency_limit=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False, quiet=True)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    tmp = Path(tempfile.mkdtemp())
    ds = ShapesDataset("shapes-scenes", split="test", length=1000, image_size=128)
    paths = []
    for i in range(args.n + 2):
        Image.fromarray(ds.image(i)).save(tmp / f"{i}.png")
        paths.append(tmp / f"{i}.png")
    kw = {"attack": "pgd", "steps": 10, "norm": "linf", "target": "zero-shot", "heatmap": "attention",
          **{f"defended_{f}": defended[f] for f in defended}}

    def timed(path, eps):
        t = time.perf_counter()
        rep = client.predict(handle_file(str(path)), eps=eps, api_name="/inspect", **kw)
        assert len([m for m in rep["models"].values() if "adversarial" in m]) == 6, rep["models"].keys()
        return time.perf_counter() - t

    results = {}
    for p in paths[:2]:
        timed(p, 4.0)
    results["new image each call"] = [timed(p, 4.0) for p in paths[2:]]
    results["slider move (same image, cached clean results)"] = [timed(paths[2], 1.0 + (i % 16)) for i in range(args.n)]
    demo.close()

    def p90(xs):
        return sorted(xs)[max(0, int(round(0.9 * len(xs))) - 1)]

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [f"### App latency ({time.strftime('%Y-%m-%d')})", "",
             f"`python benchmarks/app_latency.py --n {args.n}` — {cpu}, {os.cpu_count()} cores, torch "
             f"{torch.__version__} ({torch.get_num_threads()} threads), gradio {gradio.__version__}, "
             f"vlm_inspect {__version__}, Python {platform.python_version()}.", "",
             "| case | calls | median (s) | p90 (s) |", "|---|---|---|---|"]
    for case, xs in results.items():
        lines.append(f"| {case} | {len(xs)} | {statistics.median(xs):.3f} | {p90(xs):.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    sys.exit(main())
