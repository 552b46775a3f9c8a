"""Heatmaps: TGA-ZSR's text-guided attention re-computed independently, Grad-CAM, overlays."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlm_inspect.explain import HEATMAPS, attention_shift, grad_cam, overlay, text_guided_attention


def open_clip_tokens(model, pixels):
    """Projected tokens through open_clip's own forward (output_tokens=True), not our adapter code."""
    visual = model.model.visual
    visual.output_tokens = True
    try:
        pooled, tokens = visual((pixels - model.pixel_mean) / model.pixel_std)
    finally:
        visual.output_tokens = False
    return pooled, tokens @ visual.proj


def test_tga_attention_matches_the_formula_on_vit_b32(vit_b32):
    model = vit_b32
    pixels = torch.rand(2, 3, 224, 224)
    texts = ["This is a photo of a cat", "This is a photo of a dog"]
    with torch.no_grad():
        got = text_guided_attention(model, pixels, texts)
        pooled, tokens = open_clip_tokens(model, pixels)
        # patch_embeddings is what open_clip's own forward gives, normalised per token
        assert torch.allclose(model.patch_embeddings(pixels), F.normalize(tokens, dim=-1), atol=1e-5)
        assert torch.allclose(model.encode_image(pixels), F.normalize(pooled, dim=-1), atol=1e-5)
        # TGA-ZSR: dot with the normalised text embedding, min-max over patches, grid, bilinear upsample
        text = model.encode_text(texts)
        sim = (F.normalize(tokens, dim=-1) * text[:, None, :]).sum(-1)
        sim = (sim - sim.min(1, keepdim=True).values) / (sim.max(1, keepdim=True).values - sim.min(1, keepdim=True).values)
        expected = F.interpolate(sim.reshape(2, 1, 7, 7), size=(224, 224), mode="bilinear", align_corners=False)[:, 0]
    assert got.shape == (2, 224, 224)
    assert torch.allclose(got, expected, atol=1e-5)
    assert got.min() >= 0 and got.max() <= 1


def test_tga_attention_authors_code_option(vit_b32):
    """The authors' code normalises each channel over the token axis (class token included)."""
    model = vit_b32
    pixels = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        got = text_guided_attention(model, pixels, "This is a photo of a cat", token_norm="authors-code")
        pooled, tokens = open_clip_tokens(model, pixels)
        all_tokens = torch.cat([pooled[:, None], tokens], 1)
        feats = (all_tokens / all_tokens.norm(dim=1, keepdim=True))[:, 1:]
        am = feats @ model.encode_text(["This is a photo of a cat"]).unsqueeze(-1)
        am = (am - am.min(1, keepdim=True)[0]) / (am.max(1, keepdim=True)[0] - am.min(1, keepdim=True)[0])
        am = F.interpolate(am.reshape(1, 7, 7, 1).permute(0, 3, 1, 2), 224, mode="bilinear")[:, 0]
    assert torch.allclose(got, am, atol=1e-5)
    with pytest.raises(ValueError, match="token_norm"):
        text_guided_attention(model, pixels, "x", token_norm="softmax")


def test_tga_attention_is_differentiable(shapes_clip):
    pixels = torch.rand(2, 3, 64, 64, requires_grad=True)
    maps = text_guided_attention(shapes_clip, pixels, "a photo of a red star")
    assert maps.shape == (2, 64, 64)
    (maps * torch.linspace(0, 1, 64)).sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    # weights get gradients too: TGA-ZSR trains through the map
    assert shapes_clip.model.visual.proj.grad is not None
    shapes_clip.zero_grad(set_to_none=True)


def test_tga_attention_text_forms(shapes_clip):
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        one = text_guided_attention(shapes_clip, pixels, "a photo of a red star")
        two = text_guided_attention(shapes_clip, pixels, ["a photo of a red star"] * 2)
        feats = shapes_clip.encode_text(["a photo of a red star"])
        pre = text_guided_attention(shapes_clip, pixels, None, text_features=feats)
    assert torch.allclose(one, two) and torch.allclose(one, pre)
    with pytest.raises(ValueError, match="one per image"):
        text_guided_attention(shapes_clip, pixels, ["a", "b", "c"])


def test_attention_shift():
    a = torch.rand(3, 8, 8)
    assert torch.allclose(attention_shift(a, a), torch.zeros(3))
    b = a.clone()
    b[1, 0, 0] += 0.5
    assert torch.allclose(attention_shift(a, b), torch.tensor([0.0, 0.5, 0.0]))


@pytest.mark.parametrize("fixture", ["shapes_clip", "vit_b32"])
def test_grad_cam(fixture, request):
    model = request.getfixturevalue(fixture)
    pixels = torch.rand(2, 3, model.image_size, model.image_size)
    cam = grad_cam(model, pixels, ["a photo of a cat", "a photo of a red star"])
    assert cam.shape == (2, model.image_size, model.image_size)
    assert cam.min() >= 0 and cam.max() <= 1 and cam.max() > 0.5
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    # the hook is gone: later forwards are untouched
    assert len(model.model.visual.transformer.resblocks[-2]._forward_hooks) == 0


def test_overlay():
    img = np.full((16, 16, 3), 100, np.uint8)
    heat = torch.zeros(8, 8)
    heat[:4] = 1.0
    out = overlay(img, heat, alpha=0.5)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert not np.array_equal(out[0, 0], out[15, 15])  # hot top, cold bottom
    assert np.array_equal(overlay(img, heat, alpha=0.0), img)
    px = torch.rand(1, 3, 16, 16)
    assert overlay(px, np.ones((16, 16)), alpha=0.3).shape == (16, 16, 3)
    assert overlay(Image.new("RGB", (16, 16)), heat).shape == (16, 16, 3)
    with pytest.raises(ValueError, match="2-D"):
        overlay(img, torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="alpha"):
        overlay(img, heat, alpha=2)


@pytest.mark.parametrize("name", HEATMAPS.list())
def test_every_registered_heatmap_maps_each_image_into_unit_range(name, shapes_clip):
    """Any heatmap in HEATMAPS, with and without the tokens of the probabilities' forward pass."""
    pixels = torch.rand(2, 3, 64, 64)
    prompt = "a photo of a red star"
    with torch.no_grad():
        text = shapes_clip.encode_text([prompt])
        tokens = shapes_clip.projected_tokens(pixels)
    fn = HEATMAPS.get(name)
    for kwargs in ({}, {"tokens": tokens}):
        heat = fn(shapes_clip, pixels, prompt, text, **kwargs)
        assert heat.shape == (2, 64, 64) and heat.min() >= 0 and heat.max() <= 1 + 1e-6
        assert torch.isfinite(heat).all()
