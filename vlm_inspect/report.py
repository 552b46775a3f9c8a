"""The inspection panel as one PNG (matplotlib) and the report as JSON: what the app exports and what
``python -m vlm_inspect.inspect`` writes."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoints import atomic_write_json
from .service import SIDES, Inspection, attack_text, side_entries, side_text


def render_png(inspection: Inspection, path: str | Path) -> Path:
    """Draw the panel a person sees in the app and save it as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep, imgs = inspection.report, inspection.images
    fig, axes = plt.subplots(3, 5, figsize=(17, 10.5), gridspec_kw={"height_ratios": [1, 1, 1]})
    blank = np.full((8, 8, 3), 240, dtype=np.uint8)

    def show(ax, key: str, title: str) -> None:
        ax.imshow(imgs.get(key, blank))
        ax.set_title(title if key in imgs else f"{title}\n(not computed)", fontsize=9)
        ax.axis("off")

    per = rep["perturbation"]["sides"]
    show(axes[0, 0], "clean", "clean (model input)")
    for j, side in enumerate(SIDES):
        size = per.get(side)
        norms = f"Linf {size['linf'] * 255:.1f}/255, L2 {size['l2']:.3f}" if size else ""
        show(axes[0, 1 + 2 * j], f"adversarial/{side}", f"adversarial, {side}")
        show(axes[0, 2 + 2 * j], f"perturbation/{side}", f"perturbation ({side}, amplified)\n{norms}")
    for i, side in enumerate(SIDES, start=1):
        entries = side_entries(rep, side)
        clip = entries.get("clip")
        show(axes[i, 0], f"heatmap/{side}/clean", f"{side}: {rep['heatmap']} (clean)")
        shift = clip[1].get("adversarial", {}).get("attention_shift") if clip else None
        show(axes[i, 1], f"heatmap/{side}/adversarial",
             f"{side}: {rep['heatmap']} (adversarial)" + (f"\nshift {shift:.3f}" if shift is not None else ""))
        for k, which in enumerate(("clean", "adversarial")):
            ax = axes[i, 2 + k]
            zs = clip[1].get(which, {}).get("zero_shot") if clip else None
            if zs:
                y = np.arange(len(zs["labels"]))[::-1]
                ax.barh(y, zs["probs"], color="#4c72b0" if which == "clean" else "#dd8452")
                ax.set_yticks(y, [textwrap.shorten(x, 22) for x in zs["labels"]], fontsize=8)
                ax.set_xlim(0, 1)
                ax.set_title(f"{clip[0]} top-{len(zs['labels'])} ({which})", fontsize=9)
            else:
                ax.axis("off")
        ax = axes[i, 4]
        ax.axis("off")
        ax.text(0, 1, "\n".join(textwrap.fill(line, 38, subsequent_indent="  ")
                                for line in side_text(rep, side).splitlines()),
                va="top", ha="left", fontsize=7.5, family="monospace", transform=ax.transAxes)
    a = rep["attack"]
    target = f", target {a['target_text']!r}" if a["targeted"] else " (untargeted)"
    fig.suptitle(f"vlm_inspect {rep['version']}: {attack_text(a)} on the {a['target']} task{target}", fontsize=12)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_json(inspection: Inspection, path: str | Path) -> Path:
    atomic_write_json(Path(path), inspection.report)
    return Path(path)


def curve_figure(curve: dict[str, Any]):
    """Matplotlib figure of a :meth:`InspectService.curve` result: metric against eps, one line per side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for side, s in curve["series"].items():
        ax.plot(curve["eps_k255"], s["values"], marker="o", label=f"{side}: {s['model']}")
    ax.set_xlabel("epsilon (k/255)")
    ax.set_ylabel(curve["metric"])
    ax.set_ylim(-0.02, 1.02)
    a = curve["attack"]
    ax.set_title(f"{a['name'].upper()} {a['norm']}, {a['steps']} steps, {curve['target']} task", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
