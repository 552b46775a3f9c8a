"""LLaVA (transformers LlavaForConditionalGeneration) as a captioner and a VQA model, and the swap of its
vision tower, on a tiny random LLaVA saved as a transformers folder and loaded through ``models.load``."""
from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlm_inspect.attacks import ATTACKS, is_bounded
from vlm_inspect.checkpoints import CheckpointError
from vlm_inspect.models import PRESETS, list_presets, load
from vlm_inspect.models import llava as L
from vlm_inspect.models.base import model_guard, serves
from vlm_inspect.objectives import answer_nll, caption_nll

ROOT = Path(__file__).resolve().parents[1]
LLAVA_7B = "llava-hf/llava-1.5-7b-hf"
WORDS = ("user assistant : . , ? describe the image in one sentence answer question using a single word or phrase "
         "what color is how many shapes are there a an of on and red green blue yellow purple white black circle "
         "square triangle star cross small large left right middle one two three yes no").split()
# llava-hf/llava-1.5-7b-hf's chat_template.json, as its processor saves it
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
QUESTIONS = ["what color is the star?", "how many shapes?", "is there a large red circle on the left?"]


def tiny_tokenizer():
    """A word-level tokenizer with Llama's specials (BOS put first) and ``<image>`` as a special token."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<pad>", "<unk>", "<s>", "</s>", *WORDS]))}
    vocab["<image>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=["<image>"])
    return fast, vocab


def tiny_llava_config(vocab: dict[str, int], width: int = 32):
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": width, "intermediate_size": 2 * width,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 8, "image_size": 32,
                       "projection_dim": 16, "hidden_act": "quick_gelu"},
        text_config={"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                     "max_position_embeddings": 256, "bos_token_id": vocab["<s>"], "eos_token_id": vocab["</s>"],
                     "pad_token_id": vocab["<pad>"]},
        image_token_index=vocab["<image>"], pad_token_id=vocab["<pad>"], image_seq_length=16)


def tiny_llava_folder(folder: Path, template: str | None = "json") -> Path:
    """A tiny random LLaVA (CLIP 32 px / patch 8 / width 32 / 2 layers; Llama width 64 / 2 layers) saved as
    a hub folder is: safetensors, tokenizer, the processor's chat template and preprocessor config."""
    from transformers import LlavaForConditionalGeneration

    tok, vocab = tiny_tokenizer()
    torch.manual_seed(0)
    LlavaForConditionalGeneration(tiny_llava_config(vocab)).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    if template == "json":
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_HF_TEMPLATE}))
    elif template is not None:
        (folder / "chat_template.jinja").write_text(template)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "crop_size": {"height": 32, "width": 32}}))
    return folder


