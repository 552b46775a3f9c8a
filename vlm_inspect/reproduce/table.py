"""One table from a manifest's finished evaluations: every figure as mean ± sd over the training seeds
with the span of the seeds' binomial 95 % intervals, the average over data sets, and the claims."""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from .manifest import Manifest
from .plan import DONE, Job
from .stats import Figure, figure, verdict


def column(row: dict[str, Any]) -> str:
    return "clean" if row["attack"] == "none" else f"{row['attack']} {row['eps']}"


def collect(jobs: list[Job]) -> list[dict[str, Any]]:
    """The rows of every evaluation, each tagged with the manifest's model entry and the training seed."""
    rows, seen = [], set()
    for job in jobs:
        if job.kind != "evaluate":
            continue
        doc = json.loads(job.out.with_suffix(".json").read_text())
        if doc.get("command") != job.command:  # never another protocol's rows under this one's name
            raise ValueError(f"{job.out.with_suffix('.json')} was written by another command; run the manifest again")
        for r in doc["rows"]:
            key = (job.model, job.seed, r["data"], r["metric"], column(r))
            if "source" in r or r.get("region") or key in seen:  # split_eps: each budget's job has the clean row
                continue
            seen.add(key)
            rows.append({**r, "entry": job.model, "training_seed": job.seed, "protocol": job.protocol})
    return rows


def figures(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], Figure]:
    """``(metric, model entry, data, column) -> Figure`` over the seeds, plus ``data = "average"``: per
    seed, the samples of the data sets pooled (the mean over data sets when each has as many), over the data
    sets that every model and seed of that column has, so that the averages of two rows compare."""
    cells: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["metric"], r["entry"], r["data"], column(r)), []).append(r)
    out = {}
    for key, rs in cells.items():
        rs = sorted(rs, key=lambda r: -1 if r["training_seed"] is None else r["training_seed"])
        if len({r["n"] for r in rs}) > 1:
            raise ValueError(f"{key[1]} on {key[2]}, {key[3]}: the seeds were evaluated on different numbers of "
                             f"test images ({sorted({r['n'] for r in rs})}); one cell needs one test set")
        out[key] = figure([r["value"] for r in rs], rs[0]["n"], key[0], [r.get("per_sample") for r in rs])
    by_column: dict[tuple[str, str], dict[tuple[str, Any], dict[str, dict[str, Any]]]] = {}
    for r in rows:
        by_column.setdefault((r["metric"], column(r)), {}).setdefault(
            (r["entry"], r["training_seed"]), {})[r["data"]] = r
    for (metric, col), runs in by_column.items():
        common = set.intersection(*(set(d) for d in runs.values()))
        if len(common) < 2:
            continue
        for entry in dict.fromkeys(e for e, _ in runs):
            values, n, samples = [], 0, []
            for (_, seed), by_data in sorted(((k, v) for k, v in runs.items() if k[0] == entry),
                                             key=lambda kv: -1 if kv[0][1] is None else kv[0][1]):
                rs = [by_data[d] for d in sorted(common)]
                n = sum(r["n"] for r in rs)
                values.append(sum(r["value"] * r["n"] for r in rs) / n)
                samples.append([x for r in rs for x in r.get("per_sample") or []])
            out[(metric, entry, "average", col)] = figure(values, n, metric, samples)
    return out


def _short(data: str) -> str:
    return data.removeprefix("shapes:")


