"""Captions and answers one image at a time against one batched call (what the service's TextBatch does).

    python benchmarks/text_batch.py --weights-dir W [--repeats 5] [--batch 3]

For ``nlpconnect/vit-gpt2-image-captioning`` and ``Salesforce/blip-vqa-base`` (the weights folder from
``python -m vlm_inspect.models.fetch --random --out W``: full-size architectures, random weights, so the
captioner always decodes its 20 new tokens and the VQA model its 10) under ``--precision auto``'s
runtime on this machine: image encoders at the resolved precision, decoding loops in fp32 on a CPU.
Reports the median over ``--repeats`` runs (after a warm-up) of ``--batch`` calls of one image and of
one call of ``--batch`` images. A full inspection of a new image with the same models on both sides
generates three captions and three answers (the clean image once, each side's adversarial image).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights-dir", required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=3)
    args = ap.parse_args()

    from vlm_inspect.models import load
    from vlm_inspect.runtime import autocast, decoding_precision, resolve_precision

    precision = resolve_precision("auto", "cpu")
    decode = decoding_precision("auto", precision, "cpu")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}; encoders {precision}, decoding {decode}; "
          f"median of {args.repeats}\n")
    print(f"| model | {args.batch} calls of 1 image (s) | 1 call of {args.batch} images (s) | saved |")
    print("|---|---|---|---|")
    for name in ("nlpconnect/vit-gpt2-image-captioning", "Salesforce/blip-vqa-base"):
        model = load(name, weights=os.path.join(args.weights_dir, name))
        model.eval().requires_grad_(False)
        px = torch.rand(args.batch, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))

        def run(x):
            if model.family == "captioner":
                return model.generate(x)
            return model.answer(x, ["what is in the picture?"] * len(x))

        cases = {"single": lambda: [run(px[i:i + 1]) for i in range(args.batch)], "batched": lambda: run(px)}
        times: dict[str, list[float]] = {k: [] for k in cases}
        with torch.no_grad(), autocast("cpu", precision, decoding=decode):
            for fn in cases.values():
                fn()
            for _ in range(args.repeats):
                for k, fn in cases.items():
                    t = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t)
        single, batched = (statistics.median(times[k]) for k in ("single", "batched"))
        print(f"| {name} | {single:.2f} | {batched:.2f} | {1 - batched / single:.0%} |", flush=True)


if __name__ == "__main__":
    main()