def tiny_open_clip_folder(folder: Path, width: int = 32, quick_gelu: bool = True, seed: int = 1) -> Path:
    """A tiny open_clip ViT CLIP as an open_clip folder (``open_clip_config.json`` + safetensors)."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"embed_dim": 16, "quick_gelu": quick_gelu,
           "vision_cfg": {"image_size": 32, "patch_size": 8, "width": width, "layers": 2, "head_width": 16,
                          "mlp_ratio": 2.0},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": {"mean": [0.45, 0.45, 0.45], "std": [0.25, 0.25, 0.25]}}))
    return folder


def tiny_hf_clip_folder(folder: Path) -> Path:
    """A tiny transformers CLIPModel ``save_pretrained`` folder (vision width 32, 2 layers, 32 px / patch 8)."""
    from transformers import CLIPConfig, CLIPModel

    from vlm_inspect.models.tokenizers import clip_bpe_standin

    cfg = CLIPConfig(text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                     projection_dim=16)
    torch.manual_seed(2)
    CLIPModel(cfg).save_pretrained(folder, safe_serialization=True)
    clip_bpe_standin(49408, 16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    return {"llava": str(tiny_llava_folder(root / "llava")),
            "oc": str(tiny_open_clip_folder(root / "oc")),
            "oc2": str(tiny_open_clip_folder(root / "oc2", seed=3)),
            "root": root}


@pytest.fixture(scope="module")
def llava(folders):
    return load(folders["llava"])


def pixels(b: int = 3) -> torch.Tensor:
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))


# ---- the adapter --------------------------------------------------------------------------------------

def test_a_llava_folder_loads_as_both_families_with_its_own_template(llava):
    assert type(llava).__name__ == "LlavaAdapter" and llava.family == "captioner"
    assert serves(llava, "captioner") and serves(llava, "vqa") and not serves(llava, "clip")
    assert llava.image_size == 32 and llava.n_image_tokens == 16  # (32 / 8)^2, class token dropped ("default")
    assert llava.pixel_mean.flatten().tolist() == pytest.approx([0.5, 0.4, 0.3])  # preprocessor_config.json
    assert llava.render(L.CAPTION_PROMPT) == "USER: <image>\nDescribe the image in one sentence. ASSISTANT:"
    assert llava.render(llava.question_prompt("how many?")) == \
        "USER: <image>\nhow many?\nAnswer the question using a single word or phrase. ASSISTANT:"
    ids = llava.prompt_ids(L.CAPTION_PROMPT)
    assert ids[0] == llava.tokenizer.bos_token_id and ids.count(llava.image_token_id) == 16
    first = ids.index(llava.image_token_id)
    assert ids[first:first + 16] == [llava.image_token_id] * 16  # one run, where the template put <image>


def test_the_template_comes_from_the_folder_and_falls_back_to_llava_15(tmp_path):
    own = load(str(tiny_llava_folder(tmp_path / "own", template="{{ '<s>SYS ' }}{% for m in messages %}"
                                     "{{ '<image> ' + m['content'][1]['text'] }}{% endfor %}{{ ' ANSWER:' }}")))
    assert own.render("what?") == "<s>SYS <image> what? ANSWER:"
    assert own.prompt_ids("what?").count(own.tokenizer.bos_token_id) == 1  # the template wrote BOS: not twice
    none = load(str(tiny_llava_folder(tmp_path / "none", template=None)))
    assert none.chat_template == L.LLAVA15_CHAT_TEMPLATE
    assert none.render("how many?") == "USER: <image>\nhow many? ASSISTANT:"


def test_generation_is_batched_with_left_padding_and_deterministic(llava):
    px = pixels()
    batched = llava.answer(px, QUESTIONS, max_new_tokens=4)  # three prompt lengths: left padding
    assert batched == [llava.answer(px[i:i + 1], q, max_new_tokens=4)[0] for i, q in enumerate(QUESTIONS)]
    assert batched == llava.answer(px, QUESTIONS, max_new_tokens=4)
    captions = llava.generate(px, max_new_tokens=5)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert captions == [llava.generate(px[i:i + 1], max_new_tokens=5)[0] for i in range(3)]
    assert llava.generate(px[:1], max_new_tokens=5, num_beams=2)[0] is not None


def _direct_nll(llava, px, prompts, targets) -> torch.Tensor:
    """Mean target NLL from transformers' own forward (input_ids + pixel_values) on the adapter's ids."""
    ids, attention, positions, target_ids, mask = llava.scoring_batch(prompts, targets)
    logits = llava.model(input_ids=ids, pixel_values=llava.normalize(px), attention_mask=attention).logits
    picked = logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))
    nll = F.cross_entropy(picked.float().transpose(1, 2), target_ids, reduction="none")
    return (nll * mask).sum(1) / mask.sum(1)


def test_nll_equals_transformers_own_forward(llava):
    px = pixels()
    captions = ["a red star", "two blue circles on the left", ""]
    answers = ["red", "two", "yes"]
    with torch.no_grad():
        cap = llava.caption_nll(px, captions)
        ans = llava.answer_nll(px, QUESTIONS, answers)
        assert cap.shape == ans.shape == (3,)
        assert torch.allclose(cap, _direct_nll(llava, px, [L.CAPTION_PROMPT] * 3, captions), atol=1e-5)
        assert torch.allclose(ans, _direct_nll(llava, px, [llava.question_prompt(q) for q in QUESTIONS], answers),
                              atol=1e-5)
        # right padding is exact: a batch scores each row as alone
        alone = torch.cat([llava.answer_nll(px[i:i + 1], q, a) for i, (q, a) in enumerate(zip(QUESTIONS, answers))])
        assert torch.allclose(ans, alone, atol=1e-5)
        # several questions about one image share its pass through the vision tower
        shared = llava.answer_nll(px[:2], QUESTIONS, answers, image_index=[0, 0, 1])
        apart = torch.cat([llava.answer_nll(px[:1].expand(2, -1, -1, -1), QUESTIONS[:2], answers[:2]),
                           llava.answer_nll(px[1:2], QUESTIONS[2], answers[2])])
        assert torch.allclose(shared, apart, atol=1e-5)
        emb = llava.image_embedding(px)
    assert emb.shape == (3, 64) and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_gradients_reach_the_pixels_and_leave_no_weight_grad(llava):
    px = pixels(2).requires_grad_(True)
    with model_guard(llava):
        (llava.caption_nll(px, "a red star").sum() + llava.answer_nll(px, QUESTIONS[:2], ["red", "two"]).sum()).backward()
    assert px.grad is not None and px.grad.abs().sum() > 0
    assert all(p.grad is None for p in llava.parameters())


def test_float16_weights_stay_float16_and_run_under_a_bfloat16_autocast(llava):
    """A hub LLaVA is float16: nothing casts its weights, and a CPU bf16 autocast (the service's ``auto`` on a
    CPU with native bf16) neither breaks it nor changes pixels' float32 gradients. (A GPU is not exercised.)"""
    import copy

    half = copy.deepcopy(llava)
    half.model.half()
    px = pixels(2).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16), model_guard(half):
        loss = half.caption_nll(px, "a red star") + half.answer_nll(px, QUESTIONS[:2], ["red", "two"])
        loss.sum().backward()
        assert len(half.generate(px.detach(), max_new_tokens=3)) == 2
    assert loss.dtype == torch.float32 and px.grad.dtype == torch.float32 and px.grad.abs().sum() > 0
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    with torch.no_grad():
        assert torch.allclose(half.caption_nll(px, "a red star"), llava.caption_nll(px, "a red star"), atol=0.05)


