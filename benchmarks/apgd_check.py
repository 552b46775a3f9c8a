"""Gradient-masking and attack-strength check: robust zero-shot accuracy of each CLIP under a peer's
APGD (torchattacks, Croce & Hein 2020; CE and DLR losses) next to this project's PGD, on the same samples.

    pip install --no-deps torchattacks   # its pinned requests breaks the hub client otherwise
    python benchmarks/apgd_check.py --models shapes-clip,shapes-clip+tecoa,shapes-clip+tga-zsr,shapes-clip+apd,shapes-clip+capt \
        --data shapes:shapes-combo --eps 4/255 --samples 100

If a defense only masked gradients, APGD (step-size free, with its own restarts) would find far more
adversarial examples than our PGD; "worst" is the per-sample worst case over all attacks run.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch import nn


class Logits(nn.Module):
    """pixels in [0,1] -> zero-shot logits over fixed class prompts (what torchattacks attacks)."""

    def __init__(self, clip, prompts):
        super().__init__()
        self.clip = clip
        with torch.no_grad():
            self.text = clip.encode_text(prompts)

    def forward(self, pixels):
        return self.clip.logits(self.clip.encode_image(pixels), self.text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True)
    ap.add_argument("--data", default="shapes:shapes-combo")
    ap.add_argument("--eps", default="4/255")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--steps", type=int, default=50, help="iterations of every attack")
    ap.add_argument("--restarts", type=int, default=2, help="restarts of our PGD")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torchattacks

    from vlm_inspect.attacks import PGD
    from vlm_inspect.data.sources import open_data
    from vlm_inspect.evaluate.run import parse_eps
    from vlm_inspect.models import load
    from vlm_inspect.objectives import zero_shot_ce

    eps = parse_eps(args.eps)
    rows = []
    for name in args.models.split(","):
        clip = load(name)
        clip.eval()
        for p in clip.parameters():
            p.requires_grad_(False)
        data = open_data(args.data, "test", seed=args.seed, length=args.samples, image_size=clip.image_size)
        x = torch.stack([torch.from_numpy(data[i]["image"]).permute(2, 0, 1).float() / 255 for i in range(len(data))])
        y = torch.tensor([data[i]["label"] for i in range(len(data))])
        net = Logits(clip, data.prompts).eval()
        with torch.no_grad():
            clean = net(x).argmax(1) == y
        correct = {"clean": clean}
        # our PGD as docs/REPRODUCTION.md's protocol runs it: step eps/4, early stop, restarts, worst case
        ours = clean.clone()
        for r in range(args.restarts):
            gen = torch.Generator().manual_seed(args.seed * 1000 + r)
            res = PGD(eps=eps, alpha=eps / 4, steps=args.steps, random_start=True)(
                x, zero_shot_ce(clip, data.prompts, y), generator=gen, early_stop=True)
            with torch.no_grad():
                ours &= (net(res.adv).argmax(1) == y) & ~res.stopped
        correct[f"our PGD-{args.steps}x{args.restarts}"] = ours
        for loss in ("ce", "dlr"):
            atk = torchattacks.APGD(net, norm="Linf", eps=eps, steps=args.steps, n_restarts=1, seed=args.seed,
                                    loss=loss)
            adv = atk(x, y)
            with torch.no_grad():
                correct[f"APGD-{loss.upper()}-{args.steps} (torchattacks)"] = net(adv).argmax(1) == y
        worst = torch.stack([v for k, v in correct.items()]).all(0)
        correct["worst case"] = worst
        rows.append((name, {k: float(v.float().mean()) for k, v in correct.items()}))
    cols = list(rows[0][1])
    print(f"`python benchmarks/apgd_check.py --models {args.models} --data {args.data} --eps {args.eps} "
          f"--samples {args.samples} --steps {args.steps} --restarts {args.restarts} --seed {args.seed}`\n")
    print("| model | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, r in rows:
        print(f"| {name} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
