"""Deep prompts: with zero prompt tokens the prompted CLIP is exactly the plain one (embedded and
ViT-B-32 architectures); with prompts, outputs move, shapes stay and gradients reach only the prompts."""
from __future__ import annotations

import pytest
import torch

from conftest import embedded
from vlm_inspect.models.prompted import DeepPrompts, PromptedClip
from vlm_inspect.explain import text_guided_attention

TEXTS = ["a photo of a red circle", "a photo of a blue star"]


@pytest.fixture(scope="module", params=["shapes-clip", "openai/ViT-B-32"])
def clip(request):
    if request.param == "shapes-clip":
        return embedded("shapes-clip")
    from vlm_inspect.models import load

    return load("openai/ViT-B-32", weights="random")


def test_zero_prompt_tokens_reproduce_the_plain_model_exactly(clip):
    prompted = PromptedClip(clip, DeepPrompts(clip, n_vision=0, n_text=0, depth=9))
    assert len(list(prompted.prompts.parameters())) == 0
    x = torch.rand(2, 3, clip.image_size, clip.image_size)
    with torch.no_grad():
        # the plain encode_image runs its last block for the class token alone (ClipAdapter.encode_image):
        # the same function with matrices of another shape, so equal to rounding, not bit for bit
        assert torch.allclose(prompted.encode_image(x), clip.encode_image(x), atol=1e-6, rtol=0)
        assert torch.equal(prompted.encode_text(TEXTS), clip.encode_text(TEXTS))
        assert torch.equal(prompted.projected_tokens(x), clip.projected_tokens(x))


def test_prompts_change_outputs_keep_shapes_and_get_the_gradient(clip):
    prompts = DeepPrompts(clip, n_vision=2, n_text=2, depth=3)
    assert len(prompts.vision) == 3 and len(prompts.text) == 3
    with torch.no_grad():  # the first text prompt starts as the embeddings of "a photo"
        ids = clip.tokenize(["a photo of a"])[0, 1:3]
        assert torch.equal(prompts.text[0], clip.model.token_embedding(ids))
    prompted = PromptedClip(clip, prompts)
    for p in clip.model.parameters():
        p.requires_grad_(False)
    x = torch.rand(2, 3, clip.image_size, clip.image_size)
    image, text = prompted.encode_image(x), prompted.encode_text(TEXTS)
    assert image.shape == clip.encode_image(x).shape and text.shape == (2, image.shape[1])
    assert not torch.allclose(image, clip.encode_image(x))
    attention = text_guided_attention(prompted, x, TEXTS)  # TGA-ZSR's map works on a prompted model
    assert attention.shape == (2, clip.image_size, clip.image_size)
    (prompted.logits(image, text).sum() + attention.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompts.parameters())
    assert all(p.grad is None for p in clip.model.parameters())
    for p in clip.model.parameters():
        p.requires_grad_(True)


def test_grad_cam_works_on_a_prompted_clip(clip):
    """The app's Grad-CAM heatmap on APD / CAPT models: the prompt tokens ride along untouched."""
    from vlm_inspect.explain import grad_cam

    x = torch.rand(2, 3, clip.image_size, clip.image_size)
    plain = grad_cam(clip, x, TEXTS)
    assert torch.allclose(grad_cam(PromptedClip(clip, DeepPrompts(clip, n_vision=0, n_text=0)), x, TEXTS), plain,
                          atol=1e-5)
    prompted = grad_cam(PromptedClip(clip, DeepPrompts(clip, n_vision=2, n_text=2, depth=3)), x, TEXTS)
    assert prompted.shape == plain.shape and torch.isfinite(prompted).all()
