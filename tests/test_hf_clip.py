"""transformers ``CLIPModel`` as a ``clip``-family model: a ``save_pretrained`` folder (what a hub download
of openai/clip-vit-base-patch32 is) loads through the real path and works wherever an open_clip CLIP
does: zero-shot (checked against transformers' own forward), text-guided attention (checked against a
recomputation from the last hidden state), every attack, both heatmaps, the service, a defense run, the
pretrained preset offline; a folder without tokenizer files is one sentence. Small random CLIPs, except
one test at the full ViT-B/32 shape."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from test_attacks import EPS, PROMPTS, build, threat_models
from vlm_inspect.attacks import ATTACKS, is_bounded
from vlm_inspect.checkpoints import CheckpointError
from vlm_inspect.defenses import DEFENSES
from vlm_inspect.models import load
from vlm_inspect.models.base import OPENAI_MEAN, OPENAI_STD
from vlm_inspect.models.hf_clip import HFClipAdapter
from vlm_inspect.models.tokenizers import clip_bpe_standin
from vlm_inspect.objectives import zero_shot_ce

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a photo of a cat", "a photo of a red star", "a drawing of a blue circle on the left"]


def tiny_config(**text):
    from transformers import CLIPConfig

    return CLIPConfig(
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "patch_size": 16, "image_size": 64},
        # CLIP's vocabulary size (the stand-in's <|startoftext|> / <|endoftext|> are 49406 / 49407); a
        # 32-token context, so the adapter must take it from the config
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 32, **text},
        projection_dim=32)


def save_folder(folder: Path, config, tokenizer: bool = True) -> Path:
    """A transformers ``save_pretrained`` folder of a random ``CLIPModel`` (safetensors) and its tokenizer."""
    from transformers import CLIPModel

    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        clip_bpe_standin(model_max_length=config.text_config.max_position_embeddings).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_folder(tmp_path_factory.mktemp("hf") / "tiny-clip", tiny_config())


@pytest.fixture(scope="module")
def clip(folder) -> HFClipAdapter:
    return load(str(folder))


def reference(folder: Path):
    """transformers' own CLIPModel from the folder, untouched by the adapter (no module swaps)."""
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True).eval()


def openai_normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)


def test_folder_loads_as_a_clip_with_the_configs_shapes(clip, folder):
    assert isinstance(clip, HFClipAdapter) and clip.family == "clip" and clip.weights == str(folder)
    assert clip.image_size == 64 and clip.grid == 4 and clip.context_length == 32
    assert clip.spec["builder"] == "hf-clip" and clip.spec["tokenizer"] == {"kind": "files"}
    assert clip.pixel_mean.flatten().tolist() == pytest.approx(OPENAI_MEAN)
    ids = clip.tokenize(TEXTS)
    assert ids.shape == (3, 32) and (ids[:, 0] == 49406).all() and (ids == 49407).any(dim=1).all()
    # the faster patchify keeps transformers' state-dict keys (checkpoints and digests unchanged)
    assert list(clip.model.state_dict()) == list(reference(folder).state_dict())


def test_zero_shot_logits_are_transformers_logits_per_image(clip, folder):
    ref = reference(folder)
    x = torch.rand(2, 3, 64, 64)
    ids = clip.tokenize(TEXTS)
    with torch.no_grad():
        theirs = ref(input_ids=ids, pixel_values=openai_normalise(x)).logits_per_image
        ours = clip.zero_shot_logits(x, TEXTS)
        assert torch.allclose(ours, theirs, atol=1e-4)
        # the scale is capped at 100 as CLIP does (transformers' forward does not cap it)
        scale = clip.model.logit_scale.detach().clone()
        for m in (clip.model, ref):
            m.logit_scale.fill_(math.log(200.0))
        try:
            theirs = ref(input_ids=ids, pixel_values=openai_normalise(x)).logits_per_image
            assert float(clip.logit_scale) == pytest.approx(100.0)
            assert torch.allclose(clip.zero_shot_logits(x, TEXTS), theirs / 2, atol=1e-4)
        finally:
            clip.model.logit_scale.copy_(scale)


