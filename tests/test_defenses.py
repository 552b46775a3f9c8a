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

PARTS = {"tecoa": {"ce_adv"}, "fare": {"embedding_l2_adv"}, "tga-zsr": {"ce_adv", "attention_refinement", "attention_constraint"}}


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



def clip_task(key: str, **options):
    """A CLIP defense on the random-weight shapes-clip, its model, data and a batch of three images."""
    model = load("shapes-clip", weights="random")
    data = ShapesDataset("shapes-combo", split="train", length=64)
    task_cls = DEFENSES.get(key)
    task = task_cls(model, make_config(task_cls.Config, options), data)
    return task, model, data, task.collate([data[i] for i in range(3)], 0)

def test_tecoa_loss_is_the_ce_of_adversarial_logits_by_hand():
    """With eps = 0 the adversarial image is the clean one: the loss is plain zero-shot CE."""
    task, model, data, batch = clip_task("tecoa", attack_eps=0.0)
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


# ---- prompt tuning: APD and CAPT -----------------------------------------------------------------

PROMPT_PARTS = {
    ("apd", "online"): {"kl_student", "ce_teacher_clean", "kl_teacher", "acc_student_adv"},
    ("apd", "offline"): {"kl_student", "ce_teacher_clean", "acc_student_adv"},
    ("capt", True): {"ce_adv", "consistency_train", "consistency_frozen", "alpha"},
    ("capt", False): {"ce_adv", "consistency_train"},
    ("advpt", True): {"ce_adv", "acc_adv"},
}


def prompt_step(model, key: str, data, records, **options):
    """One step of a prompt-tuning defense: only prompts move, never a weight of the CLIP."""
    task_cls = DEFENSES.get(key)
    task = task_cls(model, make_config(task_cls.Config, options), data)
    task.model.train()
    params = task.trainable_parameters()
    saved = task.modules_to_save()
    weights_before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    prompts_before = {n: p.detach().clone() for n, p in saved.named_parameters()}
    assert {id(p) for p in params} == {id(p) for p in saved.parameters() if p.requires_grad}
    loss, parts = task.loss(task.collate(records, 0))
    variant = options.get("distillation", "online") if key == "apd" else options.get("frozen_consistency", True)
    assert torch.isfinite(loss) and set(parts) == PROMPT_PARTS[(key, variant)], parts
    loss.backward()
    torch.optim.SGD(params, lr=1e-1).step()
    assert all(torch.equal(weights_before[n], p) for n, p in model.model.named_parameters())
    moved = {n for n, p in saved.named_parameters() if not torch.equal(prompts_before[n], p.detach())}
    return task, moved


@pytest.mark.parametrize("key,options", [("apd", {}), ("apd", {"distillation": "offline"}), ("capt", {}),
                                         ("capt", {"frozen_consistency": False}), ("advpt", {})])
def test_prompt_defenses_one_step_on_the_embedded_clip(key, options):
    model = load("shapes-clip", weights="random")
    data = ShapesDataset("shapes-combo", split="train", length=64)
    task, moved = prompt_step(model, key, data, [data[i] for i in range(4)], attack_eps=4 / 255,
                              attack_step=2 / 255, **options)
    if key == "apd":
        assert any(n.startswith("student.vision") for n in moved) and any(n.startswith("student.text") for n in moved)
        teacher_moved = any(n.startswith("teacher.") for n in moved)
        assert teacher_moved == (options.get("distillation", "online") == "online")
        assert task.checkpoint_module() is task.student.prompts
    else:
        assert any(n.startswith("vision") for n in moved) and any(n.startswith("text") for n in moved)


@pytest.mark.parametrize("modality,has_vision,has_text", [("vision", True, False), ("text", False, True)])
def test_apd_unimodal_prompts(modality, has_vision, has_text):
    model = load("shapes-clip", weights="random")
    data = ShapesDataset("shapes-combo", split="train", length=64)
    task, moved = prompt_step(model, "apd", data, [data[i] for i in range(4)], modality=modality)
    assert (len(task.student.prompts.vision) > 0) == has_vision and (len(task.student.prompts.text) > 0) == has_text
    assert moved