def test_a_checkpoint_of_llava_and_of_a_swapped_llava_reloads(folders, llava, tmp_path):
    """What ``fetch`` writes (our checkpoint layout: spec + safetensors + tokenizer files) loads back the same."""
    from vlm_inspect.checkpoints import save_adapter

    px = pixels(2)
    for name in (folders["llava"], f"{folders['llava']}|tower={folders['oc']}"):
        model = load(name)
        again = load(str(save_adapter(model, tmp_path / str(len(name)))))
        assert type(again).__name__ == "LlavaAdapter" and again.chat_template == model.chat_template
        assert again.pixel_mean.tolist() == model.pixel_mean.tolist()
        with torch.no_grad():
            assert torch.allclose(again.answer_nll(px, QUESTIONS[:2], ["red", "two"]),
                                  model.answer_nll(px, QUESTIONS[:2], ["red", "two"]), atol=1e-5)


@pytest.mark.parametrize("task", ["caption", "vqa"])
@pytest.mark.parametrize("attack", [a for a in ATTACKS.list() if is_bounded(a) and not ATTACKS.meta(a).get("gradient_free")])
def test_attacks_run_with_the_caption_and_answer_objectives(llava, attack, task):
    """The attack contract of tests/test_attacks.py on the LLaVA: budget, range, loss rises, no weight grad."""
    px = pixels(2)
    with torch.no_grad():
        if task == "caption":
            objective = caption_nll(llava, llava.generate(px, max_new_tokens=4))
        else:
            objective = answer_nll(llava, QUESTIONS[:2], llava.answer(px, QUESTIONS[:2], max_new_tokens=3))
    llava.zero_grad(set_to_none=True)
    res = ATTACKS.build(attack, eps=8 / 255, alpha=4 / 255, steps=3)(px, objective,
                                                                     generator=torch.Generator().manual_seed(1))
    assert (res.delta.abs().max() <= 8 / 255 + 1e-6) and res.adv.min() >= 0 and res.adv.max() <= 1
    with torch.no_grad():
        assert (objective(res.adv) > objective(px)).all()
    assert all(p.grad is None for p in llava.parameters()) and not llava.training


