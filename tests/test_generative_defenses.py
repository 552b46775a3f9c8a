"""Captioning and VQA defenses (fgsm-decoder, prsl, ce): one step each on the embedded models and on
the ViT-GPT2 / BLIP-VQA-base architectures (random weights): finite loss with its named parts, only the
chosen part changes; PRSL's loss by hand; the FGSM budget conversion; partial checkpoints."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlm_inspect.attacks.base import normalised_eps, pixel_eps
from vlm_inspect.checkpoints import CheckpointError
from vlm_inspect.data.shapes import ShapesDataset
from vlm_inspect.defenses import DEFENSES
from vlm_inspect.defenses.common import make_config
from vlm_inspect.defenses.generative import vision_encoder
from vlm_inspect.defenses.prsl import recentralise_top_k
from vlm_inspect.models import load
from vlm_inspect.models.captioner import token_nll

PARTS = {"fgsm-decoder": {"eps_pixels_255", "ce_clean", "ce_adv"}, "prsl": {"prsl", "ce"}, "ce": {"ce"}}


def one_step(model, key: str, records, data=None, **options):
    """One SGD step of defense ``key``; returns the names of the parameters that changed."""
    task_cls = DEFENSES.get(key)
    task = task_cls(model, make_config(task_cls.Config, options), data)
    model.train()
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    loss, parts = task.loss(task.collate(records, 0))
    assert torch.isfinite(loss) and set(parts) == PARTS[key], parts
    loss.backward()
    torch.optim.SGD(task.trainable_parameters(), lr=1e-1).step()
    model.eval()
    return {n for n, p in model.model.named_parameters() if not torch.equal(before[n], p.detach())}


def vision_names(model) -> set[str]:
    ids = {id(p) for p in vision_encoder(model).parameters()}
    return {n for n, p in model.model.named_parameters() if id(p) in ids}


@pytest.fixture(scope="module")
def scenes():
    data = ShapesDataset("shapes-scenes", split="train", length=16)
    return data, [data[i] for i in range(4)]


@pytest.mark.parametrize("key,family,part", [
    ("fgsm-decoder", "captioner", "decoder"), ("fgsm-decoder", "captioner", "full"),
    ("fgsm-decoder", "captioner", "encoder"), ("prsl", "captioner", "decoder"), ("prsl", "vqa", "decoder"),
    ("prsl", "vqa", "full"), ("ce", "captioner", "decoder"), ("ce", "vqa", "decoder")])
def test_one_step_changes_only_the_chosen_part(scenes, key, family, part):
    data, records = scenes
    model = load(f"shapes-{family}")
    vision = vision_names(model)
    changed = one_step(model, key, records, data, part=part)
    assert changed
    if part == "decoder":  # every encoder weight bit-identical
        assert not changed & vision, sorted(changed & vision)[:3]
    elif part == "encoder":
        assert changed <= vision
    else:
        assert changed & vision and changed - vision


@pytest.fixture(scope="module")
def vit_gpt2():
    return load("nlpconnect/vit-gpt2-image-captioning", weights="random")


@pytest.fixture(scope="module")
def blip_vqa():
    return load("Salesforce/blip-vqa-base", weights="random")


def photos(size: int, n: int = 2):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("key", ["fgsm-decoder", "prsl", "ce"])
def test_one_step_on_vit_gpt2_architecture(vit_gpt2, key):
    records = [{"image": im, "caption": c} for im, c in zip(photos(224), ["a dog runs on grass", "two cats"])]
    changed = one_step(vit_gpt2, key, records)
    assert changed and not changed & vision_names(vit_gpt2)


@pytest.mark.parametrize("key", ["prsl", "ce"])
def test_one_step_on_blip_vqa_base_architecture(blip_vqa, key):
    records = [{"image": im, "question": q, "answer": a}
               for im, q, a in zip(photos(384), ["what animal is this?", "how many dogs?"], ["dog", "two"])]
    changed = one_step(blip_vqa, key, records)
    assert changed and not changed & vision_names(blip_vqa)


def test_prsl_is_cross_entropy_when_gamma_is_zero():
    logits = torch.randn(3, 5, 11)
    targets = torch.randint(0, 11, (3, 5))
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0
    assert torch.equal(recentralise_top_k(logits, 4, 0.0), logits)
    assert torch.allclose(token_nll(recentralise_top_k(logits, 4, 0.0), targets, mask), token_nll(logits, targets, mask))


def test_prsl_by_hand_for_k_2():
    # top-2 of [3, 1, 0, -1] is {3, 1}, mean 2; gamma 0.5 pulls them to 2 +- 0.5 -> [2.5, 1.5, 0, -1]
    z = torch.tensor([[[3.0, 1.0, 0.0, -1.0]]])
    out = recentralise_top_k(z, 2, 0.5)
    assert torch.allclose(out, torch.tensor([[[2.5, 1.5, 0.0, -1.0]]]))
    want = -(1.5 - math.log(math.exp(2.5) + math.exp(1.5) + math.exp(0.0) + math.exp(-1.0)))  # target index 1
    got = token_nll(out, torch.tensor([[1]]), torch.ones(1, 1))
    assert abs(float(got) - want) < 1e-5
    # the gradient reaches every recentralised logit (through the top-K mean) and the others through the softmax
    z = z.clone().requires_grad_(True)
    F.cross_entropy(recentralise_top_k(z, 2, 0.5)[0], torch.tensor([1])).backward()
    assert torch.all(z.grad != 0)


def test_fgsm_budget_conversion_round_trips():
    assert pixel_eps(0.1, (0.5, 0.5, 0.5)) == pytest.approx(12.75 / 255)
    for eps in (0.0, 0.1, 0.37):
        assert normalised_eps(pixel_eps(eps, (0.5, 0.5, 0.5)), (0.5, 0.5, 0.5)) == pytest.approx(eps)
    assert pixel_eps(1.0, (0.27, 0.26, 0.28)) == pytest.approx(0.26)  # the cube inside the normalised box
    with pytest.raises(ValueError, match="positive"):
        pixel_eps(0.1, (0.5, 0.0, 0.5))


def test_fgsm_training_images_stay_within_the_converted_budget(scenes):
    data, records = scenes
    model = load("shapes-captioner")
    task_cls = DEFENSES.get("fgsm-decoder")
    task = task_cls(model, make_config(task_cls.Config, {}), data)
    seen = []
    orig = model.caption_nll

    def spy(x, captions):
        seen.append(x.detach().clone())
        return orig(x, captions)

    model.caption_nll = spy
    batch = task.collate(records, 0)
    task.loss(batch)
    mixed = seen[-1]
    delta = (mixed - batch["pixels"]).abs().amax(dim=(1, 2, 3))
    assert torch.all(delta[:2] == 0)  # half clean ...
    assert torch.all(delta[2:] > 0) and torch.all(delta[2:] <= 12.75 / 255 + 1e-6)  # ... half FGSM at eps 0.1 x 0.5


@pytest.mark.parametrize("options,match", [({"part": "middle"}, "unknown part"), ({"k": "0"}, "k must be"),
                                           ({"gamma": "1.5"}, "gamma must")])
def test_bad_options_are_refused(scenes, options, match):
    data, _ = scenes
    cls = DEFENSES.get("prsl")
    with pytest.raises(ValueError, match=match):
        cls(load("shapes-captioner", weights="random"), make_config(cls.Config, options), data)


def test_partial_checkpoint_round_trip_and_refusals(tmp_path):
    """A decoder-only run ships the decoder only; it loads on its base and refuses another base."""
    from test_train import TINY, run_train

    out = tmp_path / "fgsm"
    r = run_train("--defense", "fgsm-decoder", "--model", "shapes-captioner", "--part", "decoder", "--steps", "2",
                  "--eval-every", "0", "--out", str(out), *TINY)
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["partial"] is True and config["base"] == "shapes-captioner" and config["part"] == "decoder"
    from safetensors.torch import load_file

    shipped = load_file(str(out / "model.safetensors"))
    assert shipped and all(k.startswith("decoder.") for k in shipped)
    model = load("shapes-captioner", weights=str(out))
    base = load("shapes-captioner")
    own = model.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in shipped.items())
    assert all(torch.equal(own[k], v) for k, v in base.model.state_dict().items() if k.startswith("encoder."))
    assert model.checkpoint["defense"] == "fgsm-decoder" and model.generate(model.preprocess(np.zeros((64, 64, 3), np.uint8)))

    (out / "config.json").write_text(json.dumps({**config, "base_digest": "0" * 16}))
    with pytest.raises(CheckpointError, match="trained on a different shapes-captioner"):
        load("shapes-captioner", weights=str(out))
    (out / "config.json").write_text(json.dumps({**config, "base": "shapes-vqa", "base_digest": None}))
    with pytest.raises(CheckpointError, match="cannot sit on shapes-vqa"):
        load("shapes-captioner", weights=str(out))


def test_real_scale_commands_on_hub_shaped_folders(tmp_path):
    """The real-scale command shape: fgsm-decoder on a ViT-GPT2 folder with Flickr8k files, PRSL on a BLIP
    VQA folder with VQA v2 files (tiny random models saved like hub downloads). The checkpoints hold the
    language side only, name the folder as their base, and load back through load()."""
    from PIL import Image

    from conftest import tiny_hf_captioner_folder, tiny_hf_vqa_folder
    from test_train import TINY, run_train

    tiny_hf_captioner_folder(tmp_path / "vit-gpt2")
    tiny_hf_vqa_folder(tmp_path / "blip")
    (tmp_path / "imgs").mkdir()
    for i in range(4):
        Image.new("RGB", (40, 30), (60 * i, 20, 200 - 40 * i)).save(tmp_path / "imgs" / f"{i}.jpg")
    (tmp_path / "tokens.txt").write_text("".join(f"{i}.jpg#0\ta dog number {i}\n{i}.jpg#1\ta photo {i}\n"
                                                 for i in range(4)))
    qs = [{"question_id": i, "image_id": i, "question": "what is it?"} for i in range(4)]
    ans = [{"question_id": i, "image_id": i, "multiple_choice_answer": "dog",
            "answers": [{"answer": "dog"}] * 10} for i in range(4)]
    (tmp_path / "q.json").write_text(json.dumps({"questions": qs}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": ans}))
    (tmp_path / "val2014").mkdir()
    for i in range(4):  # VQA v2 names its images COCO_<split>_<12-digit id>.jpg
        Image.new("RGB", (40, 30), (60 * i, 20, 90)).save(tmp_path / "val2014" / f"COCO_val2014_{i:012d}.jpg")

    runs = [("fgsm-decoder", "nlpconnect/vit-gpt2-image-captioning", "vit-gpt2",
             f"flickr8k:{tmp_path / 'imgs'},{tmp_path / 'tokens.txt'}"),
            ("prsl", "Salesforce/blip-vqa-base", "blip",
             f"vqav2:{tmp_path / 'val2014'},{tmp_path / 'q.json'},{tmp_path / 'a.json'}")]
    for key, model, folder, data in runs:
        out = tmp_path / f"{folder}+{key}"
        r = run_train("--defense", key, "--model", model, "--init", str(tmp_path / folder), "--data", data,
                      "--steps", "1", "--eval-every", "0", "--out", str(out), *TINY)
        assert r.returncode == 0, r.stderr
        config = json.loads((out / "config.json").read_text())
        assert config["partial"] and config["base"] == str(tmp_path / folder)
        loaded = load(model, weights=str(out))
        base = load(model, weights=str(tmp_path / folder))
        own, orig = loaded.model.state_dict(), base.model.state_dict()
        changed = {k for k in own if not torch.equal(own[k], orig[k])}
        assert changed and not changed & vision_names(loaded), sorted(changed)[:3]
