"""The pretrained suite offline: full-size architectures with random weights written by
``python -m vlm_inspect.models.fetch --random`` into a weights folder and loaded through the real path
(``--weights-dir``), a defended checkpoint trained on one of them, a missing download, the runtime
choices (``--device``, ``--precision``) and the module swaps that make attacks faster."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm_inspect.models import load
from vlm_inspect.models import ModelUnavailableError
from vlm_inspect.models.presets import APP_PRETRAINED
from vlm_inspect.runtime import WEIGHTS_DIR_ENV
from vlm_inspect.service import InputError, InspectRequest, InspectService

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "assets" / "photo_chelsea.jpg"


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """The app's three pretrained models, full size, random weights, as `fetch --random` writes them."""
    out = tmp_path_factory.mktemp("weights")
    r = subprocess.run([sys.executable, "-m", "vlm_inspect.models.fetch", "--out", str(out), "--random"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    for name in APP_PRETRAINED:
        assert (out / name / "model.safetensors").is_file() and (out / name / "config.json").is_file()
    return out


@pytest.fixture()
def use_weights_dir(weights_dir, monkeypatch):
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(weights_dir))
    return weights_dir


@pytest.fixture(scope="module")
def pretrained_service():
    return InspectService(suite="pretrained", model_dirs=[], precision="fp32")


def _request(service: InspectService, **kw) -> InspectRequest:
    fields = service.suite_fields("pretrained", kw.pop("models", None))
    return InspectRequest(**{**fields, "steps": 1, **kw})


def test_pretrained_suite_runs_end_to_end_from_a_weights_dir(use_weights_dir, pretrained_service):
    """ViT-B-32 CLIP, ViT-GPT2 and BLIP-VQA-base load from the weights folder (no network) and every
    task of the page runs on them: attack, zero-shot, caption, answer, heatmaps, curve."""
    service = pretrained_service
    req = _request(service)
    assert req.baseline == dict(zip(("clip", "captioner", "vqa"), APP_PRETRAINED))
    ins = service.inspect(PHOTO, req)
    models = ins.report["models"]
    assert set(models) == set(APP_PRETRAINED)
    for name in APP_PRETRAINED:
        assert service.model(name).weights == str(use_weights_dir / name)
        assert "adversarial" in models[name]
    assert len(models["openai/ViT-B-32"]["adversarial"]["zero_shot"]["labels"]) == 5
    assert isinstance(models["nlpconnect/vit-gpt2-image-captioning"]["adversarial"]["caption"], str)
    assert isinstance(models["Salesforce/blip-vqa-base"]["adversarial"]["answer"], str)
    assert ins.images["heatmap/baseline/adversarial"].shape[-1] == 3
    assert ins.report["perturbation"]["linf"] <= 4 / 255 + 1e-6
    curve = service.curve(PHOTO, req, eps_k=[0, 4])
    assert len(curve["series"]["baseline"]["values"]) == 2


def test_defended_checkpoint_on_a_pretrained_architecture_loads_like_an_embedded_one(use_weights_dir, tmp_path,
                                                                                    pretrained_service):
    """`train --defense tecoa --model openai/ViT-B-32` (base from the weights folder) writes a partial
    checkpoint; the pretrained suite offers the run and inspects it as the defended CLIP."""
    from vlm_inspect.train.loop import TrainConfig, train

    out = train(TrainConfig(defense="tecoa", model="openai/ViT-B-32", steps=1, batch_size=2, eval_samples=2,
                            workers=0, out=str(tmp_path / "runs" / "vitb32-tecoa"), options={"attack_steps": 1}),
                progress=False)
    service = InspectService(suite="pretrained", model_dirs=[tmp_path / "runs"], precision="fp32")
    assert str(out) in service.models("clip", "pretrained")
    assert str(out) not in service.models("clip", "embedded")
    req = _request(service, models={"baseline": {"captioner": None, "vqa": None},
                                    "defended": {"clip": str(out)}}, question="")
    ins = service.inspect(PHOTO, req)
    defended = next(e for e in ins.report["models"].values() if e["role"] == "defended")
    assert defended["family"] == "clip" and "adversarial" in defended
    assert service.model(str(out)).checkpoint["partial"] is True


def test_missing_download_is_one_clear_sentence_and_the_service_keeps_working(tmp_path, monkeypatch):
    """No network, nothing cached, no weights folder: choosing a pretrained model says what is missing and
    how to fix it; an embedded request right after still works."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    service = InspectService(suite="pretrained", model_dirs=[], precision="fp32")
    req = _request(service, models={"baseline": {"captioner": None, "vqa": None}}, question="")
    with pytest.raises(InputError) as e:
        service.inspect(PHOTO, req)
    msg = str(e.value)
    assert "openai/ViT-B-32" in msg and "--weights-dir" in msg and "vlm_inspect.models.fetch" in msg
    assert "embedded suite" in msg and "Traceback" not in msg and "\n" not in msg
    fields = service.suite_fields("embedded")
    ok = service.inspect(ROOT / "assets" / "shapes_plain_3.png", InspectRequest(**fields, steps=1))
    assert ok.report["models"]

    # with a weights folder that lacks the model, the message names the exact place to put it
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    with pytest.raises(ModelUnavailableError, match=re.escape(str(tmp_path / "openai" / "ViT-B-32"))):
        load("openai/ViT-B-32")


def test_page_shows_the_missing_download_as_a_message(tmp_path, monkeypatch):
    import gradio as gr

    from vlm_inspect.ui import handlers as H

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    service = InspectService(suite="pretrained", model_dirs=[], precision="fp32")
    fn = H.guarded(lambda: service.inspect(PHOTO, _request(service)))
    with pytest.raises(gr.Error) as e:
        fn()
    assert "could not be downloaded" in str(e.value) and "embedded suite" in str(e.value)


def test_a_typed_model_of_another_family_is_refused(use_weights_dir, pretrained_service):
    req = _request(pretrained_service, models={"baseline": {"captioner": "openai/ViT-B-32", "vqa": None}},
                   question="")
    with pytest.raises(InputError, match="is a clip model; it cannot be used as the captioner"):
        pretrained_service.inspect(PHOTO, req)


def test_refresh_keeps_a_typed_model_name():
    from vlm_inspect.ui import handlers as H

    service = InspectService(model_dirs=[])
    current = ["hf-hub:org/robust-clip", "shapes-captioner", "shapes-vqa", "shapes-clip", H.NONE, H.NONE]
    ups = H.dropdown_updates(service, "embedded", current)
    assert ups[0]["value"] == "hf-hub:org/robust-clip"


# ---- runtime ------------------------------------------------------------------------------------

def test_device_and_precision_choices():
    from vlm_inspect.runtime import autocast, cpu_has_native_bf16, resolve_device, resolve_precision

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("CPU") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
            resolve_precision("fp16", "cpu")
        assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_native_bf16() else "fp32")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("fp8", "cpu")
    with autocast("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("argv", [
    [sys.executable, "-m", "vlm_inspect.inspect", str(PHOTO), "--out", "x", "--precision", "fp16"],
    [sys.executable, "-m", "vlm_inspect.evaluate", "--models", "shapes-clip", "--precision", "fp16"],
    [sys.executable, "-m", "vlm_inspect.train", "--model", "shapes-clip", "--precision", "fp16", "--steps", "1"],
])
def test_commands_refuse_fp16_on_the_cpu_with_a_message(argv, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "fp16 needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr


def test_every_command_takes_device_precision_and_weights_dir():
    for module in ("app.py", "-m vlm_inspect.inspect", "-m vlm_inspect.evaluate", "-m vlm_inspect.train"):
        r = subprocess.run([sys.executable, *module.split(), "--help"], capture_output=True, text=True,
                           timeout=120, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        for flag in ("--device", "--precision", "--weights-dir"):
            assert flag in r.stdout, (module, flag)


def test_bf16_inspection_agrees_with_fp32_on_the_embedded_suite():
    """bf16 autocast changes rounding, not answers: the same top-1 and caption on a clean sample."""
    sample = ROOT / "assets" / "shapes_plain_3.png"
    out = {}
    for prec in ("fp32", "bf16"):
        service = InspectService(model_dirs=[], precision=prec)
        ins = service.inspect(sample, InspectRequest(**service.suite_fields("embedded"), steps=2))
        assert ins.report["runtime"]["precision"] == prec
        out[prec] = ins.report["models"]
    for name, entry in out["fp32"].items():
        clean16 = out["bf16"][name]["clean"]
        if "zero_shot" in entry["clean"]:
            assert clean16["zero_shot"]["labels"][0] == entry["clean"]["zero_shot"]["labels"][0]
        for key in ("caption", "answer"):
            if key in entry["clean"]:
                assert clean16[key] == entry["clean"][key]


# ---- the faster modules -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["openai/ViT-B-32", "shapes-clip"])
def test_faster_modules_compute_what_open_clip_computes(name):
    """The patchify-as-matmul and contiguous self-attention swaps give open_clip's outputs, gradients
    to the pixels, and state-dict keys (so checkpoints and digests are unchanged)."""
    model = load(name, weights="random")
    model.requires_grad_(False)
    from vlm_inspect.models.clip import stock_copy

    ref, swapped = stock_copy(model)
    assert swapped >= (25 if name == "openai/ViT-B-32" else 8)
    assert list(model.model.state_dict()) == list(ref.model.state_dict())
    x = torch.rand(2, 3, model.image_size, model.image_size)
    texts = ["a photo of a cat", "a photo of a red circle"]
    grads = []
    for m in (model, ref):
        px = x.clone().requires_grad_(True)
        logits = m.zero_shot_logits(px, texts)
        grads.append((logits, torch.autograd.grad(logits[:, 0].sum(), px)[0]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-4)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6, rtol=1e-3)


@pytest.mark.parametrize("name", ["shapes-clip", "openai/ViT-B-32"])
def test_class_token_only_last_block_is_open_clips_encode_image(name):
    """encode_image computes the last block for the class token alone: same features and the same
    gradient to the pixels as open_clip's full encode_image."""
    import torch.nn.functional as F

    from vlm_inspect.models.clip import class_token_only_last_block

    model = load(name, weights="random")
    assert class_token_only_last_block(model.model.visual)
    x = torch.rand(3, 3, model.image_size, model.image_size)
    w = torch.randn(3, model.model.visual.output_dim)
    outs = []
    for fn in (model.encode_image, lambda p: F.normalize(model.model.encode_image(model.normalize(p)), dim=-1)):
        px = x.clone().requires_grad_(True)
        feats = fn(px)
        outs.append((feats, torch.autograd.grad((feats * w).sum(), px)[0]))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-6)
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-7, rtol=1e-4)