# ---- the vision-tower swap ----------------------------------------------------------------------------

@pytest.mark.parametrize("quick_gelu", [True, False])
def test_open_clip_vit_maps_onto_transformers_clip_exactly(tmp_path, quick_gelu):
    """Every hidden state of the converted tower equals the open_clip ViT's on the same normalised input."""
    oc = load(str(tiny_open_clip_folder(tmp_path / "oc", quick_gelu=quick_gelu)))
    visual = oc.model.visual
    hf = L.open_clip_vit_to_hf(visual)
    assert hf.config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    blocks: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: blocks.append(o)) for b in visual.transformer.resblocks]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first, pooled = visual._embeds(x), visual(x)
        out = hf(pixel_values=x, output_hidden_states=True)
    for h in hooks:
        h.remove()
    assert visual.transformer.batch_first
    assert torch.allclose(out.hidden_states[0], first, atol=1e-5)
    for i, b in enumerate(blocks):
        assert torch.allclose(out.hidden_states[i + 1], b, atol=1e-5), i
    assert torch.allclose(out.pooler_output @ visual.proj, pooled, atol=1e-5)


def test_tower_swap_from_an_open_clip_folder(folders, llava):
    name = f"{folders['llava']}|tower={folders['oc']}"
    swapped = load(name)
    assert swapped.name == name and swapped.spec["vision_tower"] == folders["oc"]
    assert swapped.pixel_mean.flatten().tolist() == pytest.approx([0.45] * 3)  # the tower's normalisation
    oc = load(folders["oc"])
    px = pixels(2)
    with torch.no_grad():  # LLaVA reads layer -2 of the new tower, class token dropped, through its projector
        hidden = []
        hook = oc.model.visual.transformer.resblocks[0].register_forward_hook(lambda m, i, o: hidden.append(o))
        oc.model.visual(oc.normalize(px))
        hook.remove()
        want = llava.model.model.multi_modal_projector(hidden[0][:, 1:])
        assert torch.allclose(swapped.image_features(px), want, atol=1e-5)
        assert not torch.allclose(swapped.image_features(px), llava.image_features(px))
        assert swapped.caption_nll(px, "a red star").shape == (2,)
    assert len(swapped.answer(px, QUESTIONS[:2], max_new_tokens=3)) == 2


def test_tower_swap_from_a_transformers_clip_folder(folders, llava, tmp_path):
    from transformers import CLIPModel

    folder = tiny_hf_clip_folder(tmp_path / "hfclip")
    swapped = load(f"{folders['llava']}|tower={folder}")
    clip = CLIPModel.from_pretrained(str(folder)).eval()
    px = pixels(2)
    with torch.no_grad():
        hidden = clip.vision_model(pixel_values=swapped.normalize(px), output_hidden_states=True).hidden_states[-2]
        want = llava.model.model.multi_modal_projector(hidden[:, 1:])
        assert torch.allclose(swapped.image_features(px), want, atol=1e-5)
    assert swapped.model.model.language_model is llava.model.model.language_model


def test_width_mismatch_and_missing_layer_are_one_sentence(folders):
    wide = tiny_open_clip_folder(folders["root"] / "wide", width=48)
    with pytest.raises(CheckpointError) as e:
        load(f"{folders['llava']}|tower={wide}")
    msg = str(e.value)
    assert msg == f"vision tower {wide}: it has width 48 but LLaVA's projector expects 32"
    config = load(folders["llava"]).model.config
    deep = type(config)(**{**config.to_dict(), "vision_feature_layer": 5})
    with pytest.raises(CheckpointError, match="it has 2 layers but LLaVA reads the output of its layer 5$"):
        L.check_tower(deep, config.vision_config, 32, "x")


