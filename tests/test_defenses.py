"""CLIP defenses: one step each, on the embedded CLIP and on the openai/ViT-B-32 architecture
(random weights): finite loss with its named parts, only the intended parameters change, the frozen
copy never changes, and hand-checked loss pieces."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlm_inspect.data.shapes import ShapesDataset
from vlm_inspect.defenses import DEFENSES
from vlm_inspect.defenses.common import make_config
from vlm_inspect.defenses.tga_zsr import map_distance
from vlm_inspect.models import load

PARTS = {"tecoa": {"ce_adv"}, "tga-zsr": {"ce_adv", "attention_refinement", "attention_constraint"}}


class Classes:
    """A two-class data set stub for models with a real (byte-level) tokenizer."""

    kind = "classification"
    prompts = ["a photo of a cat", "a photo of a dog"]


def one_step(model, key: str, data, records, **options):
    task_cls = DEFENSES.get(key)
    task = task_cls(model, make_config(task_cls.Config, options), data)
    model.train()
    params = task.trainable_parameters()
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    frozen_before = {n: p.detach().clone() for n, p in task.frozen.model.named_parameters()} \
        if hasattr(task, "frozen") else {}
    batch = task.collate(records, 0)
    loss, parts = task.loss(batch)
    assert torch.isfinite(loss) and set(parts) == PARTS[key], parts
    loss.backward()
    torch.optim.SGD(params, lr=1e-2).step()
    changed = {n for n, p in model.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all(n.startswith("visual.") for n in changed), sorted(changed)[:5]
    assert "logit_scale" not in changed
    if frozen_before:
        assert all(torch.equal(frozen_before[n], p) for n, p in task.frozen.model.named_parameters())
    return task, parts


@pytest.mark.parametrize("key", sorted(PARTS))
def test_one_step_on_the_embedded_clip(key):
    model = load("shapes-clip", weights="random")
    data = ShapesDataset("shapes-combo", split="train", length=64)
    one_step(model, key, data, [data[i] for i in range(4)], attack_eps=4 / 255, attack_step=2 / 255)


@pytest.mark.parametrize("key", sorted(PARTS))
def test_one_step_on_vit_b32_architecture(key):
    model = load("openai/ViT-B-32", weights="random")
    rng = np.random.default_rng(0)
    records = [{"image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), "label": i % 2} for i in range(2)]
    one_step(model, key, Classes(), records)


def test_tga_zsr_constraint_is_zero_before_the_first_update():
    model = load("shapes-clip", weights="random")
    data = ShapesDataset("shapes-combo", split="train", length=64)
    task_cls = DEFENSES.get("tga-zsr")
    task = task_cls(model, make_config(task_cls.Config, {}), data)
    _, parts = task.loss(task.collate([data[i] for i in range(4)], 0))
    assert parts["attention_constraint"] == 0.0
    assert parts["attention_refinement"] > 0.0  # the adversarial map already differs


def test_map_distances_by_hand():
    a = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    b = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    assert map_distance(a, b, "l2").item() == pytest.approx(math.sqrt(2))
    assert map_distance(a, b, "l1").item() == pytest.approx(2.0)
    assert map_distance(a, b, "cos").item() == pytest.approx(1.0)
    assert map_distance(a, a, "l2").item() == 0.0
    with pytest.raises(ValueError, match="unknown distance"):
        map_distance(a, b, "kl")


def test_tecoa_loss_is_the_ce_of_adversarial_logits_by_hand():
    """With eps = 0 the adversarial image is the clean one: the loss is plain zero-shot CE."""
    model = load("shapes-clip", weights="random")
    data = ShapesDataset("shapes-combo", split="train", length=64)
    task_cls = DEFENSES.get("tecoa")
    task = task_cls(model, make_config(task_cls.Config, {"attack_eps": 0.0}), data)
    batch = task.collate([data[i] for i in range(3)], 0)
    loss, _ = task.loss(batch)
    with torch.no_grad():
        logits = model.zero_shot_logits(batch["pixels"], data.prompts)
        expected = -logits.log_softmax(-1)[torch.arange(3), batch["labels"]].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_clip_defenses_need_classification_data():
    model = load("shapes-clip", weights="random")
    with pytest.raises(ValueError, match="trains zero-shot classification"):
        DEFENSES.get("tecoa")(model, make_config(DEFENSES.get("tecoa").Config, {}),
                              ShapesDataset("shapes-scenes", split="train", length=8))
    with pytest.raises(ValueError, match="unknown distance"):
        DEFENSES.get("tga-zsr")(model, make_config(DEFENSES.get("tga-zsr").Config, {"distance": "kl"}),
                                ShapesDataset("shapes-combo", split="train", length=8))
