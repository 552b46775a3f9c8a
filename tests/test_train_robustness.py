"""The training module when the disk or a snapshot lets it down: a full or read-only run folder is one
sentence (exit 2) with nothing half-written left, a corrupt newest snapshot resumes from the intact
one before it, and checkpoint files get the umask's mode. Tiny runs in-process through the CLI's main."""
from __future__ import annotations

import errno
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import vlm_inspect.checkpoints as C
import vlm_inspect.train.loop as L
import vlm_inspect.train.state as S
from vlm_inspect.train.cli import main

TINY = ["--model", "shapes-clip", "--batch-size", "4", "--eval-samples", "8", "--eval-every", "0", "--workers", "0",
        "--no-progress", "--log-every", "1"]


def errors(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


def hidden(out: Path) -> list[Path]:
    """Staging folders, temp files, probes: anything a failed write could leave behind."""
    return sorted(p for p in out.rglob(".*"))


# what a full disk looks like from Python, and from safetensors (its Rust writer's own exception)
ENOSPC = [OSError(errno.ENOSPC, "No space left on device"),
          SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")]


def enospc_when(real, fails, error):
    """``real`` (a safetensors writer), except that for a file ``fails(path)`` picks it writes part of it
    and then raises ``error``."""
    def write(obj, filename, *args, **kwargs):
        if fails(Path(filename)):
            Path(filename).write_bytes(b"\0" * 4096)
            raise error
        return real(obj, filename, *args, **kwargs)
    return write


@pytest.mark.parametrize("error", ENOSPC, ids=["OSError", "SafetensorError"])
@pytest.mark.parametrize("writer,target", [
    ("save_file", "optimizer.safetensors"),   # partway through a snapshot: its model is already written
    ("save_model", "model.safetensors"),      # the snapshot's first file
])
def test_full_disk_is_one_sentence_and_leaves_no_staging(tmp_path, monkeypatch, capsys, writer, target, error):
    # the atomic writes go to a temp file named after the final one: .model.safetensors.<random>.tmp
    monkeypatch.setattr(C, writer, enospc_when(getattr(C, writer), lambda p: target in p.name, error))
    out = tmp_path / "run"
    assert main([*TINY, "--steps", "2", "--save-every", "2", "--out", str(out)]) == 2
    assert errors(capsys.readouterr().err) == [f"error: cannot write the run folder {out}: No space left on device"]
    assert hidden(out) == []
    assert not (out / "checkpoints" / "step-0000002").exists() and not (out / "checkpoints" / "LATEST").exists()


def test_full_disk_at_the_shipped_checkpoint_leaves_no_temp_file(tmp_path, monkeypatch, capsys):
    """The snapshot went through; the run folder's own model.safetensors does not."""
    out = tmp_path / "run"
    monkeypatch.setattr(C, "save_model", enospc_when(C.save_model, lambda p: p.parent == out, ENOSPC[1]))
    assert main([*TINY, "--steps", "2", "--save-every", "2", "--out", str(out)]) == 2
    assert errors(capsys.readouterr().err) == [f"error: cannot write the run folder {out}: No space left on device"]
    assert hidden(out) == [] and not (out / "model.safetensors").exists()
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "step-0000002"


def test_a_real_write_failure_is_one_sentence(tmp_path):
    """No monkeypatch: the OS refuses the write (a file-size limit below the snapshot's size, EFBIG),
    through safetensors' own writer, in a real ``python -m vlm_inspect.train``."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "vlm_inspect.train", *TINY, "--steps", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, preexec_fn=limit,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr
    assert errors(r.stderr) == [f"error: cannot write the run folder {out}: File too large"]
    assert hidden(out) == [] and not list((out / "checkpoints").iterdir())


@pytest.mark.parametrize("resume", [False, True])
def test_read_only_folder_is_refused_before_training(tmp_path, monkeypatch, capsys, resume):
    out = tmp_path / "run"
    if resume:
        assert main([*TINY, "--steps", "2", "--save-every", "2", "--out", str(out)]) == 0
    else:
        out.mkdir()
    before = sorted(out.rglob("*"))
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == out:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded: the write probe must come first")

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(L, "load", no_load)
    argv = ["--resume", str(out), "--no-progress"] if resume else [*TINY, "--steps", "2", "--out", str(out)]
    assert main(argv) == 2
    assert errors(capsys.readouterr().err) == [f"error: cannot write the run folder {out}: Read-only file system"]
    assert sorted(out.rglob("*")) == before


def test_a_run_that_fails_early_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "a" / "run"
    assert main([*TINY, "--model", "nope-model", "--steps", "1", "--out", str(out)]) == 2
    assert len(errors(capsys.readouterr().err)) == 1
    assert not (tmp_path / "a").exists() and hidden(tmp_path) == []


def _two_snapshots(out: Path) -> dict[str, torch.Tensor]:
    """A 4-step run with snapshots at steps 2 and 4; returns its final shipped weights."""
    assert main([*TINY, "--steps", "4", "--save-every", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000002", "step-0000004"]
    return load_file(str(out / "model.safetensors"))


def _corrupt(snap: Path, how: str) -> None:
    if how == "trainer.json":
        (snap / "trainer.json").write_text('{"step": 4, "optim')
    else:  # truncate a safetensors file to half
        path = snap / how
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("how", ["model.safetensors", "rng.safetensors", "trainer.json"])
def test_corrupt_newest_snapshot_resumes_from_the_intact_one(tmp_path, caplog, capsys, how):
    out = tmp_path / "run"
    straight = _two_snapshots(out)
    _corrupt(out / "checkpoints" / "step-0000004", how)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vlm_inspect.train"):
        assert main(["--resume", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"checkpoints{os.sep}step-0000004 is unreadable (")
    assert how in warnings[0] and "\n" not in warnings[0]
    assert warnings[0].endswith(f"; resuming from the intact checkpoints{os.sep}step-0000002")
    assert any(r.getMessage() == f"resumed {out} at step 2" for r in caplog.records)
    # exactly the straight run's result: nothing of the corrupt snapshot stayed in the restored state
    again = load_file(str(out / "model.safetensors"))
    assert again.keys() == straight.keys() and all(torch.equal(straight[k], again[k]) for k in straight)
    assert json.loads((out / "config.json").read_text())["steps"] == 4
    assert json.loads((out / "checkpoints" / "step-0000004" / "trainer.json").read_text())["step"] == 4
    load_file(str(out / "checkpoints" / "step-0000004" / "model.safetensors"))


def test_no_intact_snapshot_is_one_sentence(tmp_path, capsys):
    out = tmp_path / "run"
    _two_snapshots(out)
    _corrupt(out / "checkpoints" / "step-0000004", "model.safetensors")
    _corrupt(out / "checkpoints" / "step-0000002", "trainer.json")
    capsys.readouterr()
    assert main(["--resume", str(out), "--no-progress"]) == 2
    [line] = errors(capsys.readouterr().err)
    assert line.startswith(f"error: cannot resume {out}: no snapshot restores cleanly (")
    assert f"checkpoints{os.sep}step-0000004: " in line and f"checkpoints{os.sep}step-0000002: " in line


def test_failed_half_restore_leaves_no_mixed_state(tmp_path):
    """The newest snapshot's weights go in before its optimiser state turns out not to fit; the fallback
    must still give exactly the earlier snapshot's weights, optimiser, scheduler and RNG."""
    cfg = L.TrainConfig(warmup_steps=2, steps=10)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = L.make_optimizer(cfg, list(module.parameters()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, L._lr_lambda(cfg))
    assert len(optimizer.param_groups) == 2

    def step():
        module(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    def state():
        return ({k: v.clone() for k, v in module.state_dict().items()},
                {(i, k): v.clone() for i, st in optimizer.state_dict()["state"].items() for k, v in st.items()},
                json.dumps(optimizer.state_dict()["param_groups"]), scheduler.state_dict(), torch.get_rng_state())

    def same(a, b):
        return (a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
                and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
                and a[2] == b[2] and a[3] == b[3] and torch.equal(a[4], b[4]))

    out = tmp_path / "run"
    step()
    S.save_snapshot(out, 1, module, optimizer, scheduler, {"config": {}})
    at_1 = state()
    for _ in range(3):
        step()
    newest = S.save_snapshot(out, 4, module, optimizer, scheduler, {"config": {}})
    meta = json.loads((newest / "trainer.json").read_text())
    meta["optimizer"]["param_groups"] = meta["optimizer"]["param_groups"][:1]
    (newest / "trainer.json").write_text(json.dumps(meta))
    at_4 = state()
    step()
    assert not same(state(), at_1)

    with pytest.raises(C.CheckpointError, match="does not fit"):  # the weights are in by then
        S.restore_snapshot(newest, module, optimizer, scheduler)
    assert torch.equal(module.state_dict()["0.weight"], at_4[0]["0.weight"])
    snap, meta = S.restore_intact(out, module, optimizer, scheduler)
    assert snap.name == "step-0000001" and meta["step"] == 1
    assert same(state(), at_1)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_checkpoint_files_respect_the_umask(tmp_path, shapes_clip, umask, mode):
    old = os.umask(umask)
    try:
        folder = C.save_adapter(shapes_clip, tmp_path / "ckpt")
        assert main([*TINY, "--steps", "1", "--out", str(tmp_path / "run")]) == 0
    finally:
        os.umask(old)
    snap = tmp_path / "run" / "checkpoints" / "step-0000001"
    for path in (folder / "model.safetensors", folder / "config.json", tmp_path / "run" / "model.safetensors",
                 tmp_path / "run" / "config.json", snap / "model.safetensors", snap / "optimizer.safetensors",
                 snap / "rng.safetensors", snap / "trainer.json", snap.parent / "LATEST"):
        assert oct(path.stat().st_mode & 0o777) == oct(mode), path


def test_atomic_write_failure_removes_its_temp_file(tmp_path):
    with pytest.raises(OSError):
        with C._atomic(tmp_path / "x.json") as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