def test_a_folder_of_another_class_is_one_sentence(folders, tmp_path):
    from conftest import embedded, tiny_hf_captioner_folder, tiny_hf_vqa_folder
    from vlm_inspect.checkpoints import save_adapter

    blip = tiny_hf_vqa_folder(tmp_path / "blip") or tmp_path / "blip"
    cap = tiny_hf_captioner_folder(tmp_path / "cap") or tmp_path / "cap"
    stem = save_adapter(embedded("shapes-clip"), tmp_path / "stem")  # a conv stem, not a patchify
    cases = [
        (f"{blip}|tower={folders['oc']}", None, "is a BlipForQuestionAnswering, not a LLaVA"),
        (f"{folders['llava']}|tower={blip}", None, "is a BlipForQuestionAnswering (vqa model); a vision tower "
                                                   "must be a CLIP ViT"),
        (f"{folders['llava']}|tower={folders['llava']}", None, "is a LlavaForConditionalGeneration"),
        (f"{folders['llava']}|tower={stem}", None, "its stem is not a plain patchify convolution"),
        (LLAVA_7B, str(blip), f"holds a blip-vqa model (BlipForQuestionAnswering), not a llava model like {LLAVA_7B}"),
        (LLAVA_7B, str(cap), "holds a vision-encoder-decoder model (VisionEncoderDecoderModel), not a llava model"),
    ]
    for name, weights, words in cases:
        with pytest.raises(CheckpointError) as e:
            load(name, weights=weights or "default")
        assert words in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
    with pytest.raises(ValueError, match="cannot itself carry"):
        load(f"{folders['llava']}|tower=a|tower=b")


def test_variants_share_one_language_model(folders):
    base = load(folders["llava"])
    one, two = load(f"{folders['llava']}|tower={folders['oc']}"), load(f"{folders['llava']}|tower={folders['oc2']}")
    assert load(folders["llava"]) is base  # loaded once, while anything holds it
    for m in (one, two):
        assert m.model.model.language_model is base.model.model.language_model
        assert m.model.lm_head is base.model.lm_head
        assert m.model.model.multi_modal_projector is base.model.model.multi_modal_projector
        assert m.model.model.vision_tower is not base.model.model.vision_tower
    assert one.model.model.vision_tower is not two.model.model.vision_tower
    ids = {id(p) for p in base.model.model.language_model.parameters()}
    assert ids <= {id(p) for p in one.parameters()} and ids <= {id(p) for p in two.parameters()}
    # a variant owns its tower only: the base's own tower is not among its parameters
    assert not {id(p) for p in base.model.model.vision_tower.parameters()} & {id(p) for p in one.parameters()}
    del base, one, two, m
    gc.collect()
    # weak: nothing of the tiny test folders stays in memory once nobody holds it (the module fixture does)
    assert all(a.name == folders["llava"] for a in L._SHARED.values())


def test_random_weights_build_from_the_architecture_and_the_preset_is_listed():
    from vlm_inspect.models.builders import BUILDERS, build_module, make_adapter, make_spec
    from vlm_inspect.models.tokenizers import tokenizer_from_ref

    _, vocab = tiny_tokenizer()
    arch = tiny_llava_config({**vocab, "<image>": 290, "<pad>": 291}).to_dict()  # above the stand-in's 259 bytes
    arch["text_config"]["vocab_size"] = 300  # the byte stand-in needs room for 256 bytes + specials
    spec = make_spec("tiny", "captioner", "llava", arch, BUILDERS.get("llava").tokenizer(arch))
    tok = tokenizer_from_ref(spec["tokenizer"], None)
    model = make_adapter("tiny", build_module(spec, tok), tok, spec)
    assert model.chat_template == L.LLAVA15_CHAT_TEMPLATE
    assert model.caption_nll(pixels(1), "a red star").shape == (1,) and len(model.generate(pixels(1), 3)) == 1
    with torch.device("meta"):  # the published architecture, counted without memory: LLaVA-1.5-7B's 7.06 B
        n = sum(p.numel() for p in L.build_llava(PRESETS[LLAVA_7B].architecture()).parameters())
    assert 7.0e9 < n < 7.1e9
    assert LLAVA_7B in list_presets(suite="pretrained", family="captioner")
    assert LLAVA_7B in list_presets(suite="pretrained", family="vqa")
    from vlm_inspect.service import InspectService

    service = InspectService(suite="pretrained", model_dirs=[])
    assert LLAVA_7B in service.models("captioner") and LLAVA_7B in service.models("vqa")
    assert LLAVA_7B not in service.defaults()["baseline"].values()  # a 7B model is chosen, never a default