def test_text_guided_attention_is_recomputed_from_the_last_hidden_state(clip, folder):
    """The map of the patch tokens through post_layernorm and visual_projection, cosine with the text
    feature, min-max over patches, bilinear to the input size (models/attention.py)."""
    from vlm_inspect.explain.heatmaps import HEATMAPS

    ref = reference(folder)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        vision = ref.vision_model
        tokens = ref.visual_projection(vision.post_layernorm(vision(pixel_values=openai_normalise(x)).last_hidden_state))
        text = F.normalize(ref.get_text_features(input_ids=clip.tokenize(TEXTS[:1])).pooler_output, dim=-1)
        scores = torch.einsum("bnd,d->bn", F.normalize(tokens[:, 1:], dim=-1), text[0])
        lo, hi = scores.amin(1, keepdim=True), scores.amax(1, keepdim=True)
        want = F.interpolate(((scores - lo) / (hi - lo)).reshape(2, 1, 4, 4), size=(64, 64), mode="bilinear",
                             align_corners=False)[:, 0]

        ours = clip.projected_tokens(x)
        assert ours.shape == (2, 1 + 16, 32) and torch.allclose(ours, tokens, atol=1e-5)
        # one pass gives the image feature too: the class token, normalised
        assert torch.allclose(F.normalize(ours[:, 0], dim=-1), clip.encode_image(x), atol=1e-5)
        features = clip.encode_text(TEXTS[:1])
        assert torch.allclose(features, text, atol=1e-5)
        attention = HEATMAPS.get("attention")
        assert torch.allclose(attention(clip, x, TEXTS[0], features), want, atol=1e-4)
        assert torch.allclose(attention(clip, x, TEXTS[0], features, tokens=ours), want, atol=1e-4)


@pytest.mark.parametrize("attack,norm", threat_models())
def test_every_attack_keeps_the_contract_on_a_transformers_clip(clip, attack, norm):
    """tests/test_attacks.py's contract, with zero-shot cross-entropy on the transformers CLIP."""
    pixels = torch.rand(2, 3, 64, 64)
    objective = zero_shot_ce(clip, PROMPTS, [0, 1])
    clip.zero_grad(set_to_none=True)
    atk = build(attack, norm)
    res = atk(pixels, objective, generator=torch.Generator().manual_seed(1))
    if is_bounded(attack):
        assert (res.size(norm) <= EPS[norm] + 1e-6).all()
    else:
        region = res.info["region"]
        assert region.any() and not region.all() and (res.delta.abs() * ~region).max() == 0
    assert res.adv.min() >= 0 and res.adv.max() <= 1 and torch.allclose(res.adv, pixels + res.delta, atol=1e-7)
    with torch.no_grad():
        clean, adv = objective(pixels), objective(res.adv)
    if ATTACKS.meta(attack).get("rises", True):
        assert (adv > clean).all(), (clean, adv)
    assert all(p.grad is None for p in clip.parameters()), "attack left gradients on weights"
    assert all(p.requires_grad for p in clip.model.parameters()) and not clip.training


def test_every_heatmap_runs(clip):
    from vlm_inspect.explain.heatmaps import HEATMAPS

    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = clip.encode_text(TEXTS[:1])
        tokens = clip.projected_tokens(x)
    for name in HEATMAPS.list():
        maps = HEATMAPS.get(name)(clip, x, TEXTS[0], features,
                                  tokens=tokens if HEATMAPS.meta(name).get("uses_tokens") else None)
        assert maps.shape == (2, 64, 64) and torch.isfinite(maps).all(), name
        assert maps.min() >= 0 and maps.max() <= 1 and maps.max() > maps.min(), name
    assert all(p.grad is None for p in clip.parameters())


def test_service_inspects_a_photo_with_the_folder_as_the_baseline_clip(folder):
    """A served app that allows the folder's parent: the policy counts the model on the meta device, then
    the page's whole inspection (attack, zero-shot, heatmaps) runs on it."""
    from vlm_inspect.models.loading import meta_param_count
    from vlm_inspect.policy import ModelPolicy
    from vlm_inspect.service import InspectRequest, InspectService

    assert meta_param_count(folder) == sum(p.numel() for p in reference(folder).parameters())
    service = InspectService(suite="embedded", model_dirs=[], precision="fp32",
                             policy=ModelPolicy.served(model_paths=[folder.parent]))
    fields = service.suite_fields("embedded", models={"baseline": {"clip": str(folder), "captioner": None, "vqa": None},
                                                      "defended": {"clip": None, "captioner": None, "vqa": None}},
                                  question="", label_set="everyday objects (12)")
    ins = service.inspect(ROOT / "assets" / "photo_chelsea.jpg", InspectRequest(**{**fields, "steps": 2}))
    entry = ins.report["models"][str(folder)]
    assert entry["family"] == "clip" and len(entry["adversarial"]["zero_shot"]["labels"]) == 5
    assert ins.report["perturbation"]["linf"] <= 4 / 255 + 1e-6
    assert ins.images["heatmap/baseline/adversarial"].shape[-1] == 3


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlm_inspect.train", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_tecoa_on_the_folder_writes_a_checkpoint_that_loads_back(folder, tmp_path):
    """`train --defense tecoa --model <folder>`: a partial checkpoint (the vision tower) on the folder."""
    out = tmp_path / "tiny-clip+tecoa"
    r = run_train("--defense", "tecoa", "--model", str(folder), "--data", "shapes:shapes-combo", "--steps", "2",
                  "--batch-size", "4", "--eval-samples", "4", "--workers", "0", "--no-progress", "--out", str(out),
                  "--set", "attack_steps=1")
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["partial"] is True and config["base"] == str(folder) and config["model"]["builder"] == "hf-clip"
    trained, base = load(str(out)), reference(folder)
    assert isinstance(trained, HFClipAdapter) and trained.checkpoint["steps"] == 2
    before, after = dict(base.named_parameters()), dict(trained.model.named_parameters())
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("vision_model."))
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("text_model."))
    with torch.no_grad():
        assert torch.isfinite(trained.zero_shot_logits(torch.rand(1, 3, 64, 64), TEXTS)).all()