@pytest.mark.parametrize("key", ["apd", "capt", "advpt"])
def test_prompt_defenses_one_step_on_vit_b32_architecture(key):
    model = load("openai/ViT-B-32", weights="random")
    rng = np.random.default_rng(0)
    records = [{"image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), "label": i % 2} for i in range(2)]
    task, moved = prompt_step(model, key, Classes(), records)
    assert len(task.model.prompts.vision) == 9 and len(task.model.prompts.text) == 9  # the paper's depth fits
    assert moved


def test_kl_per_sample_by_hand():
    from vlm_inspect.defenses.adversarial import kl_per_sample

    p_logits = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    q_logits = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl = kl_per_sample(p_logits, q_logits)
    assert kl[0].item() == pytest.approx(expected, rel=1e-5) and kl[1].item() == pytest.approx(0.0, abs=1e-6)


def test_capt_loss_by_hand_with_eps_zero():
    """eps = 0: x' = x, both consistency terms vanish on the trained side... except the frozen one, which
    compares the frozen CLIP with the prompted one; the total is CE + λ·mean(α·KL(p_θ0(x) ‖ p_θ(x)))."""
    from vlm_inspect.defenses.adversarial import kl_per_sample

    task, model, data, batch = clip_task("capt", attack_eps=0.0, consistency_weight=0.5)
    loss, parts = task.loss(batch)
    with torch.no_grad():
        y = batch["labels"]
        prompted = task.model.zero_shot_logits(batch["pixels"], data.prompts)
        frozen = model.zero_shot_logits(batch["pixels"], data.prompts)
        alpha = frozen.softmax(-1)[torch.arange(3), y]
        ce = -prompted.log_softmax(-1)[torch.arange(3), y].mean()
        expected = ce + 0.5 * (alpha * kl_per_sample(frozen, prompted)).mean()
    assert parts["consistency_train"] == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_advpt_loss_is_the_prompted_models_ce_on_the_attacked_images_by_hand():
    """eps = 0: x' = x and the loss is the prompted CLIP's zero-shot CE; eps > 0: the CE of the images PGD
    made against the prompted model (same generator state), never of the unprompted one."""
    task, model, data, batch = clip_task("advpt", attack_eps=0.0)
    task_cls = DEFENSES.get("advpt")
    loss, parts = task.loss(batch)
    y, idx = batch["labels"], torch.arange(3)
    with torch.no_grad():
        prompted = task.model.zero_shot_logits(batch["pixels"], data.prompts)
        plain = model.zero_shot_logits(batch["pixels"], data.prompts)
    ce = lambda z: -z.log_softmax(-1)[idx, y].mean()  # noqa: E731
    assert loss.item() == pytest.approx(ce(prompted).item(), rel=1e-4)
    assert abs(ce(plain).item() - loss.item()) > 1e-3  # untrained prompts are not neutral: the prompted model's CE
    attacked = task_cls(model, make_config(task_cls.Config, {"attack_eps": 8 / 255, "attack_step": 4 / 255}), data)
    attacked.model.prompts.load_state_dict(task.model.prompts.state_dict())
    adv_loss, _ = attacked.loss(batch)
    assert adv_loss.item() > loss.item()  # PGD ascended the prompted model's CE


def test_apd_loss_by_hand_with_eps_zero():
    from vlm_inspect.defenses.adversarial import kl_per_sample

    task, model, data, batch = clip_task("apd", attack_eps=0.0, teacher_feedback=0.5, student_ce=0.25)
    loss, parts = task.loss(batch)
    with torch.no_grad():
        y, idx = batch["labels"], torch.arange(3)
        s = task.student.zero_shot_logits(batch["pixels"], data.prompts)
        t = task.teacher.zero_shot_logits(batch["pixels"], data.prompts)
        ce = lambda z: -z.log_softmax(-1)[idx, y].mean()  # noqa: E731
        expected = kl_per_sample(t, s).mean() + 0.25 * ce(s) + ce(t) + 0.5 * kl_per_sample(s, t).mean()
    assert set(parts) >= {"ce_student_adv"}
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_prompt_defense_options_are_checked_when_made():
    """Refused by the options themselves (no model needed: a manifest's plan finds them)."""
    for key, options, match in [("apd", {"distillation": "both"}, "unknown distillation"),
                                ("capt", {"modality": "audio"}, "unknown modality"),
                                ("apd", {"n_text": 6}, "fewer than n_text"),
                                ("advpt", {"n_text": "5"}, "fewer than n_text"),
                                ("advpt", {"depth": "0"}, "depth must be >= 1")]:
        with pytest.raises(ValueError, match=match):
            make_config(DEFENSES.get(key).Config, options)
    # visual prompts only: the text initialisation does not limit them
    assert make_config(DEFENSES.get("apd").Config, {"modality": "vision", "n_text": "8"}).n_text == 8


def test_options_from_the_command_line_are_parsed_or_refused():
    from vlm_inspect.defenses.capt import CAPTConfig

    c = make_config(CAPTConfig, {"attack_eps": "1.6/255", "attack_steps": "5", "frozen_consistency": "false"})
    assert c.attack_eps == pytest.approx(1.6 / 255) and c.attack_steps == 5 and c.frozen_consistency is False
    for bad, match in [({"attack_steps": "5.5"}, "expected a whole number"), ({"attack_eps": "x"}, "expected a float"),
                       ({"frozen_consistency": "maybe"}, "expected a bool"), ({"lamda": "1"}, "unknown option")]:
        with pytest.raises(ValueError, match=match):
            make_config(CAPTConfig, bad)


def _every_defense_and_family():
    return [(key, fam) for key in DEFENSES.list() for fam in DEFENSES.meta(key)["families"]]


@pytest.mark.parametrize("key,family", _every_defense_and_family())
def test_every_registered_defense_takes_a_step_on_each_of_its_families(key, family):
    """Any defense registered in DEFENSES, on a random-weight embedded model of each family it names:
    a finite loss, a gradient on the parameters it trains, and none on those it leaves frozen."""
    model = load({"clip": "shapes-clip", "captioner": "shapes-captioner", "vqa": "shapes-vqa"}[family],
                 weights="random")
    task_cls = DEFENSES.get(key)
    spec = "shapes-combo" if family == "clip" else "shapes-scenes"
    data = ShapesDataset(spec, split="train", length=8)
    task = task_cls(model, make_config(task_cls.Config, {}), data)
    model.train()
    loss, parts = task.loss(task.collate([data[i] for i in range(2)], 0))
    assert torch.isfinite(loss) and parts and all(math.isfinite(v) for v in parts.values()), parts
    loss.backward()
    trained = task.trainable_parameters()
    assert trained and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_fare_loss_is_the_embedding_distance_to_the_frozen_original_by_hand():
    """FARE: ||phi(x') - phi0(x)||^2 on unnormalised embeddings. Before any update (theta = theta0) it is 0
    on clean images (eps 0) and positive once PGD moves the image; after an update it equals the squared
    distance between the trained and the frozen encoder's embeddings, computed here by hand."""
    from vlm_inspect.defenses.fare import EmbeddingDistance, image_embedding_raw

    model = load("shapes-clip", weights="random")
    data = ShapesDataset("shapes-combo", split="train", length=64)
    task_cls = DEFENSES.get("fare")
    records = [data[i] for i in range(3)]
    clean = task_cls(model, make_config(task_cls.Config, {"attack_eps": 0.0}), data)
    batch = clean.collate(records, 0)
    assert set(batch) == {"pixels", "index"}  # no labels, no text
    loss, _ = clean.loss(batch)
    assert loss.item() == 0.0
    attacked, parts = one_step(load("shapes-clip", weights="random"), "fare", data, records)
    assert parts["embedding_l2_adv"] > 0
    with torch.no_grad():  # after the update: the trained encoder against the frozen one, by hand
        x = batch["pixels"]
        mine = attacked.model.projected_tokens(x)[:, 0]
        orig = attacked.frozen.projected_tokens(x)[:, 0]
        assert torch.allclose(image_embedding_raw(attacked.model, x), mine)
        assert EmbeddingDistance(attacked.model, orig)(x) == pytest.approx(((mine - orig) ** 2).sum(-1), rel=1e-5)
        assert ((mine - orig) ** 2).sum(-1).min() > 0


def test_fare_refuses_what_it_cannot_train(tmp_path):
    data = ShapesDataset("shapes-combo", split="train", length=8)
    cls = DEFENSES.get("fare")
    with pytest.raises(ValueError, match="clean_weight"):
        cls(load("shapes-clip", weights="random"), make_config(cls.Config, {"clean_weight": "2"}), data)
    from vlm_inspect.train.loop import TrainConfig, train

    with pytest.raises(ValueError, match="applies to clip models"):
        train(TrainConfig(defense="fare", model="shapes-captioner", init="random", steps=1, batch_size=2,
                          out=str(tmp_path / "run")), progress=False)
    assert not (tmp_path / "run").exists()  # nothing written
