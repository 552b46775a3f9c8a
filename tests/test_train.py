"""The training module: a real (tiny) run, exact resume after SIGKILL, 2-process data parallelism,
real data formats, and clear errors that leave no half-written checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlm_inspect.models import load

TINY = ["--batch-size", "4", "--eval-samples", "8", "--workers", "0", "--no-progress", "--log-every", "1"]


def run_train(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "vlm_inspect.train", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_tiny_run_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    r = run_train("--model", "shapes-vqa", "--steps", "3", "--save-every", "2", "--out", str(out), *TINY)
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    for key in ("preset", "family", "model", "defense", "hyperparameters", "data", "seed", "steps", "metrics", "version"):
        assert key in config
    assert config["steps"] == 3 and config["defense"] == "base" and "exact_match" in config["metrics"]
    assert config["hyperparameters"]["loop"]["batch_size"] == 4
    model = load("shapes-vqa", weights=str(out))
    assert model.family == "vqa" and model.checkpoint["steps"] == 3
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "step-0000003"
    # weights changed from the seed's random init
    init = load("shapes-vqa", weights="random")
    assert any(not torch.equal(a, b) for a, b in zip(init.model.parameters(), model.model.parameters()))


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    common = ["--model", "shapes-clip", "--steps", "40", "--save-every", "5", "--eval-every", "0", *TINY]
    straight = tmp_path / "straight"
    r = run_train(*common, "--out", str(straight))
    assert r.returncode == 0, r.stderr

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vlm_inspect.train", *common, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    latest = killed / "checkpoints" / "LATEST"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "step-0000010"):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = int(latest.read_text().strip().split("-")[1])
    assert 10 <= step_at_kill < 40, f"the run was not killed mid-way (LATEST={step_at_kill})"
    # a staging folder from the moment of the kill must not be mistaken for a snapshot
    r = run_train("--resume", str(killed), "--no-progress")
    assert r.returncode == 0, r.stderr
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((killed / "config.json").read_text())["steps"] == 40


def test_two_process_data_parallel(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "vlm_inspect.train",
                        "--model", "shapes-captioner", "--steps", "3", "--out", str(out), "--rank-report",
                        "--eval-every", "0", *TINY], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = [json.loads((out / f"rank-{i}.json").read_text()) for i in range(2)]
    seen0, seen1 = set(reports[0]["indices"]), set(reports[1]["indices"])
    assert len(seen0) == 12 and len(seen1) == 12 and not seen0 & seen1, "ranks must see different samples"
    assert reports[0]["weights_sum"] == reports[1]["weights_sum"], "ranks must end with identical weights"
    assert (out / "model.safetensors").is_file()


def test_train_on_real_formats(tmp_path):
    for c, col in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
        for i in range(4):
            (tmp_path / "pets" / c).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (30, 30), col).save(tmp_path / "pets" / c / f"{i}.png")
    r = run_train("--model", "shapes-clip", "--data", f"imagefolder:{tmp_path / 'pets'}", "--steps", "2",
                  "--shots", "2", "--out", str(tmp_path / "clip"), *TINY)
    assert r.returncode == 0, r.stderr
    (tmp_path / "flickr").mkdir()
    Image.new("RGB", (30, 30)).save(tmp_path / "flickr" / "1.jpg")
    (tmp_path / "tokens.txt").write_text("1.jpg#0\ta red star\n1.jpg#1\ta small red star\n")
    r = run_train("--model", "shapes-captioner", "--data", f"flickr8k:{tmp_path / 'flickr'},{tmp_path / 'tokens.txt'}",
                  "--steps", "1", "--out", str(tmp_path / "cap"), *TINY)
    assert r.returncode == 0, r.stderr
    # the real-scale command shape: a defense on the openai/ViT-B-32 architecture (random weights here),
    # few-shot prompt tuning on an ImageFolder, as APD / CAPT run it
    out = tmp_path / "vitb32-apd"
    r = run_train("--defense", "apd", "--model", "openai/ViT-B-32", "--init", "random", "--data",
                  f"imagefolder:{tmp_path / 'pets'}", "--shots", "1", "--steps", "1", "--eval-every", "0",
                  "--out", str(out), *TINY, timeout=600)
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["prompts"]["depth"] == 9 and config["hyperparameters"]["loop"]["shots"] == 1


@pytest.mark.parametrize("args,match", [
    (["--defense", "magic"], "unknown defense 'magic'"),
    (["--model", "nope-model"], "unknown model 'nope-model'"),
    (["--data", "imagefolder:/no/such/dir"], "does not exist"),
    (["--data", "shapes:shapes-heldout"], "held out"),
    (["--set", "nonsense=1"], "unknown option"),
    (["--precision", "fp8"], "precision"),
    (["--resume", "/no/such/run"], "nothing to resume"),
    (["--defense", "tecoa", "--part", "decoder"], "unknown option(s) part"),
    (["--defense", "fgsm-decoder", "--model", "shapes-clip"], "applies to captioner models"),
    (["--defense", "prsl", "--model", "shapes-captioner", "--set", "gamma=2"], "gamma must lie in [0, 1]"),
])
def test_bad_input_is_one_clear_sentence(tmp_path, args, match, capsys):
    """In-process (``python -m vlm_inspect.train`` exits with what ``main`` returns; the subprocess path is
    covered by the runs above): exit status 2, one sentence, nothing written."""
    from vlm_inspect.train import cli as train_cli

    out = tmp_path / "never"
    try:
        code = train_cli.main(["--steps", "1", "--out", str(out), *TINY, *args])
    except SystemExit as e:  # argparse refuses a choice itself
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert match in err and "Traceback" not in err
    assert not (out / "model.safetensors").exists()


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    from vlm_inspect.checkpoints import save_adapter

    folder = save_adapter(load("shapes-vqa", weights="random"), tmp_path / "vqa")
    r = run_train("--model", "shapes-clip", "--init", str(folder), "--steps", "1", "--out", str(tmp_path / "x"), *TINY)
    assert r.returncode == 2 and "applies to" not in r.stderr
    assert "vqa" in r.stderr or "does not match" in r.stderr


def test_help_lists_every_option_with_default():
    r = subprocess.run([sys.executable, "-m", "vlm_inspect.train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for opt in ("--defense", "--model", "--data", "--out", "--steps", "--lr", "--resume", "--shots", "--seed",
                "--precision", "--save-every", "torchrun"):
        assert opt in r.stdout
    assert "(default: base)" in r.stdout and "(default: 1000)" in r.stdout


def test_vqa_batches_carry_every_question_of_each_scene():
    from vlm_inspect.data.shapes import HELD_OUT_PAIRS, ShapesDataset
    from vlm_inspect.defenses import DEFENSES
    from vlm_inspect.defenses.common import make_config
    from vlm_inspect.models import load

    model = load("shapes-vqa", weights="random")
    data = ShapesDataset("shapes-scenes", split="train", length=16)
    task = DEFENSES.get("base")(model, make_config(DEFENSES.get("base").Config, {}), data)
    records = [data[i] for i in range(4)]
    batch = task.collate(records, step=3)
    assert batch["pixels"].shape[0] == 4 and len(batch["questions"]) == len(batch["image_index"]) > 8
    assert sorted(set(batch["image_index"])) == [0, 1, 2, 3]
    held = {f"{c} {s}" for c, s in HELD_OUT_PAIRS}
    assert not any(h in q for q in batch["questions"] for h in held)
    loss, parts = task.loss(batch)
    assert torch.isfinite(loss) and "answer_ce" in parts
    single = DEFENSES.get("base")(model, make_config(DEFENSES.get("base").Config, {"all_questions": "false"}), data)
    assert single.collate(records, 3)["questions"] == [r["question"] for r in records]


def test_per_parameter_learning_rates():
    from vlm_inspect.train.loop import TrainConfig, make_optimizer

    a, b = torch.nn.Parameter(torch.zeros(3, 3)), torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer(TrainConfig(lr=1e-3, weight_decay=0.1), [a, b], {id(a): 0.2})
    groups = sorted((round(g["lr"], 9), g["weight_decay"], len(g["params"])) for g in opt.param_groups)
    assert groups == [(2e-4, 0.1, 1), (1e-3, 0.0, 1)]


def test_prompt_defense_ships_prompts_only_and_resumes_exactly(tmp_path):
    """APD writes only the student's prompts (naming the base and its weights digest); the snapshots
    also hold the teacher, so a run resumed from an earlier snapshot ends where the straight run ends."""
    from vlm_inspect.models.prompted import PromptedClip

    common = ["--defense", "apd", "--model", "shapes-clip", "--steps", "4", "--save-every", "2", "--eval-every", "0",
              "--set", "attack_eps=4/255", *TINY]
    out = tmp_path / "apd"
    r = run_train(*common, "--out", str(out))
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["base"] == "shapes-clip" and config["prompts"]["n_vision"] == 2 and len(config["base_digest"]) == 16
    shipped = load_file(str(out / "model.safetensors"))
    assert shipped and all(k.startswith(("vision.", "text.")) for k in shipped), sorted(shipped)
    assert sum(t.numel() for t in shipped.values()) < 5000  # prompts, not a CLIP
    snap = load_file(str(out / "checkpoints" / "step-0000004" / "model.safetensors"))
    assert any(k.startswith("teacher.") for k in snap) and any(k.startswith("student.") for k in snap)

    model = load("shapes-clip", weights=str(out))
    assert isinstance(model, PromptedClip) and model.checkpoint["defense"] == "apd"
    assert all(torch.equal(shipped[k], v) for k, v in model.prompts.state_dict().items())

    # resume from the step-2 snapshot: same final prompts as the straight run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-0000004")
    (resumed / "checkpoints" / "LATEST").write_text("step-0000002\n")
    r = run_train("--resume", str(resumed), "--no-progress")
    assert r.returncode == 0, r.stderr
    again = load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(shipped[k], again[k]) for k in shipped)


def test_prompt_checkpoint_with_a_different_base_is_refused(tmp_path):
    from vlm_inspect.checkpoints import CheckpointError

    out = tmp_path / "capt"
    r = run_train("--defense", "capt", "--model", "shapes-clip", "--steps", "1", "--eval-every", "0", "--out", str(out),
                  *TINY)
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "base_digest": "0" * 16}))
    with pytest.raises(CheckpointError, match="trained on a different shapes-clip"):
        load("shapes-clip", weights=str(out))
    (out / "config.json").write_text(json.dumps({**config, "base": "no-such-model"}))
    with pytest.raises(CheckpointError, match="neither a preset nor a checkpoint folder"):
        load("shapes-clip", weights=str(out))