@pytest.mark.parametrize("key", ["tecoa", "tga-zsr", "fare"])
def test_one_defense_step_moves_the_vision_tower_only(clip, key):
    """One step of each CLIP defense that trains weights: only the vision model and its projection move,
    a frozen copy never does, and TGA-ZSR's model constraint is 0 at the start (θ = θ0)."""
    from vlm_inspect.data.shapes import ShapesDataset
    from vlm_inspect.defenses.common import make_config

    model = copy.deepcopy(clip)
    data = ShapesDataset("shapes-combo", split="train", length=64)
    task_cls = DEFENSES.get(key)
    task = task_cls(model, make_config(task_cls.Config, {"attack_steps": 1}), data)
    model.train()
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    frozen = getattr(task, "frozen", None)
    loss, parts = task.loss(task.collate([data[i] for i in range(2)], 0))
    assert torch.isfinite(loss)
    if key == "tga-zsr":
        assert parts["attention_constraint"] == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    torch.optim.SGD(task.trainable_parameters(), lr=1e-2).step()
    changed = {n for n, p in model.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all(n.startswith(("vision_model.", "visual_projection.")) for n in changed), sorted(changed)
    if frozen is not None:  # TGA-ZSR's θ0, FARE's original encoder (TeCoA keeps none)
        assert all(torch.equal(before[n], p) for n, p in frozen.model.named_parameters())


@pytest.mark.parametrize("key", ["apd", "capt"])
def test_prompt_defenses_refuse_a_transformers_clip_in_one_sentence(clip, key):
    """Deep prompts sit between open_clip's residual blocks: on a transformers CLIP they are refused, clearly."""
    from vlm_inspect.data.shapes import ShapesDataset
    from vlm_inspect.defenses.common import make_config

    task_cls = DEFENSES.get(key)
    with pytest.raises(ValueError, match="need an open_clip CLIP ViT") as e:
        task_cls(copy.deepcopy(clip), make_config(task_cls.Config, {}), ShapesDataset("shapes-combo", split="train", length=8))
    assert "\n" not in str(e.value)


def test_a_folder_without_tokenizer_files_is_one_sentence_and_nothing_is_written(tmp_path):
    folder = save_folder(tmp_path / "no-tokenizer", tiny_config(), tokenizer=False)
    listing = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())
    with pytest.raises(CheckpointError) as e:
        load(str(folder))
    msg = str(e.value)
    assert "CLIPModel folder has no tokenizer files" in msg and "save_pretrained" in msg and "\n" not in msg
    from vlm_inspect.train.loop import TrainConfig, train

    out = tmp_path / "run"  # training refuses it before its run folder is made
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        train(TrainConfig(defense="tecoa", model=str(folder), steps=1, workers=0, out=str(out)), progress=False)
    assert not out.exists()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == listing


def test_a_folders_preprocessor_config_sets_the_normalisation(tmp_path):
    folder = save_folder(tmp_path / "half", tiny_config())
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    model = load(str(folder))
    assert model.pixel_mean.flatten().tolist() == [0.5] * 3 and model.pixel_std.flatten().tolist() == [0.25] * 3
    (folder / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="preprocessor_config.json is not a usable preprocessor config"):
        load(str(folder))


def test_the_preset_is_one_clear_sentence_offline(tmp_path, monkeypatch):
    from vlm_inspect.models import ModelUnavailableError
    from vlm_inspect.runtime import WEIGHTS_DIR_ENV

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    with pytest.raises(ModelUnavailableError) as e:
        load("openai/clip-vit-base-patch32")
    msg = str(e.value)
    assert "openai/clip-vit-base-patch32" in msg and "vlm_inspect.models.fetch" in msg and "\n" not in msg


