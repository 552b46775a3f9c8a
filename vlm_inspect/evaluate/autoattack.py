"""The AutoAttack ensemble for zero-shot classification — Croce & Hein, "Reliable evaluation of adversarial
robustness with an ensemble of diverse parameter-free attacks", ICML 2020, https://arxiv.org/abs/2003.01690.

Robust accuracy is what survives a sequence of complementary attacks, each run only on the images still
classified correctly, the worst case per sample (an image counts as broken once any attack breaks it):

1. **APGD-CE**: :class:`~vlm_inspect.attacks.APGD` on the zero-shot cross-entropy;
2. **APGD-T**: APGD on the targeted DLR loss, once per target class, the targets being the classes the
   clean image ranks 2nd, 3rd, ... (``targets`` of them, at most the number of classes − 1);
3. **Square**: the gradient-free :class:`~vlm_inspect.attacks.Square` on the logit margin.

Faithful to the reference's ``version="standard"`` for L∞ and L2: 100 APGD iterations, one restart,
9 target classes, 5000 Square queries, the attacks in that order on the still-correct images, and its
checks (see :class:`Flag`): outputs that change between identical passes (randomness), images with a zero
gradient, Square breaking what the gradient attacks missed (masking suspected).

Our choices:

- **FAB-T is left out** (the reference runs it between APGD-T and Square); every table and verdict says so.
  On the reference's own models FAB-T rarely changes the robust accuracy after APGD-T;
  ``docs/ATTACK_STUDIES.md`` measures the gap on ours against the reference with FAB-T in.
- APGD-T runs every (image, target) pair of a batch at once; when one pair breaks its image, the image's
  other pairs stop (the reference tries the targets one after another on the images still standing:
  the same images break, for less waiting on a single image in the app);
- every attack stops an image as soon as the model gets it wrong (early stop), and the labels may be the
  clean predictions (the app: the user's image has no ground truth), as the reference does without ``y``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..attacks import APGD, Square
from ..attacks.base import eps_label
from ..models.base import model_guard
from ..objectives import ZeroShotCE, ZeroShotMargin, ZeroShotTargetedDLR

NAME = "autoattack"
LABELS = {"apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "square": "Square"}
LEFT_OUT = "FAB-T is left out (the reference's standard version runs it after APGD-T)"
Progress = Callable[[str, float], None]  # (attack label, fraction of that attack done)


@dataclass(frozen=True)
class Budget:
    """The ensemble's settings; the defaults are the reference's ``version="standard"``."""

    steps: int = 100        # APGD-CE and APGD-T iterations
    targets: int = 9        # APGD-T target classes
    queries: int = 5000     # Square's queries per image

    def __post_init__(self) -> None:
        for name in ("steps", "targets", "queries"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"the AutoAttack {name} must be a whole number >= 1, got {v!r}")

    def describe(self) -> dict:
        return {"apgd-ce": {"steps": self.steps, "restarts": 1},
                "apgd-t": {"steps": self.steps, "targets": self.targets, "restarts": 1},
                "square": {"queries": self.queries}}


STANDARD = Budget()


@dataclass
class Flag:
    """One of the ensemble's checks that fired: ``code`` (randomness, zero-gradients, masking,
    overstated) and one sentence for the reader."""

    code: str
    text: str


@dataclass
class Stage:
    """One attack of the ensemble: on how many images it ran, how many it broke, the robust accuracy after
    it (over all images) and its time."""

    attack: str
    ran_on: int
    broke: int
    robust: float
    seconds: float


@dataclass
class EnsembleResult:
    clean: torch.Tensor                 # (B,) bool: correct on the clean image
    robust: torch.Tensor                # (B,) bool: correct after every attack
    adv: torch.Tensor                   # (B, 3, H, W) the breaking image, or the clean one
    broken_by: list[str | None]         # per image: the attack that broke it
    broken_at: list[int | None]         # per image: that attack's iteration (APGD) or query (Square)
    stages: list[Stage] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # attacks not run, with the reason
    # what the checks counted: randomness (0/1), images with a zero gradient, images checked for it
    checks: dict[str, int] = field(default_factory=lambda: {"randomness": 0, "zero_gradients": 0, "checked": 0})

    @property
    def flags(self) -> list[Flag]:
        square = sum(s.broke for s in self.stages if s.attack == "Square")
        return flags_of(self.checks, square)

    @property
    def clean_accuracy(self) -> float:
        return float(self.clean.float().mean())

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust.float().mean())


def check_eps(eps: float, norm: str) -> float:
    eps = float(eps)
    if not eps >= 0 or eps == float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if norm == "linf" and eps > 1:
        raise ValueError(f"an L-inf eps of {eps:g} is more than the whole pixel range [0, 1]; write it as k/255")
    return eps


def autoattack(model, pixels: torch.Tensor, labels: torch.Tensor | Sequence[int] | None, class_texts: Sequence[str],
               eps: float, norm: str = "linf", budget: Budget = STANDARD, seed: int = 0, batch_size: int = 100,
               text_features: torch.Tensor | None = None, progress: Progress | None = None) -> EnsembleResult:
    """Run the ensemble on ``pixels`` (B, 3, H, W) in [0, 1] of a CLIP ``model`` over ``class_texts``.

    ``labels=None`` attacks the clean predictions (a user's image). Raises ValueError, in one sentence,
    for a model that is not zero-shot, an eps outside the pixel range and a budget below 1."""
    if getattr(model, "family", None) != "clip":
        raise ValueError(f"autoattack is the zero-shot classification ensemble; {getattr(model, 'name', model)!r} "
                         f"is a {getattr(model, 'family', '?')} model - attack captions and answers with "
                         "--attack apgd --restarts N, which keeps the worst metric per sample")
    if norm not in ("linf", "l2"):
        raise ValueError(f"autoattack runs in linf or l2, got {norm!r}")
    eps = check_eps(eps, norm)
    if not isinstance(budget, Budget):
        raise ValueError(f"budget must be a Budget, got {budget!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = model.device
    x_all = pixels.detach().to(dev)
    n = x_all.shape[0]
    texts = list(class_texts)
    with torch.no_grad():
        text = text_features if text_features is not None else model.encode_text(texts)

    def logits(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.logits(model.encode_image(x), text).float()

    chunks = [slice(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]
    with model_guard(model):
        clean_logits = torch.cat([logits(x_all[c]) for c in chunks])
    y = clean_logits.argmax(1) if labels is None else torch.as_tensor(labels, dtype=torch.long).reshape(-1).to(dev)
    if y.shape[0] != n:
        raise ValueError(f"got {y.shape[0]} labels for {n} images")
    clean = clean_logits.argmax(1) == y
    robust = clean.clone()
    adv = x_all.clone()
    broken_by: list[str | None] = [None] * n
    broken_at: list[int | None] = [None] * n
    result = EnsembleResult(clean=clean.cpu(), robust=robust, adv=adv, broken_by=broken_by, broken_at=broken_at,
                            skipped=[LEFT_OUT])
    result.checks = _checks(model, x_all[chunks[0]] if n else x_all, y[chunks[0]] if n else y, texts, text, logits)

    def record(name: str, idx: torch.Tensor, res_adv: torch.Tensor, at: torch.Tensor | None) -> int:
        """The images of ``idx`` the model now gets wrong on ``res_adv`` leave the robust set."""
        with model_guard(model):
            wrong = logits(res_adv).argmax(1) != y[idx]
        hit = idx[wrong]
        robust[hit] = False
        adv[hit] = res_adv[wrong]
        for j, i in zip(wrong.nonzero().flatten().tolist(), hit.tolist()):
            broken_by[i] = LABELS[name]
            broken_at[i] = None if at is None or int(at[j]) < 0 else int(at[j])
        return int(wrong.sum())

    def run_stage(name: str, attack_batch: Callable[[torch.Tensor, Callable[[float], None]], int]) -> None:
        start, alive = time.perf_counter(), robust.nonzero().flatten()
        broke = 0
        for k in range(0, len(alive) if eps > 0 else 0, batch_size):  # at eps 0 no image can change
            idx = alive[k:k + batch_size]
            base, share = k / max(len(alive), 1), len(idx) / max(len(alive), 1)
            tick = (lambda f, base=base, share=share: progress(LABELS[name], base + share * f)) if progress else (lambda f: None)
            broke += attack_batch(idx, tick)
        if progress:
            progress(LABELS[name], 1.0)
        result.stages.append(Stage(LABELS[name], ran_on=len(alive), broke=broke,
                                   robust=float(robust.float().mean()) if n else 0.0,
                                   seconds=round(time.perf_counter() - start, 3)))

    gen = lambda: torch.Generator(device=dev).manual_seed(seed)  # noqa: E731 - one seeded stream per attack

    # 1. APGD on the cross-entropy
    g_ce = gen()

    def apgd_ce(idx, tick):
        atk = APGD(eps, steps=budget.steps, norm=norm)
        obj = ZeroShotCE(model, texts, y[idx], text_features=text)
        res = atk(x_all[idx], obj, generator=g_ce, early_stop=True, callback=lambda s, t, _l: tick(s / t))
        return record("apgd-ce", idx, res.adv, res.stopped_at)

    run_stage("apgd-ce", apgd_ce)

    # 2. APGD on the targeted DLR, towards each of the top classes
    classes = len(texts)
    n_targets = min(budget.targets, classes - 1)
    if classes < 4:
        result.skipped.append(f"APGD-T needs at least 4 classes for its targeted DLR loss, got {classes}")
    else:
        if n_targets < budget.targets:
            result.skipped.append(f"APGD-T used {n_targets} target classes, not {budget.targets}: "
                                  f"there are {classes} classes")
        g_t = gen()

        def apgd_t(idx, tick):
            ranked = clean_logits[idx].argsort(1, descending=True)
            # (image, target) pairs: image j towards its 2nd, 3rd, ... ranked class
            owner_t = torch.arange(len(idx), device=dev).repeat_interleave(n_targets)
            tgt = ranked[:, 1:n_targets + 1].reshape(-1).tolist()
            broke, per, total = 0, batch_size, len(tgt)
            for p0 in range(0, total, per):
                sl = slice(p0, p0 + per)
                o = owner_t[sl]
                done = ~robust[idx]  # images broken already (by an earlier chunk) skip their pairs
                keep = ~done[o]
                if not bool(keep.any()):
                    continue
                o = o[keep]
                t = torch.tensor(tgt[sl], device=dev)[keep]
                inner = ZeroShotTargetedDLR(model, texts, y[idx][o], t, text_features=text)
                sib = _Siblings(inner, o, torch.zeros(len(idx), dtype=torch.bool, device=dev))
                res = APGD(eps, steps=budget.steps, norm=norm)(
                    x_all[idx][o], sib, generator=g_t, early_stop=True,
                    callback=lambda s, tt, _l: tick(min(1.0, (p0 + s / tt * per) / total)))
                hit = sib.truly
                # one pair per broken image: the first that broke it
                first = {}
                for p in hit.nonzero().flatten().tolist():
                    first.setdefault(int(o[p]), p)
                if first:
                    sel = torch.tensor(list(first.values()), device=dev)
                    img = idx[torch.tensor(list(first.keys()), device=dev)]
                    at = res.stopped_at[sel] if res.stopped_at is not None else None
                    broke += record("apgd-t", img, res.adv[sel], at)
            return broke

        run_stage("apgd-t", apgd_t)

    # 3. Square: no gradients, the masking check
    g_sq = gen()

    def square(idx, tick):
        obj = ZeroShotMargin(model, texts, y[idx], text_features=text)
        res = Square(eps, steps=budget.queries, norm=norm)(x_all[idx], obj, generator=g_sq, early_stop=True,
                                                           callback=lambda s, t, _l: tick(s / max(t, 1)))
        return record("square", idx, res.adv, res.stopped_at)

    run_stage("square", square)
    result.robust = robust.cpu()
    result.adv = adv.detach()
    return result


class _Siblings:
    """The targeted DLR over (image, target) pairs, where one pair breaking its image stops the image's
    other pairs too: ``fooled()`` says "stop" for every pair of a broken image, ``truly`` keeps which
    pairs really fooled the model."""

    def __init__(self, inner: ZeroShotTargetedDLR, owner: torch.Tensor, done: torch.Tensor,
                 pair: torch.Tensor | None = None, truly: torch.Tensor | None = None):
        self.inner, self.model, self.owner, self.done = inner, inner.model, owner, done
        self.pair = torch.arange(len(owner), device=owner.device) if pair is None else pair
        self.truly = torch.zeros(len(owner), dtype=torch.bool, device=owner.device) if truly is None else truly
        self.name = inner.name

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        loss = self.inner(pixels)
        wrong = self.inner.fooled().to(self.owner.device)
        self.truly[self.pair[wrong]] = True
        self.done[self.owner[wrong]] = True
        self._stop = wrong | self.done[self.owner]
        return loss

    def fooled(self) -> torch.Tensor:
        return self._stop

    def subset(self, index: torch.Tensor) -> "_Siblings":
        index = index.to(self.owner.device)
        return _Siblings(self.inner.subset(index), self.owner[index], self.done, self.pair[index], self.truly)


def _checks(model, x, y, texts, text, logits) -> dict[str, int]:
    """The reference's checks on the first batch: randomness (two identical passes differ) and zero gradients."""
    out = {"randomness": 0, "zero_gradients": 0, "checked": len(x)}
    if not len(x):
        return out
    with model_guard(model):
        a, b = logits(x), logits(x)
        unit = lambda v: v / (v.norm(dim=1, keepdim=True) + 1e-10)  # noqa: E731
        out["randomness"] = int((unit(a) - unit(b)).norm(dim=1).max() > 1e-4 or bool((a.argmax(1) != b.argmax(1)).any()))
        xs = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = ZeroShotCE(model, texts, y, text_features=text)(xs).sum()
            (grad,) = torch.autograd.grad(loss, xs)
    out["zero_gradients"] = int((grad.flatten(1).abs().sum(1) == 0).sum())
    return out


def flags_of(checks: dict[str, int], square_broke: int) -> list[Flag]:
    """The flags the checks' counts raise, each in one sentence."""
    flags = []
    if checks.get("randomness"):
        flags.append(Flag("randomness", "the model's outputs change between two identical passes: a randomised "
                                        "defense needs an attack that averages over its randomness (EOT); "
                                        "these numbers may overstate robustness"))
    if checks.get("zero_gradients"):
        flags.append(Flag("zero-gradients", f"{checks['zero_gradients']} of {checks['checked']} image(s) have a zero "
                                            "gradient at the clean point: gradient attacks cannot move them, so "
                                            "their robustness may be masked"))
    if square_broke > 0:
        flags.append(Flag("masking", f"Square, which uses no gradients, broke {square_broke} image(s) that "
                                     "APGD-CE and APGD-T missed: the gradients may be masked, so the "
                                     "robust accuracy of gradient attacks alone would overstate "
                                     "robustness; try more Square queries or an adaptive attack"))
    return flags


def tally(res: EnsembleResult) -> dict:
    """What one run counted, as plain data (to gather from other processes and :func:`merge_tallies`)."""
    return {"n": len(res.clean), "clean": int(res.clean.sum()), "checks": dict(res.checks),
            "stages": [{"attack": s.attack, "ran_on": s.ran_on, "broke": s.broke, "seconds": s.seconds}
                       for s in res.stages], "skipped": list(res.skipped)}


def merge_tallies(tallies: list[dict], n: int) -> dict:
    """Runs on disjoint batches of one data set as one: ``{stages, skipped, flags}`` over all ``n`` images,
    each stage's ``robust`` the accuracy after it over all of them."""
    clean = sum(t["clean"] for t in tallies)
    checks = {k: sum(t["checks"].get(k, 0) for t in tallies) for k in ("randomness", "zero_gradients", "checked")}
    stages: dict[str, dict] = {}
    for t in tallies:
        for s in t["stages"]:
            m = stages.setdefault(s["attack"], {"attack": s["attack"], "ran_on": 0, "broke": 0, "seconds": 0.0})
            m["ran_on"] += s["ran_on"]
            m["broke"] += s["broke"]
            m["seconds"] = round(m["seconds"] + s["seconds"], 3)
    standing = clean
    for m in stages.values():
        standing -= m["broke"]
        m["robust"] = standing / n if n else 0.0
    square = stages.get("Square", {}).get("broke", 0)
    return {"stages": list(stages.values()), "skipped": list(dict.fromkeys(x for t in tallies for x in t["skipped"])),
            "flags": [vars(f) for f in flags_of(checks, square)], "clean_accuracy": clean / n if n else 0.0}


def tally_text(merged: dict) -> str:
    """The per-attack lines of :func:`merge_tallies`'s result, as the reference prints them."""
    lines = [f"  clean accuracy {merged['clean_accuracy']:.2%}"]
    for s in merged["stages"]:
        lines.append(f"  robust accuracy after {s['attack']}: {s['robust']:.2%} "
                     f"(broke {s['broke']} of {s['ran_on']}, {s['seconds']:.1f} s)")
    lines += [f"  note: {x}" for x in merged["skipped"]] + [f"  flag ({f['code']}): {f['text']}" for f in merged["flags"]]
    return "\n".join(lines)


def overstated(attack_label: str, attack_robust: float, ensemble_robust: float, n: int) -> Flag | None:
    """The "PGD overstates" flag: the user's attack left more images standing than the ensemble."""
    if attack_robust - ensemble_robust <= 0:
        return None
    gap = attack_robust - ensemble_robust
    return Flag("overstated", f"{attack_label} overstates robustness: it left {attack_robust:.1%} standing, "
                              f"AutoAttack {ensemble_robust:.1%} ({gap * 100:.1f} points, "
                              f"{round(gap * n)} of {n} images)")


def summary(res: EnsembleResult, eps: float, norm: str) -> str:
    """The per-attack table of one run as the reference prints it, one line per attack."""
    return f"AutoAttack ({norm}, eps {eps_label(eps)}):\n" + tally_text(merge_tallies([tally(res)], len(res.clean)))
