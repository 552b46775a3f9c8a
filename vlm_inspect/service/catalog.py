"""Which models and label sets the service offers, and the defaults of each suite.

A :class:`ModelCatalog` lists, per family and suite, the presets, the checkpoints in ``checkpoints/``
and the training outputs under its ``model_dirs``; it picks each suite's default baseline and
defended model and fills a request's unset fields. Re-read from disk on every call, so a model that
training has just written appears without a restart.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..checkpoints import is_vlm_checkpoint, read_config
from ..data.shapes import zero_shot_labels
from ..models import FAMILIES, PRESETS, SUITES, list_presets
from ..models.presets import checkpoint_suite
from ..runtime import checkpoints_dir, weights_dir
from .request import SIDES, InputError

# the shapes-world label sets the page offers: each zero-shot data set's classes and prompt template
_SHAPES_LABEL_SETS = (("shapes-combo", "colour + shape"), ("shapes-shape", "shape"), ("shapes-color", "colour"),
                      ("shapes-size", "size"), ("shapes-count", "count"))
EVERYDAY = (["person", "astronaut", "cat", "dog", "cup of coffee", "motorcycle", "car", "bird", "flower", "building",
             "rocket", "tree"], "a photo of a {}")


def label_sets() -> dict[str, tuple[list[str], str]]:
    """Named class lists with their prompt template (``{}`` is the label): the shapes data sets' label
    sets (docs/SHAPES_WORLD.md) and a few everyday objects for real photos."""
    out = {}
    for dataset, title in _SHAPES_LABEL_SETS:
        classes, template = zero_shot_labels(dataset)
        out[f"shapes: {title} ({len(classes)})"] = (classes, template)
    out[f"everyday objects ({len(EVERYDAY[0])})"] = (list(EVERYDAY[0]), EVERYDAY[1])
    return out


DEFAULT_LABEL_SET = {"embedded": "shapes: colour + shape (48)", "pretrained": "everyday objects (12)"}
DEFAULT_QUESTION = {"embedded": "how many shapes are there?", "pretrained": "what is in the picture?"}


class ModelCatalog:
    """The models one service offers. ``model_dirs``: extra folders whose sub-folders holding a
    vlm_inspect checkpoint are offered as models (e.g. ``runs/`` where training writes)."""

    def __init__(self, suite: str = "embedded", model_dirs: Sequence[str | Path] = ("runs",)) -> None:
        if suite not in SUITES:
            raise ValueError(f"unknown suite {suite!r}; valid: {', '.join(SUITES)}")
        self.suite = suite
        self.model_dirs = [Path(d) for d in model_dirs]

    def run_folders(self, family: str | None = None, suite: str | None = None) -> list[str]:
        """Checkpoint folders under ``model_dirs`` (training outputs), as paths; with ``suite``, only
        those whose model (or base model) belongs to that suite."""
        found = []
        for root in self.model_dirs:
            if not root.is_dir():
                continue
            for d in sorted(root.iterdir()):
                if d.is_dir() and is_vlm_checkpoint(d):
                    config = read_config(d)
                    if (family is None or config.get("family") == family) and \
                            (suite is None or checkpoint_suite(config) == suite):
                        found.append(str(d))
        return found

    def models(self, family: str, suite: str | None = None) -> list[str]:
        """Model names offered for ``family`` in ``suite``: presets, checkpoints in ``checkpoints/``,
        and training outputs under ``model_dirs`` on models of that suite. Re-read on every call."""
        suite = suite or self.suite
        names = list_presets(suite=suite, family=family)
        return names + [d for d in self.run_folders(family, suite) if d not in names]

    def defaults(self, suite: str | None = None) -> dict[str, dict[str, str | None]]:
        """``{"baseline": {family: name}, "defended": {family: name or None}}``: the suite's preset
        baselines, and for each a defended checkpoint of it (``<baseline>+<defense>``), preferring a
        paper's defense over the TeCoA reference baseline."""
        suite = suite or self.suite
        out: dict[str, dict[str, str | None]] = {"baseline": {}, "defended": {}}
        for fam in FAMILIES:
            names = self.models(fam, suite)
            base = next((n for n in names if n in PRESETS and "+" not in n), names[0] if names else None)
            out["baseline"][fam] = base
            # a paper's defense first (TGA-ZSR, verified from its authors' code and the most robust of them
            # on the shapes world, docs/REPRODUCTION.md); TeCoA, the reference baseline, last
            defended = sorted((n for n in names if base and n.startswith(base + "+")),
                              key=lambda n: (n.endswith("+tecoa"), not n.endswith("+tga-zsr"), n))
            out["defended"][fam] = defended[0] if defended else None
        return out

    def suite_fields(self, suite: str | None = None, models: dict[str, dict[str, str | None]] | None = None,
                     classes: str | Sequence[str] = "", template: str = "", question: str | None = None,
                     label_set: str | None = None) -> dict[str, Any]:
        """Request fields for ``suite`` where unset ones take the suite's defaults: models not named in
        ``models`` (``{side: {family: name or None}}``), the class list and template of ``label_set``
        (default: the suite's) when ``classes`` / ``template`` are empty, and the suite's question when
        ``question`` is None and a VQA model is selected."""
        suite = suite or self.suite
        if suite not in SUITES:
            raise InputError(f"unknown suite {suite!r}; valid: {', '.join(SUITES)}")
        chosen = self.defaults(suite)
        for side, names in (models or {}).items():
            chosen[side].update(names)
        labels, default_template = label_sets()[label_set or DEFAULT_LABEL_SET[suite]]
        if question is None:
            question = DEFAULT_QUESTION[suite] if any(chosen[s]["vqa"] for s in SIDES) else ""
        return {"baseline": chosen["baseline"], "defended": chosen["defended"], "classes": classes or labels,
                "template": template or default_template, "question": question}

    def catalog(self) -> set[str]:
        """Every name this service offers (any suite, any family): what a request may always name."""
        names = set(list_presets()) | set(self.run_folders())
        root = weights_dir()
        if root is not None and root.is_dir():  # local copies of hub models: <dir>/<org>/<repo>
            for org in root.iterdir():
                if org.is_dir():
                    names |= {f"hf-hub:{org.name}/{d.name}" for d in org.iterdir()
                              if d.is_dir() and ((d / "open_clip_config.json").is_file() or (d / "config.json").is_file())}
        return names

    def catalog_roots(self) -> list[Path]:
        """The folders the catalog's models are read from (a served app reads no others)."""
        return [checkpoints_dir(), *self.model_dirs] + ([weights_dir()] if weights_dir() else [])