def markdown(m: Manifest, jobs: list[Job], command: str, partial: bool = False) -> tuple[str, dict[str, Any]]:
    """The table of ``jobs``' evaluations; ``partial`` (``--partial``): of the finished ones only, and the
    table says which are missing."""
    missing = [j.label for j in jobs if partial and j.kind == "evaluate" and j.state != DONE]
    if missing:
        n_eval = sum(j.kind == "evaluate" for j in jobs)
        jobs = [j for j in jobs if j.kind == "train" or j.state == DONE]
    rows = collect(jobs)
    figs = figures(rows)
    lines = [f"## {m.title}", ""]
    if missing:
        lines += [f"**Partial: {n_eval - len(missing)} of {n_eval} evaluations are done** (not yet: "
                  f"{', '.join(missing)}). A cell over seeds holds the seeds done so far; a figure or a claim "
                  "here may still change.", ""]
    if m.note:
        lines += [m.note.strip(), ""]
    lines += ["Produced by (re-runs only what is missing; `--plan` shows what that is and how long it takes):", "",
              "```", command, "```", ""]
    train_jobs = [j for j in jobs if j.kind == "train"]
    if m.runs:
        seeds = ("seeds " if len(m.seeds) > 1 else "seed ") + ", ".join(map(str, m.seeds))
        shared = " ".join(shlex.quote(a) for a in m.train_args)
        lines += [f"Training runs, each at {seeds}: `python -m vlm_inspect.train {shared}`, then the run's own "
                  f"arguments (an argument given twice: the run's counts) and `--seed k --out "
                  f"{m.runs_dir}/<run>/seed-k`:", "", "| run | the run's own arguments | train time per seed (loop) |",
                  "|---|---|---|"]
        for name, run in m.runs.items():
            secs = []
            for j in train_jobs:
                if j.model == name:
                    try:
                        secs.append(json.loads((j.folder / "config.json").read_text()).get("train_seconds"))
                    except (OSError, json.JSONDecodeError):
                        pass
            secs = [s for s in secs if s]
            t = "–" if not secs else f"{secs[0]:.0f} s" if len(secs) == 1 else f"{min(secs):.0f}–{max(secs):.0f} s"
            own = " ".join(shlex.quote(a) for a in run.args)
            lines.append(f"| {name} | {f'`{own}`' if own else '(none)'} | {t} |")
        lines.append("")
    for p in m.protocols:
        ev = " ".join(shlex.quote(a) for a in p.args)
        who = "every model" if p.models == m.models else ", ".join(p.models)
        samples = sorted({r["n"] for r in rows if r["protocol"] == p.name})
        lines += [f"Evaluation of {who} (and every seed of a run): `python -m vlm_inspect.evaluate {ev} "
                  f"--models <model>`; {', '.join(map(str, samples)) or '–'} test images per data set, the same "
                  "for every model and seed.", ""]
    lines += ["A cell is the mean ± standard deviation over the training seeds, then "
              "[the lowest, the highest] bound of the seeds' 95 % intervals (binomial, Wilson's, for accuracies; "
              "the normal interval of the mean over images for CIDEr; none for BLEU-4 and ROUGE-L); a model "
              "that is not trained here has one evaluation. **average**: the images of the data sets that every "
              "model and seed has in that column, pooled.", ""]
    for metric in dict.fromkeys(r["metric"] for r in rows):
        cols = list(dict.fromkeys(column(r) for r in rows if r["metric"] == metric))
        datas = list(dict.fromkeys(r["data"] for r in rows if r["metric"] == metric))
        if len(datas) > 1:
            datas.append("average")
        lines += [f"**{metric}**", "", "| model | seeds | data | " + " | ".join(cols) + " |",
                  "|---|---|---|" + "---|" * len(cols)]
        for entry in m.models:
            for data in datas:
                cells = [figs.get((metric, entry, data, c)) for c in cols]
                if not any(cells):
                    continue
                k = max(len(f.values) for f in cells if f)
                name = f"**{_short(data)}**" if data == "average" else _short(data)
                lines.append(f"| {entry} | {k} | {name} | " + " | ".join(f.text() if f else "–" for f in cells) + " |")
        lines.append("")
    verdicts = []
    if m.claims:
        lines += ["**Claims** (a claim is settled only when the spans of the seeds' intervals say so; "
                  "the difference's interval runs from the lowest bound of one to the highest of the other):", "",
                  "| paper | claim | figure | ours | difference | verdict |", "|---|---|---|---|---|---|"]
        for c in m.claims:
            metric = c.metric
            a, b = figs.get((metric, c.a, _full(c.data, rows), c.column)), figs.get((metric, c.b, _full(c.data, rows), c.column))
            if a is None or b is None:
                lines.append(f"| {c.paper} | {c.claim} | {c.column}, {c.data} | not in the table | – | – |")
                continue
            v, (lo, hi) = verdict(c.relation, a, b, c.margin)
            rel = ">" if c.relation == ">" else f"≈ (within {c.margin:g})"
            shown = f"{v} (provisional: the table is partial)" if missing else v
            lines.append(f"| {c.paper} | {c.claim} | {c.column}, {_short(c.data)} | {c.a} {a.mean:.3f} {rel} "
                         f"{c.b} {b.mean:.3f} | [{lo:+.3f}, {hi:+.3f}] | {shown} |")
            verdicts.append({"paper": c.paper, "claim": c.claim, "a": c.a, "b": c.b, "relation": c.relation,
                             "margin": c.margin, "metric": c.metric, "column": c.column, "data": c.data,
                             "a_mean": a.mean, "b_mean": b.mean, "a_text": a.text(), "b_text": b.text(),
                             "a_seeds": len(a.values), "b_seeds": len(b.values),
                             "difference_interval": [lo, hi], "verdict": v, "provisional": bool(missing)})
        lines.append("")
    record = {"command": command, "manifest": _relative(m.path, m.root), "seeds": m.seeds, "partial": missing,
              "figures": [{"metric": k[0], "model": k[1], "data": k[2], "column": k[3], "values": list(f.values),
                           "n": f.n, "mean": f.mean, "sd": f.sd, "intervals": f.intervals(), "span": f.span}
                          for k, f in figs.items()],
              "claims": verdicts, "evaluations": [j.command for j in jobs if j.kind == "evaluate"]}
    return "\n".join(lines), record


