"""Attack speed: ours against torchattacks, per-step overhead, the machine's limit, robustness curves.

    python benchmarks/attack_speed.py [--repeats 5] [--out docs/attack_speed.json]

1. PGD-10 (L-inf, 4/255, step 1/255, random start) on zero-shot cross-entropy over 10 prompts, for
   ``shapes-clip`` (shipped weights) and ``openai/ViT-B-32`` (random weights: the real one's FLOPs), at
   batch 1 and 16. ``torchattacks.PGD`` gets a logits wrapper (text features computed once) around
   (a) the model as open_clip builds and runs it (its ``encode_image``) and (b) the same modules and
   image path our adapter runs; ours runs
   ``vlm_inspect.attacks.PGD`` on ``zero_shot_ce`` with the same text features, in fp32 and bf16.
2. Per-step overhead: our PGD step against a bare forward + backward to the pixels of the same model.
3. The machine's limit: the rate of a large matrix product (fp32, bf16) and the FLOPs of one PGD step
   on ViT-B-32 (``torch.utils.flop_counter``), giving the fraction of that rate a step achieves.
4. Robustness curve: the app's 8 budgets of one image (``service.CURVE_EPS_K``; budget 0 is the clean
   image and needs no attack, so 7 are attacked) as one batched attack, against one attack of that image.

Every time is the median of ``--repeats`` runs (the cases interleaved), after one warm-up run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

CLASSES = ["cat", "dog", "car", "bird", "ship", "plane", "horse", "truck", "frog", "deer"]
SHAPES_CLASSES = ["red circle", "blue square", "green triangle", "yellow star", "purple cross", "orange heart",
                  "red square", "blue circle", "green star", "yellow heart"]


def stock(adapter):
    """A deep copy of the adapter with open_clip's own modules back (undo ``models.clip.speed_up``)."""
    from vlm_inspect.models.clip import stock_copy

    return stock_copy(adapter)[0]


class Logits(torch.nn.Module):
    """pixels -> zero-shot logits, text features fixed: what torchattacks attacks. ``stock``: through
    open_clip's own ``encode_image`` (the model as open_clip builds and runs it), else through our
    adapter's (the class-token-only last block)."""

    def __init__(self, adapter, text_features, stock: bool = False):
        super().__init__()
        self.adapter, self.text, self.stock = adapter, text_features, stock

    def forward(self, x):
        if self.stock:
            image = torch.nn.functional.normalize(self.adapter.model.encode_image(self.adapter.normalize(x)), dim=-1)
        else:
            image = self.adapter.encode_image(x)
        return self.adapter.logits(image, self.text)