# ---- the service, the policy, the commands ------------------------------------------------------------

def test_service_end_to_end_with_llava_in_both_boxes_and_a_tower_swap(folders):
    from vlm_inspect.policy import ModelPolicy
    from vlm_inspect.service import InputError, InspectRequest, InspectService

    service = InspectService(model_dirs=[], policy=ModelPolicy.local())
    plain, swapped = folders["llava"], f"{folders['llava']}|tower={folders['oc']}"
    assert service.family_model(plain, "captioner") is service.family_model(plain, "vqa")  # one copy
    with pytest.raises(InputError, match="is a captioner and vqa model; it cannot be used as the clip model"):
        service.family_model(plain, "clip")
    image = ROOT / "assets" / "shapes_plain_3.png"
    for target in ("caption", "vqa"):
        req = InspectRequest(baseline={"clip": None, "captioner": plain, "vqa": plain},
                             defended={"clip": None, "captioner": swapped, "vqa": swapped},
                             question="what color is the star?", target=target, eps_k=8, steps=2)
        ins = service.inspect(image, req)
        models = ins.report["models"]
        assert set(models) == {plain, f"{plain} (vqa)", swapped, f"{swapped} (vqa)"}
        family = "captioner" if target == "caption" else "vqa"
        for key, e in models.items():
            assert e["attacked"] == (e["family"] == family)  # the same LLaVA is attacked through one task
            text = "caption" if e["family"] == "captioner" else "answer"
            assert isinstance(e["clean"][text], str) and isinstance(e["adversarial"][text], str)
        assert set(ins.report["verdicts"]) == {"baseline", "defended"}
        assert len(ins.report["transfer"]["cells"]) == 4  # each side's image shown to both sides
    assert service.model(swapped).model.model.language_model is service.model(plain).model.model.language_model
    curve = service.curve(image, req, eps_k=[0, 4])
    assert len(curve["series"]["defended"]["values"]) == 2


def test_the_app_reloads_a_tower_swap_when_its_tower_is_retrained(folders, tmp_path):
    """The app keeps a loaded model until its weights change on disk; for a tower name that is either part."""
    from vlm_inspect.policy import ModelPolicy
    from vlm_inspect.service import InspectService

    service = InspectService(model_dirs=[], policy=ModelPolicy.local())
    tower = tiny_open_clip_folder(tmp_path / "tower")
    name = f"{folders['llava']}|tower={tower}"
    first = service.model(name)
    assert service.model(name) is first  # nothing changed: the same object
    weight = lambda m: next(m.model.model.vision_tower.parameters()).detach().clone()  # noqa: E731
    before = weight(first)
    tiny_open_clip_folder(tower, seed=7)  # the tower retrained in place
    second = service.model(name)
    assert second is not first and not torch.equal(weight(second), before)
    # the base LLaVA was not retrained: the new variant still shares its language model
    assert second.model.model.language_model is service.model(folders["llava"]).model.model.language_model


