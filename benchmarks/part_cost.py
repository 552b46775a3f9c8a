"""Training cost of decoder-only vs full vs encoder-only FGSM adversarial training (the efficiency claim of
arXiv 2407.21174): median seconds per optimisation step of ``--defense fgsm-decoder`` with each ``--part``,
on the same batches, in one process (the shared training loop's step: loss with its FGSM images,
backward, AdamW step). Run it with nothing else on the machine:

    python benchmarks/part_cost.py --model shapes-captioner --batch-size 64 --steps 20 --precision bf16
    python benchmarks/part_cost.py --model nlpconnect/vit-gpt2-image-captioning --init random --batch-size 8 --steps 5

``--init random`` builds the real architecture with random weights (same FLOPs as the real model).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-captioner")
    ap.add_argument("--init", default="default", help="default (shipped / hub weights), random, or a folder")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per part (after 2 warm-up steps)")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--parts", default="decoder,full,encoder")
    args = ap.parse_args()

    from vlm_inspect.data.shapes import ShapesDataset
    from vlm_inspect.defenses import DEFENSES
    from vlm_inspect.defenses.common import make_config
    from vlm_inspect.models import load

    rows = []
    for part in args.parts.split(","):
        model = load(args.model, weights=args.init)
        data = ShapesDataset("shapes-scenes", split="train", length=args.batch_size * 4, image_size=model.image_size)
        cls = DEFENSES.get("fgsm-decoder")
        task = cls(model, make_config(cls.Config, {"part": part}), data)
        params = task.trainable_parameters()
        opt = torch.optim.AdamW(params, lr=1e-5)
        batches = [task.collate([data[i * args.batch_size + j] for j in range(args.batch_size)], i) for i in range(4)]
        times = []
        model.train()
        for s in range(args.steps + 2):
            batch = batches[s % len(batches)]
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                loss, _ = task.loss(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if s >= 2:
                times.append(time.perf_counter() - t)
        n = sum(p.numel() for p in params)
        rows.append((part, statistics.median(times), min(times), n))
        del model, task, opt
    base = rows[0][1]
    print(f"{args.model} ({args.init} weights), batch {args.batch_size}, {args.precision}, median of {args.steps} steps; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("| part | trained parameters | s / step (median) | fastest | vs first |")
    print("|---|---|---|---|---|")
    for part, med, fast, n in rows:
        print(f"| {part} | {n / 1e6:.2f} M | {med:.3f} | {fast:.3f} | {med / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