ROBUST_HUB = ("hf-hub:chs20/fare2-clip", "hf-hub:chs20/fare4-clip", "hf-hub:chs20/tecoa2-clip", "hf-hub:chs20/tecoa4-clip")


def test_published_robust_clips_are_in_the_pretrained_clip_list_and_offline_is_one_sentence(tmp_path, monkeypatch):
    """The pretrained suite's CLIP boxes list FARE and TeCoA (2/255, 4/255) next to the OpenAI CLIPs; a served
    app admits them as catalog names; offline, choosing one says what is missing and how to fix it, and the
    service keeps working. Their architecture is known, so a random-weight copy builds without the network."""
    from vlm_inspect.models.presets import PRESETS

    service = InspectService(suite="pretrained", model_dirs=[], precision="fp32")
    offered = service.models("clip", "pretrained")
    assert all(name in offered for name in ROBUST_HUB) and "openai/ViT-B-32" in offered
    assert not any(name in service.models("clip", "embedded") for name in ROBUST_HUB)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    with pytest.raises(InputError) as e:
        service.model("hf-hub:chs20/fare4-clip")  # admitted by the served policy: it is in the list
    msg = str(e.value)
    assert "hf-hub:chs20/fare4-clip" in msg and "vlm_inspect.models.fetch" in msg and "\n" not in msg
    # the architecture a preset names is the published one's: ViT-L/14 at 224 px with QuickGELU
    assert PRESETS["hf-hub:chs20/fare2-clip"].architecture() == {"open_clip_name": "ViT-L-14-quickgelu"}
    import open_clip

    with torch.device("meta"):
        n = sum(p.numel() for p in open_clip.create_model("ViT-L-14-quickgelu", pretrained=None, device="meta").parameters())
    assert 400e6 < n < 450e6  # ViT-L/14 CLIP, vision and text
