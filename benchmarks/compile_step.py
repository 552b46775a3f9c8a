"""Does ``torch.compile`` of the attacked model pay for its warm-up in an APGD run? One run of APGD on
the zero-shot CE of an embedded CLIP, eager against compiled, same images, same start:

    python benchmarks/compile_step.py --model shapes-clip+tecoa --batch 128 --steps 100

Prints the compile warm-up (the first compiled call), the time per step of each, the number of steps
after which the compiled run is ahead, and whether the iterates agree (the largest difference in
pixel units). ``docs/BENCHMARKS.md`` holds a run.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import torch


class Compiled:
    """The adapter with its image encoder compiled (what an attack calls on every step)."""

    def __init__(self, model, mode: str | None):
        self.model, self.family, self.name = model, model.family, model.name
        self.encode = torch.compile(model.encode_image, mode=mode, dynamic=False)

    def __getattr__(self, item):
        return getattr(self.model, item)

    def encode_image(self, x):
        return self.encode(x)


def run(model, x, y, prompts, eps, steps):
    from vlm_inspect.attacks import APGD
    from vlm_inspect.objectives import ZeroShotCE

    times = []
    obj = ZeroShotCE(model, prompts, y)
    t0 = time.perf_counter()
    res = APGD(eps, steps=steps)(x, obj, generator=torch.Generator().manual_seed(0),
                                 callback=lambda s, n, _l: times.append(time.perf_counter() - t0))
    return res, times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-clip+tecoa")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eps", type=float, default=4 / 255)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mode", default=None, help="torch.compile mode (default, reduce-overhead, max-autotune)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from vlm_inspect.data.sources import open_data
    from vlm_inspect.images import to_pixels
    from vlm_inspect.models import load

    model = load(args.model)
    model.eval()
    for p in model.parameters():  # frozen in both runs (the wrapper is not a module the attack could freeze)
        p.requires_grad_(False)
    data = open_data("shapes:shapes-combo", "test", seed=0, length=args.batch, image_size=model.image_size)
    x = to_pixels([data[i]["image"] for i in range(len(data))], model.image_size)
    y = torch.tensor([data[i]["label"] for i in range(len(data))])
    eager, t_eager = run(model, x, y, data.prompts, args.eps, args.steps)
    compiled, t_comp = run(Compiled(model, args.mode), x, y, data.prompts, args.eps, args.steps)
    per_eager = (t_eager[-1] - t_eager[0]) / (len(t_eager) - 1)
    per_comp = (t_comp[-1] - t_comp[0]) / (len(t_comp) - 1)
    warm = t_comp[0] - t_eager[0]
    ahead = next((i + 1 for i, (a, b) in enumerate(zip(t_eager, t_comp)) if b < a), None)
    diff = float((eager.adv - compiled.adv).abs().max())
    print(f"`python benchmarks/compile_step.py {' '.join(sys.argv[1:])}` — {platform.machine()}, "
          f"{args.threads} thread(s), torch {torch.__version__}\n")
    print("| run | first step (s) | per step after it (s) | whole run (s) |\n|---|---|---|---|")
    print(f"| eager | {t_eager[0]:.2f} | {per_eager:.4f} | {t_eager[-1]:.1f} |")
    print(f"| torch.compile | {t_comp[0]:.2f} | {per_comp:.4f} | {t_comp[-1]:.1f} |")
    print(f"\nwarm-up {warm:.1f} s; compiled step {per_eager / per_comp:.2f}x the eager speed; "
          f"compiled run ahead after {ahead if ahead else 'never, within'} {'steps' if ahead else args.steps} steps; "
          f"largest difference of the final images {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
