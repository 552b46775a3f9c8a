"""The transfer matrix of one inspection: every crafted adversarial image shown to every side's model of
the attacked family (rows: crafted on; columns: shown to).

Crafted on each side's own model, the diagonal is the white-box result each side shows and the
off-diagonal cells answer the question a deployed model's owner asks: does an image made against the
public original still fool the defended model whose weights stay private? Crafted on the other side's
model, the sides show the off-diagonal cells; crafted on both at once (an ensemble), there is one row.

A cell holds what the model of the column says about the row's image (the top-1 class and its
probability, the caption or the answer), whether that counts as fooled (untargeted: it changed from
the clean image's; targeted: it is the target, as the side verdicts count it), and the attention
shift of the column side's CLIP model on that image (the L2 distance of its text-guided maps, clean
against adversarial), where that side has a CLIP model.
"""
from __future__ import annotations

from typing import Any

from .outputs import ClipOutputs, Outputs
from .request import InspectRequest
from .summary import FAMILY_OUTPUT

ROW_TITLES = {"baseline": "crafted on baseline", "defended": "crafted on defended", "ensemble": "crafted on both"}


def cell(source: str, shown_to: str, model_name: str, crafted_on: str, family: str, clean: Outputs,
         adv: Outputs, shift: ClipOutputs | None, req: InspectRequest) -> dict[str, Any]:
    """One cell of the matrix, once its captions and answers are generated."""
    threat = "white-box" if source == shown_to else "ensemble" if source == "ensemble" else "transfer"
    out: dict[str, Any] = {"crafted_on": source, "crafted_on_models": crafted_on, "shown_to": shown_to,
                           "model": model_name, "threat": threat}
    name = FAMILY_OUTPUT[family]
    if name is None:
        label, p = adv.zero_shot["labels"][0], adv.zero_shot["probs"][0]
        before = clean.zero_shot["labels"][0]
        out.update(output=label, p=p)
    else:
        label, before = getattr(adv, name), getattr(clean, name)
        out.update(output=label)
    out["fooled"] = label == req.target_text if req.target_text else label != before
    out["attention_shift"] = shift.attention_shift if shift is not None else None
    return out


def matrix_markdown(report: dict[str, Any]) -> str:
    """The page's table: rows crafted on, columns shown to."""
    t = report.get("transfer")
    if not t or len(t["cells"]) < 2:  # one cell is the panel itself
        return ""
    cols = t["columns"]
    by = {(c["crafted_on"], c["shown_to"]): c for c in t["cells"]}
    model_of = {c["shown_to"]: c["model"] for c in t["cells"]}
    head = "| | " + " | ".join(f"shown to {c} ({model_of[c]})" for c in cols) + " |"
    lines = [f"**Transfer matrix** ({t['task']}; {'targeted' if report['attack'].get('targeted') else 'untargeted'}):",
             "", head, "|---|" + "---|" * len(cols)]
    for r in t["rows"]:
        models = next((c["crafted_on_models"] for c in t["cells"] if c["crafted_on"] == r), "")
        cells = []
        for col in cols:
            c = by.get((r, col))
            if c is None:
                cells.append("–")
                continue
            text = f"**{c['output']}** ({c['p']:.2f})" if "p" in c else f"“{c['output']}”"
            mark = "fooled" if c["fooled"] else "held"
            shift = f", shift {c['attention_shift']:.3f}" if c["attention_shift"] is not None else ""
            cells.append(f"{text}: {mark} ({c['threat']}{shift})")
        lines.append(f"| {ROW_TITLES[r]} ({models}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)