def _full(data: str, rows: list[dict[str, Any]]) -> str:
    """A claim's data set as the rows name it (``shapes-combo`` is ``shapes:shapes-combo``)."""
    if data == "average":
        return data
    names = {r["data"] for r in rows}
    return data if data in names else next((n for n in names if _short(n) == data), data)


def write(m: Manifest, jobs: list[Job], command: str, partial: bool = False) -> list[Path]:
    """The table and its JSON at the manifest's ``out``; also into docs/REPRODUCTION.md where that holds
    the manifest's markers."""
    text, record = markdown(m, jobs, command, partial)
    out = m.at(m.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    doc = m.at(Path(REPRODUCTION))
    return [out, out.with_suffix(".json")] + ([doc] if splice(doc, m.name, text) else [])


def _relative(path: Path, root: Path) -> str:
    """``path`` from ``root`` when it lies inside it (a record names no folder of the machine that made it)."""
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


# docs/REPRODUCTION.md holds each table between two markers; reproduce writes it there as it writes the
# table's own file, so the document never shows a figure the manifests did not make
REPRODUCTION = "docs/REPRODUCTION.md"


def markers(key: str) -> tuple[str, str]:
    return f"<!-- reproduce:{key} -->", f"<!-- /reproduce:{key} -->"


def headings(text: str) -> list[tuple[int, int]]:
    """(line index, level) of every markdown heading of ``text``, code blocks skipped."""
    out, fenced = [], False
    for i, line in enumerate(text.splitlines()):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            out.append((i, len(line) - len(line.lstrip("#"))))
    return out


def spliced(text: str, level: int) -> str:
    """A table as it stands in a document: its top heading at ``level``, the others kept below it."""
    lines = text.strip().splitlines()
    found = headings(text.strip())
    shift = level - min((lv for _, lv in found), default=level)
    for i, lv in found:
        lines[i] = "#" * (lv + shift) + lines[i][lv:]
    return "\n".join(lines)


def splice(doc: Path, key: str, text: str) -> bool:
    """Put ``text`` between ``doc``'s markers for ``key``, its headings under the section the markers are
    in; False (``doc`` untouched) when it has none."""
    try:
        body = doc.read_text(encoding="utf-8")
    except OSError:
        return False
    begin, end = markers(key)
    i, j = body.find(begin), body.find(end)
    if i < 0 or j < i:
        return False
    above = headings(body[:i])  # the table goes one level below the section it is placed in
    level = above[-1][1] + 1 if above else 2
    doc.write_text(body[:i + len(begin)] + "\n" + spliced(text, level) + "\n" + body[j:], encoding="utf-8")
    return True


CLAIMS_OUT = "docs/claims.md"


def claims_markdown(manifests: list[Manifest]) -> tuple[str, dict[str, Any]]:
    """Every manifest's claims in one table, from the tables already written (``reproduce --claims``):
    nothing is run; a claim whose table is not made yet says so and names the command that makes it."""
    lines = ["## The papers' claims, as our tables settle them", "",
             "Produced by (reads the tables the manifests wrote; runs nothing):", "", "```",
             "python -m vlm_inspect.reproduce --claims", "```", "",
             "A claim \"A > B\" **agrees** when the span of A's 95 % intervals (one per training seed) lies entirely "
             "above B's, **disagrees** when it lies entirely at or below, else it is **not resolved at this size**; "
             "\"A ≈ B within m\" agrees when every difference the spans allow is within ±m. A figure is the mean ± sd "
             "over the seeds [the span of their intervals].", "",
             "| paper | claim | figure | A | B | A − B (spans) | verdict | table |",
             "|---|---|---|---|---|---|---|---|"]
    record: list[dict[str, Any]] = []
    for m in manifests:
        made: list[dict[str, Any]] = []
        partial = False
        try:
            doc = json.loads(m.at(m.out).with_suffix(".json").read_text())
            made, partial = doc.get("claims", []), bool(doc.get("partial"))
        except (OSError, json.JSONDecodeError):
            pass
        for c in m.claims:
            this = (c.paper, c.claim, c.a, c.b, c.column, c.data)
            same = [v for v in made if (v["paper"], v["claim"], v["a"], v["b"], v["column"], v["data"]) == this]
            found = next((v for v in same if (v.get("metric"), v.get("relation"), v.get("margin"))
                          == (c.metric, c.relation, c.margin)), None)
            rel = ">" if c.relation == ">" else f"≈ (within {c.margin:g})"
            where = f"`{m.out}` (`reproduce {m.name}`" + (", partial: may change)" if partial else ")")
            figure_of = f"{c.metric}, {c.column}, {_short(c.data)}"
            if found is None:
                why = ("the table is out of date (the claim's metric, relation or margin changed since): run "
                       f"`reproduce {m.name}` again" if same else "not measured yet")
                lines.append(f"| {c.paper} | {c.claim} | {figure_of} | {c.a} | {c.b} | – | {why} | {where} |")
                record.append({"manifest": m.name, "paper": c.paper, "claim": c.claim, "verdict": None})
                continue
            lo, hi = found["difference_interval"]
            a_text = found.get("a_text", f"{found['a_mean']:.3f}")
            b_text = found.get("b_text", f"{found['b_mean']:.3f}")
            lines.append(f"| {c.paper} | {c.claim} | {figure_of} | {c.a} {a_text} | {rel} {c.b} {b_text} | "
                         f"[{lo:+.3f}, {hi:+.3f}] | **{found['verdict']}**"
                         f"{' (provisional)' if found.get('provisional') else ''} | {where} |")
            record.append({"manifest": m.name, **found})
    return "\n".join(lines), {"command": "python -m vlm_inspect.reproduce --claims", "claims": record}


def write_claims(manifests: list[Manifest], root: Path) -> list[Path]:
    text, record = claims_markdown(manifests)
    out = root / CLAIMS_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    doc = root / REPRODUCTION
    return [out, out.with_suffix(".json")] + ([doc] if splice(doc, "claims", text) else [])
