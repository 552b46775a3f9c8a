"""What a report says about one side, in words: the verdict (did the attack work?) and one summary per
model, built once (:func:`side_summary`) and written out for the page (:func:`side_markdown`) and for
the PNG report (:func:`side_text`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..objectives import OBJECTIVES

# the output that tells whether a family's model changed its mind (None: the zero-shot top-1 class)
FAMILY_OUTPUT = {"clip": None, "captioner": "caption", "vqa": "answer"}


def attack_text(attack: dict[str, Any]) -> str:
    """The attack of a report in a few words: ``PGD linf, eps 4/255, 10 step(s)``, or for an attack without
    an epsilon its threat model: ``TYPOGRAPHIC “dog”, letters 0.2 of the side, white, opacity 1, position auto``."""
    name = attack["name"].upper()
    t = attack.get("threat")
    if t is None:
        return f"{name} {attack['norm']}, eps {attack['eps_k255']:g}/255, {attack['steps']} step(s)"
    if "word" in t:
        word = t["word"] if isinstance(t["word"], str) else ", ".join(t["word"])
        return (f"{name} “{word}”, letters {t['text_size']:g} of the side, {t['colour']}, opacity {t['opacity']:g}, "
                f"{t['font']}, position {t['position']}")
    how = "a given patch" if t.get("patch") == "given" else f"{t['steps']} step(s)" + (", universal" if t.get("universal") else "")
    return f"{name} side {t['patch_side']:g} ({t['patch_side'] ** 2:.1%} of the image), {how}, position {t['position']}"


def side_entries(report: dict[str, Any], side: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """``family -> (model name, entry)`` for the models of one side of a report."""
    return {e["family"]: (name, e) for name, e in report["models"].items() if e["role"] == side}


def side_verdict(report: dict[str, Any], side: str) -> dict[str, Any] | None:
    """Did the attack work on this side? ``{"fooled": bool, "text": "fooled: cat → astronaut"}``, read
    from the attacked model's output: untargeted, fooled when its top-1 class, caption or answer
    changed (for the embedding attack: the side's zero-shot top-1); targeted, when it became the target."""
    entries = {e["family"]: e for e in report["models"].values() if e["role"] == side}
    family = OBJECTIVES.meta(report["attack"]["target"])["inspects"]
    e = entries.get(family)
    if e is None or "adversarial" not in e:
        return None
    out = FAMILY_OUTPUT[family]
    before = e["clean"]["zero_shot"]["labels"][0] if out is None else e["clean"][out]
    after = e["adversarial"]["zero_shot"]["labels"][0] if out is None else e["adversarial"][out]
    wanted = report["attack"].get("target_text")
    fooled = after == wanted if wanted else after != before
    quote = (lambda t: t) if out is None else (lambda t: f"“{t}”")
    if fooled:
        text = f"fooled: {quote(before)} → {quote(after)}"
    else:
        text = f"held: {quote(after)}" + (f" (target “{wanted}” not reached)" if wanted else "")
    source = report.get("perturbation", {}).get("sides", {}).get(side, {}).get("crafted_on", side)
    if source != side:  # a transfer: say where the image came from
        text += " — image crafted on both sides' models" if source == "ensemble" else \
            f" — image crafted on the {source} model"
    return {"fooled": fooled, "text": text, "model": next(n for n, x in report["models"].items() if x is e)}


def imagenet_text(top: list) -> str:
    """A ConSE model's ImageNet classes, ``[[name, p], ...]``, as "name 0.37, name 0.33"."""
    return ", ".join(f"{name} {p:.2f}" for name, p in top)


@dataclass
class ModelSummary:
    """One model's lines, as facts; the renderers below only choose the markup."""

    family: str
    model: str
    attacked: bool
    clean: str                        # zero-shot: the top-1 label; else the caption or the answer
    adversarial: str | None = None
    clean_p: float | None = None      # zero-shot: the top-1 probabilities
    adversarial_p: float | None = None
    question: str | None = None
    confidence_change: float | None = None
    attention_shift: float | None = None
    imagenet: list | None = None      # a ConSE model's ImageNet classes behind its embedding
    imagenet_adversarial: list | None = None
    about: str | None = None          # a clip-family model that is not CLIP says what it is
    knows_only: str | None = None     # a shapes-world text model shown a photo


def side_summary(report: dict[str, Any], side: str) -> list[ModelSummary]:
    out = []
    photo = report.get("image", {}).get("kind") == "photo"
    for fam, (name, e) in side_entries(report, side).items():
        clean, adv = e["clean"], e.get("adversarial")
        s = ModelSummary(fam, name, bool(e.get("attacked")), clean="")
        if fam == "clip":
            s.clean, s.clean_p = clean["zero_shot"]["labels"][0], clean["zero_shot"]["probs"][0]
            if adv:
                s.adversarial, s.adversarial_p = adv["zero_shot"]["labels"][0], adv["zero_shot"]["probs"][0]
                s.confidence_change, s.attention_shift = adv["confidence_change"], adv["attention_shift"]
            s.about = e.get("about")
            s.imagenet = clean.get("imagenet_top3")
            s.imagenet_adversarial = adv.get("imagenet_top3") if adv else None
        else:
            field_name = FAMILY_OUTPUT[fam]
            s.clean, s.question = clean[field_name], clean.get("question")
            s.adversarial = adv[field_name] if adv else None
            if e.get("knows_only") and photo:
                s.knows_only = e["knows_only"]
        out.append(s)
    return out


NO_DEFENDED = ("*No defended model selected.* Defended checkpoints (`<baseline>+<defense>`) appear under "
               "**Models** once `python -m vlm_inspect.train --defense ...` has written them (press ↻ "
               "Refresh); any model can also be compared against the baseline.")


def side_markdown(report: dict[str, Any], side: str) -> str:
    """The page's text for one side."""
    lines = side_summary(report, side)
    if not lines:
        return NO_DEFENDED if side == "defended" else f"*No {side} model selected.*"
    rows = []
    for s in lines:
        mark = " (attacked)" if s.attacked else ""
        if s.family == "clip":
            row = f"**{s.model}**{mark}: top-1 **{s.clean}** ({s.clean_p:.2f})"
            if s.adversarial is not None:
                row += (f" → **{s.adversarial}** ({s.adversarial_p:.2f}); confidence in the clean top-1 "
                        f"{s.confidence_change:+.3f}, attention shift {s.attention_shift:.3f}")
            if s.about:
                row += f"  \n*{s.about}*"
            if s.imagenet is not None:
                row += "  \nImageNet classes behind it: " + imagenet_text(s.imagenet) \
                    + (f" → {imagenet_text(s.imagenet_adversarial)}" if s.imagenet_adversarial else "")
        elif s.family == "captioner":
            row = f"**{s.model}**{mark}: caption “{s.clean}”" + (f" → “{s.adversarial}”" if s.adversarial is not None else "")
        else:
            row = f"**{s.model}**{mark}: “{s.question}” → **{s.clean}**" \
                + (f" → **{s.adversarial}**" if s.adversarial is not None else "")
        if s.knows_only:
            row += (f"  \n*{s.model} knows only {s.knows_only}: on a photo its words mean little. For photos, "
                    "switch **Models → Model suite** to *pretrained* (ViT-GPT2, BLIP).*")
        rows.append(row)
    return "\n\n".join(rows)


def side_text(report: dict[str, Any], side: str) -> str:
    """The PNG report's text for one side: caption, answer and the attention/confidence numbers."""
    lines = []
    for s in side_summary(report, side):
        if s.family == "clip":
            line = f"[{s.model}] top-1: {s.clean} ({s.clean_p:.2f})"
            if s.adversarial is not None:
                line += f" -> {s.adversarial} ({s.adversarial_p:.2f})"
            lines.append(line)
            if s.imagenet is not None:
                lines.append("  ImageNet: " + imagenet_text(s.imagenet)
                             + (f" -> {imagenet_text(s.imagenet_adversarial[:1])}" if s.imagenet_adversarial else ""))
            if s.adversarial is not None:
                lines.append(f"  confidence change {s.confidence_change:+.3f}, attention shift {s.attention_shift:.3f}")
        elif s.family == "captioner":
            lines.append(f"[{s.model}] caption: {s.clean}")
            if s.adversarial is not None:
                lines.append(f"  adversarial: {s.adversarial}")
        else:
            lines.append(f"[{s.model}] Q: {s.question}  A: {s.clean}"
                         + (f" -> {s.adversarial}" if s.adversarial is not None else ""))
    return "\n".join(lines) if lines else "(no model selected)"