@pytest.mark.slow
def test_openai_clip_vit_base_patch32_shape_from_a_save_pretrained_folder(tmp_path, monkeypatch):
    """The real ViT-B/32 shape (CLIPConfig's defaults), random weights: a save_pretrained folder with a
    tokenizer built in code loads through ``load(folder)`` and gives transformers' logits; `fetch --random`
    writes the preset's copy (the same architecture, its stand-in tokenizer as files) that loads offline."""
    from transformers import CLIPConfig

    from vlm_inspect.models.fetch import fetch
    from vlm_inspect.models.loading import meta_param_count
    from vlm_inspect.runtime import WEIGHTS_DIR_ENV

    config = CLIPConfig()
    v = config.vision_config
    assert (v.hidden_size, v.num_hidden_layers, v.patch_size, v.image_size, config.projection_dim) == (768, 12, 32, 224, 512)
    folder = save_folder(tmp_path / "clip-vit-base-patch32", config)
    clip = load(str(folder))
    assert clip.image_size == 224 and clip.grid == 7 and clip.context_length == 77
    assert meta_param_count(folder) == sum(p.numel() for p in clip.model.parameters())
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():  # transformers' own forward on the same weights
        theirs = clip.model(input_ids=clip.tokenize(TEXTS), pixel_values=openai_normalise(x)).logits_per_image
        assert torch.allclose(clip.zero_shot_logits(x, TEXTS), theirs, atol=1e-3)
        assert clip.projected_tokens(x).shape == (1, 50, 512)
    del clip

    (written,) = fetch(["openai/clip-vit-base-patch32"], tmp_path / "weights", random=True)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in written.iterdir()}
    arch = json.loads((written / "config.json").read_text())["model"]["architecture"]
    shape = ("hidden_size", "num_hidden_layers", "patch_size", "image_size", "intermediate_size")
    assert [arch["vision_config"][k] for k in shape] == [getattr(v, k) for k in shape]
    assert arch["projection_dim"] == 512
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path / "weights"))
    copy = load("openai/clip-vit-base-patch32")
    assert isinstance(copy, HFClipAdapter) and copy.weights == str(written)
    assert copy.spec["tokenizer"] == {"kind": "files"} and copy.tokenize("a cat")[0, 0] == 49406


def test_a_transformers_hub_id_offline_is_one_sentence_and_a_served_app_refuses_it(tmp_path, monkeypatch):
    """`<org>/<repo>` that is no preset and no folder is a transformers hub id for the local commands (a robust
    CLIPModel such as a LEAF-CLIP one); offline that is the usual sentence. A served app admits no such name."""
    from vlm_inspect.models import ModelUnavailableError
    from vlm_inspect.service import InputError, InspectService

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no folder of that name here
    with pytest.raises(ModelUnavailableError) as e:
        load("some-org/robust-clip-vit-b32")
    assert "some-org/robust-clip-vit-b32" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError, match="not offered by this server"):
        InspectService(model_dirs=[]).model("some-org/robust-clip-vit-b32")


def test_inspect_and_evaluate_take_the_folder(folder, tmp_path, capsys):
    """The two local commands, in process: `inspect` attacks the folder as the baseline CLIP (APGD) and writes
    its report; `evaluate` scores it under PGD and writes the table and its RobustBench-style record."""
    from vlm_inspect import inspect as inspect_cli
    from vlm_inspect.evaluate import cli as evaluate_cli

    root = Path(__file__).resolve().parents[1]
    code = inspect_cli.main([str(root / "assets" / "shapes_plain_3.png"), "--out", str(tmp_path / "ins"),
                             "--baseline", f"clip={folder},captioner=none,vqa=none", "--defended", "clip=none",
                             "--attack", "apgd", "--eps", "2/255", "--steps", "3"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "ins" / "report.json").read_text())
    entry = report["models"][str(folder)]
    assert entry["role"] == "baseline" and entry["attacked"] and len(entry["adversarial"]["zero_shot"]["probs"]) == 5
    code = evaluate_cli.main(["--models", str(folder), "--data", "shapes:shapes-combo", "--attack", "pgd",
                              "--eps", "1/255", "--steps", "3", "--samples", "4", "--out", str(tmp_path / "ev" / "t.md")])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "ev" / "t.json").read_text())
    rows = doc["rows"] if isinstance(doc, dict) else doc
    assert {r["model"] for r in rows} == {str(folder)} and {r["attack"] for r in rows} >= {"pgd"}
