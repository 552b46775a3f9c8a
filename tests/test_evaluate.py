"""The evaluation module: metrics from the COCO toolkit, worst case per sample, the CLI's outputs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import embedded
from vlm_inspect.evaluate import AttackSpec, caption_scores, evaluate_model, exact_match, parse_eps, vqa_accuracy


def test_caption_metrics():
    refs = [["a small red star on the left"], ["two large blue circles"]]
    perfect = caption_scores(["a small red star on the left", "two large blue circles"], refs)
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6) and perfect["rouge_l"] == pytest.approx(1.0)
    wrong = caption_scores(["a large green cross in the middle", "three small white squares"], refs)
    assert wrong["bleu4"] < 0.1 and wrong["cider"] < perfect["cider"]
    assert len(wrong["cider_per_sample"]) == 2


def test_exact_match_and_vqa_accuracy():
    assert exact_match(["Red.", "two", "yes "], ["red", "three", "yes"]) == [True, False, True]
    assert vqa_accuracy("white", ["white"] * 2 + ["gray"] * 8) == pytest.approx(2 / 3)
    assert vqa_accuracy("white", ["white"] * 5) == 1.0


def test_parse_eps():
    assert parse_eps("4/255") == pytest.approx(4 / 255) and parse_eps("0.03") == 0.03
    with pytest.raises(ValueError):
        parse_eps("four")
    with pytest.raises(ValueError):
        parse_eps("-1/255")


def test_zero_shot_rows_and_worst_case():
    model = embedded("shapes-clip")
    attacks = [AttackSpec("fgsm", 8 / 255), AttackSpec("pgd", 8 / 255, steps=3, restarts=2)]
    rows = evaluate_model(model, "shapes:shapes-color", attacks, n=16, batch_size=8)
    by = {(r["eps"], r["attack"]): r["value"] for r in rows}
    assert set(by) == {("0", "none"), ("8/255", "fgsm"), ("8/255", "pgd"), ("8/255", "worst")}
    assert by[("8/255", "worst")] <= min(by[("8/255", "fgsm")], by[("8/255", "pgd")])
    assert all(r["n"] == 16 and r["metric"] == "top1" for r in rows)


def test_caption_and_vqa_rows():
    rows = evaluate_model(embedded("shapes-captioner"), "shapes:shapes-scenes", [AttackSpec("bim", 4 / 255, steps=2)],
                          n=6, batch_size=6)
    assert {r["metric"] for r in rows} == {"bleu4", "cider", "rouge_l"}
    for r in rows:  # CIDEr rows keep every image's score (their mean is the corpus CIDEr): intervals need them
        if r["metric"] == "cider":
            assert len(r["per_sample"]) == 6 and sum(r["per_sample"]) / 6 == pytest.approx(r["value"], abs=1e-3)
        else:
            assert "per_sample" not in r
    rows = evaluate_model(embedded("shapes-vqa"), "shapes:shapes-scenes", [AttackSpec("fgsm", 4 / 255)], n=6)
    assert {(r["attack"], r["metric"]) for r in rows} == {("none", "exact_match"), ("fgsm", "exact_match")}


def test_cli_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "res.md"
    cmd = [sys.executable, "-m", "vlm_inspect.evaluate", "--models", "shapes-clip", "--data",
           "shapes:shapes-color;shapes:shapes-size", "--attack", "fgsm,pgd", "--eps", "1/255,2/255", "--steps", "2",
           "--alpha", "eps/4", "--samples", "8", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "python -m vlm_inspect.evaluate --models shapes-clip" in text
    assert "| shapes-clip | shapes-color |" in text and "**average**" in text and "worst 2/255" in text
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["rows"] and data["attacks"][0]["attack"] == "fgsm"
    assert [a["alpha"] for a in data["attacks"] if a["attack"] == "pgd"] == ["0.25/255", "0.5/255"]  # eps/4
    assert out.with_suffix(".png").stat().st_size > 1000
    # one record per model x data set x threat model, as RobustBench keeps them
    from vlm_inspect.checkpoints import weights_digest
    from vlm_inspect.models import load

    recs = data["records"]
    assert len(recs) == 2 * 2 and {(r["data"], r["threat_model"]["eps"]) for r in recs} == \
        {(d, e) for d in ("shapes:shapes-color", "shapes:shapes-size") for e in ("1/255", "2/255")}
    r = next(r for r in recs if r["data"] == "shapes:shapes-color" and r["threat_model"]["eps"] == "2/255")
    assert r["weights_digest"] == weights_digest(load("shapes-clip")) and r["samples"] == 8 and r["seed"] == 0
    assert r["threat_model"]["norm"] == "linf" and [a["attack"] for a in r["attacks"]] == ["fgsm", "pgd"]
    assert 0 <= r["robust"] <= min(r["per_attack"].values()) and r["clean"] >= r["robust"]  # worst case per sample
    assert r["robust"] == next(x["value"] for x in data["rows"] if x["data"] == r["data"] and x["eps"] == "2/255"
                               and x["attack"] == "worst")


def test_cli_errors_are_clear(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vlm_inspect.evaluate", "--models", "shapes-clip", "--attack", "cw"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown attack 'cw'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "vlm_inspect.evaluate", "--models", "nope"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown model 'nope'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "vlm_inspect.evaluate", "--models", "shapes-clip", "--alpha", "eps/0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--alpha" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("precision, expect", [("auto", False), ("bf16", True)])
def test_auto_precision_decodes_in_fp32_on_the_cpu(monkeypatch, precision, expect):
    """``evaluate`` shares the app's rule: under ``auto`` on a CPU with native bf16 the attacks and the
    image encoder run in bf16 and the caption is decoded in fp32; an explicit bf16 is obeyed."""
    import torch

    import vlm_inspect.runtime as runtime
    from vlm_inspect.evaluate import evaluate

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)  # as on AMX / AVX512-BF16
    model = embedded("shapes-captioner")
    monkeypatch.setattr("vlm_inspect.evaluate.run.load", lambda name, device="cpu", weights="default": model)
    seen: dict[str, list[bool]] = {"decode": [], "encoder": []}
    generating = [False]  # the encoder also runs in the attack's loss: record it inside generate() only
    real_generate = type(model).generate

    def generate(self, *a, **kw):
        generating[0] = True
        try:
            return real_generate(self, *a, **kw)
        finally:
            generating[0] = False
    monkeypatch.setattr(type(model), "generate", generate)
    for key, cls, method in (("decode", type(model.model), "generate"), ("encoder", type(model.model.encoder), "forward")):
        real = getattr(cls, method)

        def spy(self, *a, _real=real, _key=key, **kw):
            if generating[0]:
                seen[_key].append(torch.is_autocast_enabled("cpu"))
            return _real(self, *a, **kw)
        monkeypatch.setattr(cls, method, spy)
    evaluate(["shapes-captioner"], ["shapes:shapes-scenes"], [AttackSpec("fgsm", 4 / 255)], n=2, precision=precision)
    assert seen["decode"] and set(seen["decode"]) == {expect}
    assert seen["encoder"] and set(seen["encoder"]) == {True}  # the image encoder keeps bf16 either way


def _evaluate_json(args: list[str], out, nproc: int) -> list:
    import os
    import subprocess
    import sys

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every process
    r = subprocess.run([*launcher, "-m", "vlm_inspect.evaluate", *args, "--out", str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (f"rank 1 of {nproc}" in r.stderr) == (nproc > 1)
    assert "keeps every process busy" not in r.stderr  # these runs give every rank a batch
    assert not out.with_name(out.stem + ".partial.jsonl").exists()  # the journal of a finished run is gone
    doc = json.loads(out.with_suffix(".json").read_text())
    for row in doc["rows"]:
        for stage in row.get("stages", []):
            stage.pop("seconds")  # the only thing allowed to differ
    return doc["rows"]


@pytest.mark.parametrize("args", [
    ["--models", "shapes-clip", "--data", "shapes:shapes-combo", "--attack", "pgd,autoattack", "--eps", "8/255",
     "--steps", "2", "--restarts", "2", "--samples", "10", "--batch-size", "3"],
    ["--models", "shapes-captioner", "--data", "shapes:shapes-scenes", "--attack", "apgd", "--eps", "4/255",
     "--steps", "2", "--restarts", "2", "--samples", "6", "--batch-size", "2"],
], ids=["zero-shot", "captions"])
def test_two_processes_equal_one(args, tmp_path):
    """torchrun shards the batches across ranks and gathers the per-sample worst case: the same rows."""
    one = _evaluate_json(args, tmp_path / "one" / "t.md", 1)
    two = _evaluate_json(args, tmp_path / "two" / "t.md", 2)
    assert one == two and len(one) >= 3


def test_two_processes_say_when_one_of_them_gets_no_batch(tmp_path):
    import os

    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
                        "-m", "vlm_inspect.evaluate", "--models", "shapes-clip", "--data", "shapes:shapes-color",
                        "--attack", "none", "--samples", "4", "--out", str(tmp_path / "t.md")],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("4 sample(s) in batches of 100 make 1 batch(es) per data set, fewer than the 2 processes: the others "
            "wait; --batch-size 2 or less keeps every process busy") in r.stderr


# ---- a killed run resumes (evaluate --resume) ----------------------------------------------------------

def test_a_killed_run_resumes_where_it_stopped_and_writes_the_same_table(tmp_path, monkeypatch):
    from vlm_inspect.evaluate import cli, run
    from vlm_inspect.evaluate.journal import journal_path

    args = ["--models", "shapes-clip,shapes-clip+apd", "--data", "shapes:shapes-combo;shapes:shapes-color",
            "--attack", "pgd,autoattack", "--eps", "16/255", "--steps", "2", "--samples", "4", "--batch-size", "2"]

    def rows(out):
        doc = json.loads(out.with_suffix(".json").read_text())
        for row in doc["rows"]:
            for stage in row.get("stages", []):
                stage.pop("seconds")
        return doc["rows"]

    full = tmp_path / "full.md"
    assert cli.main([*args, "--out", str(full)]) == 0
    assert not journal_path(full).exists()  # a finished run leaves no journal

    real, calls = run.evaluate_model, []

    def counted(kill_at=None):
        def f(model, spec, *a, **kw):
            if len(calls) == kill_at:
                raise KeyboardInterrupt  # the run is killed while computing this unit
            calls.append((model.name, spec))
            return real(model, spec, *a, **kw)
        return f

    out = tmp_path / "cut.md"
    monkeypatch.setattr(run, "evaluate_model", counted(kill_at=3))
    with pytest.raises(KeyboardInterrupt):
        cli.main([*args, "--out", str(out)])
    assert not out.exists() and len(journal_path(out).read_text().splitlines()) == 3
    calls.clear()
    monkeypatch.setattr(run, "evaluate_model", counted())
    assert cli.main([*args, "--out", str(out), "--resume"]) == 0
    assert calls == [("shapes-clip+apd", "shapes:shapes-color")]  # only the unit the kill cut
    assert rows(out) == rows(full) and not journal_path(out).exists()


def test_the_journal_reuses_only_units_of_the_same_settings_and_weights(tmp_path, caplog):
    from vlm_inspect.evaluate.journal import Journal

    path, settings = tmp_path / "t.partial.jsonl", {"attacks": [{"attack": "pgd", "eps": "4/255"}], "seed": 0}
    Journal(path, settings, resume=False).add("m", "d", "digest-1", [{"value": 0.5}])
    Journal(path, {**settings, "seed": 1}, resume=False).add("m", "d2", "digest-1", [{"value": 0.25}])
    with path.open("a") as f:
        f.write('{"settings": {"attacks": [{"att')  # the line a kill cut short
    Journal(path, settings, resume=True).add("m", "d4", "digest-1", [{"value": 1.0}])  # after the cut line
    j = Journal(path, settings, resume=True)
    assert j.get("m", "d", "digest-1") == [{"value": 0.5}] and j.get("m", "d4", "digest-1") == [{"value": 1.0}]
    assert j.get("m", "d", "digest-2") is None      # the model was retrained since
    assert j.get("m", "d2", "digest-1") is None     # another seed
    with caplog.at_level("INFO", logger="vlm_inspect.evaluate"):
        fresh = Journal(path, settings, resume=False)
    assert fresh.get("m", "d", "digest-1") is None and "add --resume to reuse them" in caplog.text
    reader = Journal(path, settings, resume=True, write=False)  # a torchrun rank other than the first
    reader.add("m", "d3", "digest-1", [])
    assert len(path.read_text().splitlines()) == 4
    reader.finish()
    assert path.exists()
    Journal(path, settings, resume=True).finish()
    assert not path.exists()


def test_resume_needs_out(capsys):
    from vlm_inspect.evaluate import cli

    assert cli.main(["--models", "shapes-clip", "--resume"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --resume continues the run that writes --out; "
                                               "give the same --out")