def test_a_served_app_admits_a_tower_swap_only_if_it_admits_both_parts(folders, tmp_path):
    from vlm_inspect.policy import ModelPolicy, ModelRefused

    catalog = lambda: {LLAVA_7B, "hf-hub:chs20/fare2-clip"}  # noqa: E731
    served = ModelPolicy.served()
    served.admit(f"{LLAVA_7B}|tower=hf-hub:chs20/fare2-clip", catalog)  # two catalog names
    for name in (f"{LLAVA_7B}|tower={folders['oc']}", f"{folders['llava']}|tower=hf-hub:chs20/fare2-clip",
                 f"{LLAVA_7B}|tower=hf-hub:someone/any-clip", f"{LLAVA_7B}|tower=", "|tower=x"):
        with pytest.raises(ModelRefused, match="is not offered by this server"):
            served.admit(name, catalog)
    allowed = ModelPolicy.served(model_paths=[folders["root"]])  # the LLaVA folder is counted on the meta device
    allowed.admit(f"{folders['llava']}|tower={folders['oc']}", lambda: set())


def test_vision_tower_options_of_inspect_and_evaluate(folders, tmp_path, capsys):
    from vlm_inspect import inspect as inspect_cli
    from vlm_inspect.evaluate import cli as evaluate_cli

    plain, oc = folders["llava"], folders["oc"]
    fields = {"baseline": {"clip": "shapes-clip", "captioner": plain, "vqa": plain},
              "defended": {"clip": None, "captioner": "shapes-captioner", "vqa": None}}
    out = inspect_cli.apply_vision_tower(fields, oc, {"vqa": None})
    assert out["defended"] == {"clip": None, "captioner": f"{plain}|tower={oc}", "vqa": None}
    with pytest.raises(ValueError, match="name a LLaVA"):
        inspect_cli.apply_vision_tower({"baseline": {"clip": "shapes-clip"}, "defended": {}}, oc, {})
    assert evaluate_cli.with_vision_tower(["shapes-captioner", plain], oc) == ["shapes-captioner", f"{plain}|tower={oc}"]
    code = inspect_cli.main([str(ROOT / "assets" / "shapes_plain_3.png"), "--out", str(tmp_path / "ins"),
                             "--baseline", f"clip=none,captioner={plain},vqa=none", "--defended", "clip=none,vqa=none",
                             "--vision-tower", oc, "--target", "caption", "--steps", "1"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "ins" / "report.json").read_text())
    assert set(report["models"]) == {plain, f"{plain}|tower={oc}"}
    code = evaluate_cli.main(["--models", plain, "--vision-tower", oc, "--data", "shapes:shapes-scenes",
                              "--samples", "2", "--attack", "none", "--out", str(tmp_path / "ev" / "table.md")])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "ev" / "table.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert {r["metric"] for r in rows} >= {"bleu4", "exact_match"}  # scored as a captioner and as a VQA model
    assert {r["model"] for r in rows} == {f"{plain}|tower={oc}"}


def test_decoder_only_fgsm_training_of_a_llava_moves_the_language_side_and_loads_back(folders, tmp_path):
    """`train --defense fgsm-decoder --model <llava folder>`: a partial checkpoint on the folder in which the
    projector and language model moved and the vision tower did not; it loads back as a LLaVA that still
    serves both families and generates."""
    from vlm_inspect.train.loop import TrainConfig, train

    out = tmp_path / "llava+fgsm-decoder"
    train(TrainConfig(defense="fgsm-decoder", model=folders["llava"], init="default", data="shapes:shapes-scenes",
                      steps=2, batch_size=2, eval_every=0, eval_samples=4, workers=0, out=str(out)), progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["partial"] is True and config["base"] == folders["llava"] and config["model"]["builder"] == "llava"
    trained, base = load(str(out)), load(folders["llava"])
    assert isinstance(trained, L.LlavaAdapter) and serves(trained, "vqa") and serves(trained, "captioner")
    before, after = dict(base.model.named_parameters()), dict(trained.model.named_parameters())
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved and not any("vision_tower" in k for k in moved), sorted(moved)[:5]
    with torch.no_grad():
        assert len(trained.generate(pixels(2), max_new_tokens=3)) == 2
