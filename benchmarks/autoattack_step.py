"""Where the AutoAttack speed ratio comes from: the cost of one attack run of ours and of the reference
(``pyautoattack``) on the same images, attack by attack, in one process.

    python benchmarks/autoattack_step.py --model shapes-clip+tecoa --eps 2/255 --samples 64

A defended model at a small eps keeps most images: no image can leave a batch early, so this times the
work per step itself. Rows: APGD-CE (ours with and without early stop; the reference with the weights
requiring gradients, as a user hands a model over, and frozen) and Square (both forward-only).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from apgd_check import Logits  # noqa: E402  (beside this script: pixels -> zero-shot logits)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-clip+tecoa")
    ap.add_argument("--data", default="shapes:shapes-combo")
    ap.add_argument("--eps", default="2/255")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="APGD iterations")
    ap.add_argument("--queries", type=int, default=300, help="Square queries")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from pyautoattack.autopgd_base import APGDAttack
    from pyautoattack.square import SquareAttack

    from vlm_inspect.attacks import APGD, Square
    from vlm_inspect.attacks.base import parse_eps
    from vlm_inspect.data.sources import open_data
    from vlm_inspect.images import to_pixels
    from vlm_inspect.models import load
    from vlm_inspect.objectives import ZeroShotCE, ZeroShotMargin

    torch.set_num_threads(args.threads)
    eps = parse_eps(args.eps)
    clip = load(args.model)
    clip.eval()
    data = open_data(args.data, "test", seed=0, length=args.samples, image_size=clip.image_size)
    x = to_pixels([data[i]["image"] for i in range(len(data))], clip.image_size)
    y = torch.tensor([data[i]["label"] for i in range(len(data))])
    texts = data.prompts
    with torch.no_grad():
        text = clip.encode_text(texts)
    net = Logits(clip, texts).eval()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, out

    def grads(on: bool) -> None:
        for p in clip.parameters():
            p.requires_grad_(on)

    rows = []
    ce = lambda: ZeroShotCE(clip, texts, y, text_features=text)  # noqa: E731
    s, r = timed(lambda: APGD(eps, steps=args.steps)(x, ce(), generator=gen(), early_stop=True))
    rows.append((f"APGD-CE {args.steps} steps", "ours, early stop", s, f"{int(r.stopped.sum())} stopped early"))
    s, _ = timed(lambda: APGD(eps, steps=args.steps)(x, ce(), generator=gen()))
    rows.append((f"APGD-CE {args.steps} steps", "ours, no early stop", s, ""))
    ref = APGDAttack(net, n_iter=args.steps, norm="Linf", eps=eps, seed=0, device="cpu", n_restarts=1)
    grads(True)
    s, _ = timed(lambda: ref.perturb(x, y))
    rows.append((f"APGD-CE {args.steps} steps", "reference, weights requiring gradients", s, ""))
    grads(False)
    s, _ = timed(lambda: ref.perturb(x, y))
    rows.append((f"APGD-CE {args.steps} steps", "reference, frozen weights", s, ""))
    s, r = timed(lambda: Square(eps, steps=args.queries)(x, ZeroShotMargin(clip, texts, y, text_features=text),
                                                         generator=gen(), early_stop=True))
    rows.append((f"Square {args.queries} queries", "ours, early stop", s, f"{int(r.stopped.sum())} fooled"))
    grads(True)
    sq = SquareAttack(net, p_init=0.8, n_queries=args.queries, eps=eps, norm="Linf", n_restarts=1, seed=0,
                      device="cpu")
    s, _ = timed(lambda: sq.perturb(x, y))
    rows.append((f"Square {args.queries} queries", "reference", s, ""))

    print(f"`{args.model}`, {len(y)} `{args.data.split(':')[-1]}` images at {args.eps}, "
          f"{args.threads} thread(s), torch {torch.__version__}\n")
    print("| attack | run | seconds | note |\n|---|---|---|---|")
    for attack, run, sec, note in rows:
        print(f"| {attack} | {run} | {sec:.2f} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
