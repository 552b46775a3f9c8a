"""``python -m vlm_inspect.reproduce``: manifests, the plan (done / resume / fresh / refused), the statistics,
and a tiny table made end to end through the real train and evaluate processes."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file as _load_file

from vlm_inspect.reproduce.cli import main
from vlm_inspect.reproduce.manifest import ManifestError, load_manifest
from vlm_inspect.reproduce.plan import DONE, FRESH, RESUME, plan
from vlm_inspect.reproduce.stats import AGREES, DISAGREES, UNRESOLVED, figure, verdict, wilson

TINY = Path(__file__).parent / "data" / "reproduce_tiny.toml"


def load_file(path):
    """The tensors of a safetensors file, copied out: ``load_file`` maps the file, and these tests overwrite
    files in place (as a kill's leftovers would be), which would change a mapped tensor under our feet."""
    return {k: v.clone() for k, v in _load_file(path).items()}


# ---- statistics ------------------------------------------------------------------------------------

def test_wilson_interval_by_hand():
    # (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.96, worked out for 5 of 10 and 0 of 10
    lo, hi = wilson(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(256, 256)
    assert hi == 1.0 and lo == pytest.approx(0.9852, abs=1e-4)
    for bad in [(3, 0), (11, 10), (-1, 10)]:
        with pytest.raises(ValueError):
            wilson(*bad)


def test_figure_mean_sd_and_span():
    f = figure([0.5, 0.6, 0.7], 100, "top1")
    assert f.mean == pytest.approx(0.6) and f.sd == pytest.approx(0.1)
    assert f.span == (wilson(50, 100)[0], wilson(70, 100)[1])
    assert f.text() == f"0.600 ± 0.100 [{f.span[0]:.2f}, {f.span[1]:.2f}]"
    one = figure([0.25], 8, "top1")
    assert one.sd is None and "±" not in one.text()
    bleu = figure([0.9, 1.1], 300, "bleu4")  # neither a proportion nor a mean over images: no interval
    assert bleu.intervals() == [] and bleu.span == (0.9, 1.1) and "[" not in bleu.text()
    cider = figure([2.0, 3.0], 4, "cider", [[1.0, 3.0, 1.0, 3.0], [3.0, 3.0, 3.0, 3.0]])
    half = 1.959963984540054 * math.sqrt(4 / 3) / 2  # sd of (1, 3, 1, 3) is sqrt(4/3); n = 4
    assert cider.intervals() == [pytest.approx((2 - half, 2 + half)), pytest.approx((3.0, 3.0))]
    assert cider.span == pytest.approx((2 - half, 2 + half)) and cider.text().endswith(f"[{2 - half:.3f}, {2 + half:.3f}]")


def test_verdicts_need_the_spans_to_separate():
    high, low = figure([0.80, 0.82, 0.81], 256, "top1"), figure([0.50, 0.52, 0.49], 256, "top1")
    assert verdict(">", high, low)[0] == AGREES
    assert verdict(">", low, high)[0] == DISAGREES
    near = figure([0.78, 0.80, 0.79], 256, "top1")
    assert verdict(">", high, near)[0] == UNRESOLVED  # 2 points apart on 256 images: the intervals overlap
    assert verdict(">", figure([0.9], 16, "top1"), figure([0.5], 16, "top1"))[0] == UNRESOLVED  # 16 images: too few
    tie = figure([0.801, 0.799], 4096, "top1")
    assert verdict("≈", tie, figure([0.800, 0.802], 4096, "top1"), margin=0.05)[0] == AGREES
    assert verdict("≈", high, low, margin=0.05)[0] == DISAGREES
    assert verdict("≈", high, near, margin=0.05)[0] == UNRESOLVED
    with pytest.raises(ValueError, match="margin"):
        verdict("≈", high, low)


# ---- manifests ------------------------------------------------------------------------------------

def _manifest(tmp_path: Path, text: str | None = None, name: str = "m.toml") -> Path:
    text = (text if text is not None else TINY.read_text()).replace("OUT", str(tmp_path))
    p = tmp_path / name
    p.write_text(text)
    return p


ALSO_X = 'minutes = 0.3\n[evaluate.also.x]\nmodels = ["{}"]\nminutes = 1\nargs = '  # a second protocol, args last


@pytest.mark.parametrize("change,match", [
    ({'title = "tiny: AdvPT at two seeds"': 'titel = "x"'}, "titel is not a manifest key"),
    ({'"--lr", "2e-3"]': '"--lr", "2e-3", "--out", "x"]'}, "must not give --out: reproduce sets it"),
    ({'b = "shapes-clip"': 'b = "tecoa"'}, "'tecoa' is not a model of any evaluation"),
    ({'relation = ">"': 'relation = "≈"'}, "needs a margin > 0"),
    ({"seeds = [0, 1]": "seeds = [0, 0]"}, "distinct whole numbers"),
    ({"minutes = 0.5": "minutes = -1"}, "positive number of minutes"),
    ({"[evaluate]": "[evaluate\n"}, "not valid TOML"),
    # checked by the plan, still before anything runs
    ({'column = "pgd 4/255"': 'column = "pgd 5/255"'}, "'pgd 5/255' is not a column of this evaluation"),
    ({"minutes = 0.3": "minutes = 0.3\nminutes_of = { tecoa = 2 }"}, "'tecoa' is no model of evaluate.models"),
    ({'data = "shapes-combo"': 'data = "shapes-combo"\nmetric = "cidre"'}, "'cidre'; valid: top1"),
    ({'data = "shapes-combo"': 'data = "shapes-combo"\nmargin = "big"'}, "margin must be a number"),
    # a CLIP is scored by top-1: a CIDEr claim on it would only ever say "not in the table"
    ({'data = "shapes-combo"': 'data = "shapes-combo"\nmetric = "cider"'}, "'cider' is not a metric these models"),
    ({'args = ["--defense", "advpt"]': 'args = ["--defense", "advpt", "--list-options"]'}, "must not give --list-options"),
    # an option a defense refuses only once it builds its prompts: refused by the plan, not hours later
    ({'args = ["--defense", "advpt"]': 'args = ["--defense", "advpt", "--set", "n_text=8"]'}, "fewer than n_text=8 words"),
    # two protocols on one model and one data set would collide in a cell
    ({"minutes = 0.3": ALSO_X.format("shapes-clip") + '["--data", "shapes:shapes-combo"]'},
     "evaluates shapes-clip on shapes:shapes-combo, as \\[evaluate\\]"),
    ({"minutes = 0.3": ALSO_X.format("shapes-clip") + "[]"}, "evaluates shapes-clip on every data set of the family"),
    # a claim no protocol can settle: the column exists, but not for that model on that data set
    ({"minutes = 0.3": ALSO_X.format("advpt") + '["--data", "shapes:shapes-color", "--attack", "fgsm", "--eps", "4/255"]',
      'column = "pgd 4/255"': 'column = "fgsm 4/255"'}, "no evaluation gives advpt the column 'fgsm 4/255' on 'shapes-combo'"),
    ({"minutes = 0.3": ALSO_X.format("shapes-clip").replace("minutes = 1", "minute = 1") + "[]"},
     "evaluate.also.x.minute is not a key of an evaluation"),
    ({"minutes = 0.3": ALSO_X.format("shapes-clip") + '["--attack", "pgd", "--eps", "99"]'}, "evaluate.also.x.args"),
])
def test_manifest_problems_are_one_sentence_before_anything_runs(tmp_path, change, match):
    text = TINY.read_text()
    for old, new in change.items():
        assert old in text
        text = text.replace(old, new)
    with pytest.raises(ManifestError, match=match):
        plan(load_manifest(_manifest(tmp_path, text)))
    assert not (tmp_path / "runs").exists()


def test_unparsable_training_arguments_are_refused_before_anything_runs(tmp_path, capsys):
    text = TINY.read_text().replace('args = ["--defense", "advpt"]', 'args = ["--defense", "advpt", "--stepz", "3"]')
    assert main([str(_manifest(tmp_path, text)), "--plan"]) == 2
    err = capsys.readouterr().err
    assert "do not parse" in err and "--stepz" in err and not (tmp_path / "runs" / "advpt").exists()
    text = TINY.read_text().replace('args = ["--defense", "advpt"]', 'args = ["--defense", "advpt", "--set", "depht=2"]')
    assert main([str(_manifest(tmp_path, text)), "--plan"]) == 2
    assert "unknown option(s) depht" in capsys.readouterr().err


def test_every_shipped_manifest_loads_and_plans(tmp_path):
    """The manifests in reproduce/ parse and name only registered defenses, options, models and columns
    (planned against an empty runs folder, not whatever a developer has in runs/)."""
    from vlm_inspect.reproduce.manifest import manifest_dir

    found = sorted(manifest_dir().glob("*.toml"))
    assert found, "reproduce/ holds no manifest"
    for p in found:
        m = load_manifest(p)
        assert m.out.parts[0] == "docs" and m.root == manifest_dir().resolve().parent, p
        m.runs_dir = tmp_path / m.name
        jobs = plan(m)
        assert jobs and all(j.minutes > 0 and j.state == FRESH for j in jobs)


def test_a_table_goes_between_its_markers_under_the_section_it_stands_in(tmp_path):
    from vlm_inspect.reproduce.table import splice

    doc = tmp_path / "doc.md"
    body = ("# Doc\n\n## Section\n\n```\n# a comment in a code block, no heading\n```\n\n"
            "<!-- reproduce:t -->\nold\n<!-- /reproduce:t -->\n\nafter\n")
    doc.write_text(body)
    table = "## Title\n\ntext\n\n### Sub\n\n```\n# kept as it is\n```\n"
    assert splice(doc, "t", table)
    assert doc.read_text() == body.replace("old", "### Title\n\ntext\n\n#### Sub\n\n```\n# kept as it is\n```")
    assert splice(doc, "t", "## Again\n")  # a second write replaces the first
    assert "### Again" in doc.read_text() and "Title" not in doc.read_text()
    assert not splice(doc, "other", table) and not splice(tmp_path / "none.md", "t", table)


def test_reproduction_md_holds_every_table_as_its_manifest_wrote_it(tmp_path):
    """docs/REPRODUCTION.md has a place for every manifest's table and the claims, and what stands there is
    the table file reproduce wrote (a hand edit of a figure, or a stale copy, fails here)."""
    from vlm_inspect.reproduce.manifest import manifest_dir
    from vlm_inspect.reproduce.table import CLAIMS_OUT, REPRODUCTION, markers, splice

    root = manifest_dir().resolve().parent
    doc = (root / REPRODUCTION).read_text()
    tables = {m.name: m.at(m.out) for m in map(load_manifest, sorted(manifest_dir().glob("*.toml")))}
    tables["claims"] = root / CLAIMS_OUT
    for key, out in tables.items():
        begin, end = markers(key)
        assert doc.count(begin) == 1 and doc.count(end) == 1, f"{REPRODUCTION} has no place for {key}'s table"
        if out.is_file():
            copy = tmp_path / "copy.md"
            copy.write_text(doc)
            splice(copy, key, out.read_text())
            assert copy.read_text() == doc, f"{REPRODUCTION} shows another {key} table than {out.name}"


def test_list_names_every_manifest_with_what_is_left(capsys):
    from vlm_inspect.reproduce.manifest import manifest_dir

    assert main(["--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == sorted(p.stem for p in manifest_dir().glob("*.toml"))
    assert all(line.endswith("left]") or line.endswith("[all done]") for line in out)


def test_a_run_killed_before_its_first_snapshot_starts_afresh(tmp_path):
    """A kill before the first snapshot leaves only the log (and maybe a staging folder): not someone else's run."""
    from vlm_inspect.reproduce.plan import run_folder

    m = load_manifest(_manifest(tmp_path))
    folder = m.at(run_folder(m, "advpt", 0))
    (folder / "checkpoints" / ".staging-step-0000001-123").mkdir(parents=True)
    (folder / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    shutil.rmtree(folder / "checkpoints")
    (folder / ".write-probe-x").write_text("")
    assert next(j for j in plan(m) if j.label == "advpt seed 0").state == FRESH
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ManifestError, match="holds no run reproduce can read"):
        plan(m)


def test_split_eps_jobs_share_one_clean_row_and_data_sets_average(tmp_path):
    """Two budgets as two jobs each write the clean row: the table counts it once; the average pools images."""
    from vlm_inspect.reproduce.table import collect, figures

    text = TINY.read_text().replace('"--eps", "4/255"', '"--eps", "4/255,8/255"').replace(
        'minutes = 0.3', 'minutes = 0.3\nsplit_eps = true').replace(
        '"--data", "shapes:shapes-combo", "--attack"', '"--data", "shapes:shapes-combo;shapes:shapes-color", "--attack"')
    m = load_manifest(_manifest(tmp_path, text))
    m.runs, m.protocols[0].models = {}, ["shapes-clip"]
    m.claims = []
    jobs = [j for j in plan(m) if j.kind == "evaluate"]
    assert [j.label for j in jobs] == ["shapes-clip eps 4/255", "shapes-clip eps 8/255"]
    for job, robust in zip(jobs, (0.5, 0.25)):
        rows = [{"model": "shapes-clip", "data": d, "eps": "0", "attack": "none", "metric": "top1", "value": v, "n": n}
                for d, v, n in (("shapes:shapes-combo", 1.0, 8), ("shapes:shapes-color", 0.5, 24))]
        rows += [{**r, "eps": job.label.split()[-1], "attack": "pgd", "value": robust} for r in rows]
        job.out.parent.mkdir(parents=True, exist_ok=True)
        job.out.with_suffix(".json").write_text(json.dumps({"command": job.command, "rows": rows}))
    rows = collect(jobs)
    assert sum(r["attack"] == "none" for r in rows) == 2  # once per data set, not once per job
    figs = figures(rows)
    assert figs[("top1", "shapes-clip", "average", "clean")].values == ((8 * 1.0 + 24 * 0.5) / 32,)
    assert figs[("top1", "shapes-clip", "average", "clean")].n == 32
    assert figs[("top1", "shapes-clip", "average", "pgd 8/255")].values == (0.25,)
    jobs[0].out.with_suffix(".json").write_text(json.dumps({"command": "python -m vlm_inspect.evaluate other", "rows": []}))
    with pytest.raises(ValueError, match="written by another command"):
        collect(jobs)


def test_a_second_protocol_evaluates_only_its_models_and_joins_the_table(tmp_path):
    """``[evaluate.also.<name>]``: its own data set for a subset of the models, in its own folder; the table
    gets its rows (only for those models) and its columns, and a claim may use them."""
    from vlm_inspect.reproduce.table import markdown

    text = TINY.read_text().replace("minutes = 0.3", 'minutes = 0.3\n\n[evaluate.also.color]\nmodels = ["advpt"]\n'
                                    'args = ["--data", "shapes:shapes-color", "--attack", "fgsm", "--eps", "4/255", '
                                    '"--samples", "8"]\nminutes = 0.2')
    m = load_manifest(_manifest(tmp_path, text))
    assert m.models == ["shapes-clip", "advpt"] and [p.name for p in m.protocols] == ["", "color"]
    jobs = [j for j in plan(m) if j.kind == "evaluate"]
    assert [j.label for j in jobs] == ["shapes-clip", "advpt seed 0", "advpt seed 1", "advpt seed 0 (color)",
                                       "advpt seed 1 (color)"]
    assert jobs[3].out == tmp_path / "runs" / "eval" / "color" / "advpt-seed-0.md"
    assert "shapes:shapes-color" in jobs[3].argv and "shapes:shapes-combo" in jobs[1].argv
    for job in jobs:
        data = "shapes:shapes-color" if "(color)" in job.label else "shapes:shapes-combo"
        attack = "fgsm" if "(color)" in job.label else "pgd"
        rows = [{"model": job.model, "data": data, "eps": "0", "attack": "none", "metric": "top1", "value": 1.0, "n": 8},
                {"model": job.model, "data": data, "eps": "4/255", "attack": attack, "metric": "top1", "value": 0.5, "n": 8}]
        job.out.parent.mkdir(parents=True, exist_ok=True)
        job.out.with_suffix(".json").write_text(json.dumps({"command": job.command, "rows": rows}))
    text, _ = markdown(m, jobs, "cmd")
    assert "| advpt | 2 | shapes-color | 1.000 ± 0.000 [0.68, 1.00] | – | 0.500 ± 0.000 [0.22, 0.78] |" in text
    assert "| shapes-clip | 1 | shapes-color |" not in text
    assert "Evaluation of advpt (and every seed of a run)" in text
    # the average pools only the data sets every model and seed has in a column: clean's is combo alone
    assert "| advpt | 2 | **average** |" not in text
    # --partial: the finished evaluations only, and the table says what is missing
    for job in jobs[:-1]:
        job.state = DONE
    text, record = markdown(m, jobs, "cmd", partial=True)
    assert "**Partial: 4 of 5 evaluations are done** (not yet: advpt seed 1 (color))" in text
    assert "| advpt | 1 | shapes-color |" in text and record["partial"] == ["advpt seed 1 (color)"]
    # through the CLI the state decides: the trained models' evaluations carry no weights stamp here (not
    # started by reproduce), so only the undefended model's counts as done
    assert main([str(m.path), "--partial"]) == 0
    assert "**Partial: 1 of 5 evaluations are done**" in (tmp_path / "tiny.md").read_text()
    (tmp_path / "runs" / "eval" / "shapes-clip.json").unlink()
    assert main([str(m.path), "--partial"]) == 1  # nothing finished: nothing to tabulate


def test_averages_pool_only_the_data_sets_every_row_has_and_a_cell_needs_one_test_set():
    from vlm_inspect.reproduce.table import figures

    def row(entry, seed, data, value, n=10):
        return {"entry": entry, "training_seed": seed, "data": data, "metric": "top1", "attack": "pgd",
                "eps": "4/255", "value": value, "n": n, "protocol": ""}

    rows = [row("a", None, "d1", 0.5), row("a", None, "d2", 0.7), row("a", None, "d3", 0.1),
            row("b", 0, "d1", 0.2), row("b", 0, "d2", 0.4), row("b", 1, "d1", 0.3), row("b", 1, "d2", 0.5)]
    figs = figures(rows)
    assert figs[("top1", "a", "average", "pgd 4/255")].values == pytest.approx((0.6,))  # d3: b has none
    assert figs[("top1", "b", "average", "pgd 4/255")].values == pytest.approx((0.3, 0.4))
    assert figs[("top1", "a", "average", "pgd 4/255")].n == 20
    with pytest.raises(ValueError, match="different numbers of test images"):
        figures([*rows, row("b", 2, "d1", 0.3, n=12)])


def test_a_claim_whose_settings_changed_since_its_table_says_so(made, tmp_path):
    from vlm_inspect.reproduce.table import claims_markdown

    tmp, manifest = made
    changed = manifest.read_text().replace('relation = ">"', 'relation = "≈"\nmargin = 0.2')
    p = tmp / "changed.toml"
    p.write_text(changed)
    text, _ = claims_markdown([load_manifest(p)])
    assert "the table is out of date" in text


# ---- end to end ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The tiny table made once, two jobs at a time, through real train and evaluate processes."""
    tmp = tmp_path_factory.mktemp("reproduce")
    manifest = _manifest(tmp)
    assert main([str(manifest), "--jobs", "2", "--no-progress"]) == 0
    return tmp, manifest


def test_the_tiny_table_is_the_seeds_evaluations(made):
    tmp, manifest = made
    record = json.loads((tmp / "tiny.json").read_text())
    evals = {p.stem: json.loads(p.read_text()) for p in (tmp / "runs" / "eval").glob("*.json")}
    assert set(evals) == {"shapes-clip", "advpt-seed-0", "advpt-seed-1"}
    robust = {k: next(r["value"] for r in e["rows"] if r["attack"] == "pgd") for k, e in evals.items()}
    fig = next(f for f in record["figures"] if f["model"] == "advpt" and f["column"] == "pgd 4/255")
    assert fig["values"] == [robust["advpt-seed-0"], robust["advpt-seed-1"]] and fig["n"] == 8
    assert fig["mean"] == pytest.approx((robust["advpt-seed-0"] + robust["advpt-seed-1"]) / 2)
    assert fig["span"][0] == min(wilson(round(v * 8), 8)[0] for v in fig["values"])
    assert fig["span"][1] == max(wilson(round(v * 8), 8)[1] for v in fig["values"])
    # the two seeds trained different prompts (seeded init and data order)
    a, b = (load_file(tmp / "runs" / "advpt" / f"seed-{s}" / "model.safetensors") for s in (0, 1))
    assert any(not a[k].equal(b[k]) for k in a)
    text = (tmp / "tiny.md").read_text()
    assert f"python -m vlm_inspect.reproduce {manifest}" in text
    assert "| advpt | 2 | shapes-combo |" in text and "| shapes-clip | 1 | shapes-combo |" in text
    assert record["claims"][0]["verdict"] == UNRESOLVED  # 8 images cannot settle anything


def test_the_claims_table_gathers_made_and_unmade_claims(made, tmp_path):
    """``--claims`` reads the tables already written; a manifest whose table is not made says so."""
    from vlm_inspect.reproduce.table import claims_markdown

    tmp, manifest = made
    m = load_manifest(manifest)
    record = json.loads((tmp / "tiny.json").read_text())["claims"][0]
    unmade = load_manifest(_manifest(tmp_path, TINY.read_text().replace('out = "OUT/tiny.md"', 'out = "OUT/none.md"')))
    text, rec = claims_markdown([m, unmade])
    rows = [line for line in text.splitlines() if line.startswith("| test |")]
    assert len(rows) == 2
    lo, hi = record["difference_interval"]
    assert f"[{lo:+.3f}, {hi:+.3f}] | **{UNRESOLVED}**" in rows[0] and record["a_text"] in rows[0]
    assert "not measured yet" in rows[1] and rec["claims"][1]["verdict"] is None


def test_a_second_run_reruns_nothing_and_writes_the_same_table(made, capsys):
    tmp, manifest = made
    before = {p: p.stat().st_mtime_ns for p in (tmp / "runs").rglob("*.json")}
    table = (tmp / "tiny.md").read_text()
    assert all(j.state == DONE for j in plan(load_manifest(manifest)))
    assert main([str(manifest), "--no-progress"]) == 0
    assert "5 done, 0 to resume, 0 to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (tmp / "runs").rglob("*.json")} == before
    assert (tmp / "tiny.md").read_text() == table


def test_a_killed_run_resumes_exactly_and_its_evaluation_is_redone(made):
    """Cut seed 1 back to its step-1 snapshot, as a kill between the two steps leaves it: the plan resumes
    it (not from scratch), its evaluation runs again, and the prompts end bit for bit where they were."""
    tmp, manifest = made
    folder = tmp / "runs" / "advpt" / "seed-1"
    finished = load_file(folder / "model.safetensors")
    shutil.copy(folder / "checkpoints" / "step-0000001" / "model.safetensors", folder / "model.safetensors")
    assert any(not load_file(folder / "model.safetensors")[k].equal(finished[k]) for k in finished)
    shutil.rmtree(folder / "checkpoints" / "step-0000002")
    (folder / "checkpoints" / "LATEST").write_text("step-0000001")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "steps": 1}))
    jobs = plan(load_manifest(manifest))
    assert {(j.kind, j.label): j.state for j in jobs} == {
        ("train", "advpt seed 0"): DONE, ("train", "advpt seed 1"): RESUME, ("evaluate", "shapes-clip"): DONE,
        ("evaluate", "advpt seed 0"): DONE, ("evaluate", "advpt seed 1"): FRESH}
    assert next(j for j in jobs if j.label == "advpt seed 1").argv[:2] == ["--resume", str(folder)]
    assert main([str(manifest), "--no-progress"]) == 0
    resumed = load_file(folder / "model.safetensors")
    assert set(resumed) == set(finished) and all(resumed[k].equal(finished[k]) for k in finished)
    log = (tmp / "runs" / "logs" / "train-advpt-seed-1.log").read_text()
    assert "resumed" in log and "at step 1" in log


def test_a_folder_holding_another_run_is_refused_with_the_difference(made, capsys):
    tmp, manifest = made
    other = _manifest(tmp, TINY.read_text().replace('"--lr", "2e-3"', '"--lr", "1e-3"'), name="other.toml")
    assert main([str(other), "--plan"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with other settings" in err and "lr 0.002 there, 0.001 here" in err
    assert math.isfinite(json.loads((tmp / "runs" / "advpt" / "seed-0" / "config.json").read_text())["train_seconds"])


def test_a_failing_job_stops_the_table_with_its_log(tmp_path, capsys):
    text = TINY.read_text().replace('models = ["shapes-clip", "advpt"]', 'models = ["shapes-clip+nothing"]')
    text = text.split("[[claims]]")[0].replace('[train.runs.advpt]\nargs = ["--defense", "advpt"]\nminutes = 0.5\n', "")
    manifest = _manifest(tmp_path, text)
    assert main([str(manifest), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "error: evaluate shapes-clip+nothing failed (exit 2)" in err and "evaluate-shapes-clip+nothing.log" in err
    assert "shapes-clip+nothing" in err.split("log is", 1)[1]  # the log's last lines: evaluate's own sentence
    assert not (tmp_path / "tiny.md").exists()


def test_a_second_reproduce_of_the_same_runs_is_refused_while_the_first_runs(tmp_path, capsys):
    import fcntl

    manifest = _manifest(tmp_path)
    (tmp_path / "runs").mkdir()
    with (tmp_path / "runs" / ".lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running reproduce holds it
        assert main([str(manifest), "--no-progress"]) == 2
        assert "another reproduce is running" in capsys.readouterr().err
        assert main([str(manifest), "--plan"]) == 0  # read-only: it works while the run goes on
        assert "0 done" in capsys.readouterr().out
    assert not (tmp_path / "runs" / "advpt").exists()


def test_a_metric_without_intervals_settles_no_claim():
    from vlm_inspect.reproduce.stats import NO_INTERVAL

    assert verdict(">", figure([0.301, 0.302, 0.303], 300, "bleu4"), figure([0.300], 300, "bleu4"))[0] == NO_INTERVAL
    # CIDEr with one seed's per-image scores missing (an old journal): no interval, no verdict
    partial = figure([9.0, 9.1], 4, "cider", [[9.0, 9.0, 9.0, 9.0], []])
    assert partial.intervals() == [] and verdict(">", partial, figure([1.0], 4, "cider"))[0] == NO_INTERVAL


def test_a_run_killed_between_its_last_snapshot_and_its_checkpoint_is_finished(made):
    """The last snapshot is written, the checkpoint is not (config.json still says step 1): resuming writes
    the checkpoint without training again, and the plan then calls it done."""
    tmp, manifest = made
    folder = tmp / "runs" / "advpt" / "seed-0"
    finished = load_file(folder / "model.safetensors")
    shutil.copy(folder / "checkpoints" / "step-0000001" / "model.safetensors", folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "steps": 1}))
    assert next(j for j in plan(load_manifest(manifest)) if j.label == "advpt seed 0").state == RESUME
    assert main([str(manifest), "--no-progress"]) == 0
    assert json.loads((folder / "config.json").read_text())["steps"] == 2
    assert all(load_file(folder / "model.safetensors")[k].equal(finished[k]) for k in finished)
    assert all(j.state == DONE for j in plan(load_manifest(manifest)))


def test_an_evaluation_killed_with_units_in_its_journal_is_resumed(made, capsys):
    """A kill mid-evaluation leaves its journal: the plan says resume and counts the journal's units as done."""
    from vlm_inspect.evaluate.journal import journal_path

    tmp, manifest = made
    out = tmp / "runs" / "eval" / "shapes-clip.md"
    table = (tmp / "tiny.md").read_text()
    record = json.loads(out.with_suffix(".json").read_text())
    out.with_suffix(".json").unlink()
    journal_path(out).write_text(json.dumps({"model": "shapes-clip", "data": "shapes:shapes-combo",
                                             "rows": record["rows"]}) + "\n{cut sho")
    job = next(j for j in plan(load_manifest(manifest)) if j.label == "shapes-clip")
    assert job.state == RESUME and job.units == 1
    assert main([str(manifest), "--plan"]) == 0
    assert "1 to resume" in capsys.readouterr().out
    assert main([str(manifest), "--no-progress"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == record["rows"]
    assert not journal_path(out).exists() and (tmp / "tiny.md").read_text() == table


def test_an_evaluation_of_weights_that_changed_since_is_done_again(made):
    from safetensors.torch import save_file

    tmp, manifest = made
    folder = tmp / "runs" / "advpt" / "seed-0"
    shutil.copy(folder / "model.safetensors", tmp / "kept.safetensors")
    weights = load_file(folder / "model.safetensors")
    save_file({k: v + 1 for k, v in weights.items()}, folder / "model.safetensors")  # e.g. retrained by hand
    try:
        states = {(j.kind, j.label): j.state for j in plan(load_manifest(manifest))}
        assert states[("evaluate", "advpt seed 0")] == FRESH and states[("evaluate", "advpt seed 1")] == DONE
    finally:
        shutil.copy(tmp / "kept.safetensors", folder / "model.safetensors")
    assert all(j.state == DONE for j in plan(load_manifest(manifest)))