def median_times(cases: dict, repeats: int) -> dict[str, float]:
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for k, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def matmul_rate(dtype, n: int = 4096, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    t = median_times({"mm": lambda: a @ b}, repeats)["mm"]
    return 2 * n**3 / t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default="shapes-clip,openai/ViT-B-32")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--parts", default="pgd,curve", help="which parts to run: pgd (1-3), curve (4)")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    ap.add_argument("--bf16", default="auto", choices=["auto", "on", "off"],
                    help="also time bf16 autocast; auto = only where the CPU computes bf16 natively "
                         "(without AVX512-BF16 / AMX a bf16 matmul is emulated, ~40x slower than fp32 here)")
    args = ap.parse_args()
    from vlm_inspect.runtime import cpu_has_native_bf16

    precs = ("fp32", "bf16") if args.bf16 == "on" or (args.bf16 == "auto" and cpu_has_native_bf16()) else ("fp32",)

    import torchattacks

    from vlm_inspect import __version__
    from vlm_inspect.attacks import PGD
    from vlm_inspect.models import load
    from vlm_inspect.objectives import zero_shot_ce
    from vlm_inspect.service import CURVE_EPS_K

    attacked = [e / 255 for e in CURVE_EPS_K if e > 0]

    torch.manual_seed(0)
    results: dict = {"machine": {}, "pgd": [], "overhead": [], "limit": {}, "curve": []}
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    results["machine"] = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "torchattacks": torchattacks.__version__,
                          "vlm_inspect": __version__, "python": platform.python_version(),
                          "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats}
    results["machine"]["native_bf16"] = cpu_has_native_bf16()
    rate = {p: matmul_rate(torch.float32 if p == "fp32" else torch.bfloat16, repeats=args.repeats) for p in precs}
    results["limit"]["matmul_gflops"] = {k: round(v / 1e9, 1) for k, v in rate.items()}
    print("matmul GFLOP/s", results["limit"]["matmul_gflops"], flush=True)

    for name in args.models.split(","):
        model = load(name, weights="default" if name.startswith("shapes") else "random")
        model.eval()
        classes = SHAPES_CLASSES if name.startswith("shapes") else CLASSES
        prompts = [f"a photo of a {c}" for c in classes]
        with torch.no_grad():
            text = model.encode_text(prompts)
        ours_model, stock_model = model, stock(model)
        ours_model = model
        for b in map(int, args.batches.split(",")) if "pgd" in args.parts else ():
            x = torch.rand(b, 3, model.image_size, model.image_size)
            y = torch.randint(0, len(classes), (b,))
            ta_stock = torchattacks.PGD(Logits(stock_model, text, stock=True).eval(), eps=4 / 255, alpha=1 / 255, steps=10)
            ta_same = torchattacks.PGD(Logits(ours_model, text).eval(), eps=4 / 255, alpha=1 / 255, steps=10)
            ours = PGD(eps=4 / 255, alpha=1 / 255, steps=10, random_start=True)
            objective = zero_shot_ce(ours_model, prompts, y, text_features=text)
            d = torch.zeros_like(x)

            def bare():  # one forward + backward to the pixels, weights frozen: the floor of a step
                delta = d.clone().requires_grad_(True)
                loss = F.cross_entropy(ours_model.logits(ours_model.encode_image(x + delta), text), y,
                                       reduction="none")
                torch.autograd.grad(loss.sum(), delta)

            def ours_bf16():
                with bf16():
                    ours(x, objective)

            def bare_bf16():
                with bf16():
                    bare()

            ours_model.requires_grad_(False)  # as the app holds its models; our attack does this itself
            cases = {"torchattacks (open_clip modules)": lambda: ta_stock(x, y),
                     "torchattacks (our modules)": lambda: ta_same(x, y),
                     "ours fp32": lambda: ours(x, objective), "bare step fp32": bare}
            if "bf16" in precs:
                cases.update({"ours bf16": ours_bf16, "bare step bf16": bare_bf16})
            t = median_times(cases, args.repeats)
            row = {"model": name, "batch": b, **{k: round(v, 4) for k, v in t.items()},
                   "ratio_vs_open_clip_modules": round(t["torchattacks (open_clip modules)"] / t["ours fp32"], 3),
                   "ratio_vs_same_modules": round(t["torchattacks (our modules)"] / t["ours fp32"], 3),
                   "bf16_gain": round(t["ours fp32"] / t["ours bf16"], 3) if "bf16" in precs else None}
            results["pgd"].append(row)
            for prec in precs:
                step = t[f"ours {prec}"] / 10
                results["overhead"].append({"model": name, "batch": b, "precision": prec, "ours_step_s": round(step, 4),
                                            "bare_step_s": round(t[f"bare step {prec}"], 4),
                                            "overhead": round(step / t[f"bare step {prec}"] - 1, 4)})
            if name == "openai/ViT-B-32":
                from torch.utils.flop_counter import FlopCounterMode

                with FlopCounterMode(display=False) as fc:
                    bare()
                flops = fc.get_total_flops()
                for prec in precs:
                    achieved = flops / (t[f"ours {prec}"] / 10)
                    results["limit"].setdefault("steps", []).append(
                        {"batch": b, "precision": prec, "gflop_per_step": round(flops / 1e9, 1),
                         "achieved_gflops": round(achieved / 1e9, 1),
                         "fraction_of_matmul_rate": round(achieved / rate[prec], 3)})
            print(json.dumps(row), flush=True)

        if "curve" not in args.parts:
            continue
        # robustness curve: the app's budgets of one image in one batched run vs one attack of that image
        ours_model.requires_grad_(False)
        x1 = torch.rand(1, 3, model.image_size, model.image_size)
        y1 = torch.zeros(1, dtype=torch.long)
        one = PGD(eps=4 / 255, steps=10, random_start=True)
        many = PGD(eps=attacked, steps=10, random_start=True)
        obj1 = zero_shot_ce(ours_model, prompts, y1, text_features=text)
        obj8 = zero_shot_ce(ours_model, prompts, y1.repeat(len(attacked)), text_features=text)
        x8 = x1.repeat(len(attacked), 1, 1, 1)
        for prec in precs:
            ctx = bf16 if prec == "bf16" else torch.enable_grad

            def run_one(ctx=ctx):
                with ctx():
                    one(x1, obj1)

            def run_curve(ctx=ctx):
                with ctx():
                    many(x8, obj8)

            t = median_times({"one": run_one, "curve": run_curve}, args.repeats)
            results["curve"].append({"model": name, "precision": prec, "budgets": len(CURVE_EPS_K),
                                     "attacked": len(attacked),
                                     "one_attack_s": round(t["one"], 4), "curve_s": round(t["curve"], 4),
                                     "ratio": round(t["curve"] / t["one"], 3)})
            print(json.dumps(results["curve"][-1]), flush=True)

    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
