"""Resumable evaluations: each finished (model, data set) of a run is one JSON line beside ``--out``
(``<out>.partial.jsonl``), so that ``--resume`` after a kill computes only what is missing.

An AutoAttack table of six models on eight data sets takes hours on a CPU; without this, a killed run
(a session that ends, a reboot) starts again from nothing. A line is reused only when the run's settings
(attacks and their budgets, samples, batch size, seed, precision, device) and the model's weights digest
are those of the line: a retrained model or another budget is computed again. The line holds the unit's
rows exactly as computed, so a resumed table equals an uninterrupted one. The file is removed once the
table is written.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("vlm_inspect.evaluate")


def journal_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".partial.jsonl")


def entries(text: str) -> Iterator[dict[str, Any]]:
    """The finished units a journal's text holds, whatever their settings (a line a kill cut is skipped)."""
    for line in text.splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:  # the last line of a run killed while writing it
            continue
        if isinstance(e, dict) and isinstance(e.get("rows"), list):
            yield e


class Journal:
    """The finished units of runs with ``settings``; ``write`` is False on the ranks of a ``torchrun``
    other than the first (every rank reads, one writes)."""

    def __init__(self, path: str | Path, settings: dict[str, Any], resume: bool, write: bool = True):
        self.path, self.write = Path(path), write
        self.settings = json.loads(json.dumps(settings))  # as it reads back from the file
        self.done: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        self._cut = False  # the file ends in a line a kill cut short: the next line starts on a line of its own
        found = self._read()
        if found and not resume:
            log.info("%s holds %d finished model x data set unit(s) of a run with these settings; "
                     "add --resume to reuse them", self.path, found)
            self.done = {}
        elif found:
            log.info("resuming: %d model x data set unit(s) done in an earlier run (%s)", found, self.path)

    def _read(self) -> int:
        if not self.path.is_file():
            return 0
        text = self.path.read_text(encoding="utf-8", errors="replace")
        self._cut = bool(text) and not text.endswith("\n")
        for e in entries(text):
            if e.get("settings") == self.settings:
                self.done[(e.get("model"), e.get("data"), e.get("digest"))] = e["rows"]
        return len(self.done)

    def get(self, model: str, data: str, digest: str) -> list[dict[str, Any]] | None:
        """The rows of a unit finished before with the same settings and weights, or None."""
        return self.done.get((model, data, digest))

    def add(self, model: str, data: str, digest: str, rows: list[dict[str, Any]]) -> None:
        self.done[(model, data, digest)] = rows
        if not self.write:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"settings": self.settings, "model": model, "data": data, "digest": digest, "rows": rows})
        with self.path.open("a", encoding="utf-8") as f:  # one line per unit: a kill loses at most the unit it cut
            f.write(("\n" if self._cut else "") + line + "\n")
            f.flush()
        self._cut = False

    def finish(self) -> None:
        """The table is written: the journal has served."""
        if self.write:
            self.path.unlink(missing_ok=True)
