"""Attack a shapes-world image and watch the embedded CLIP's prediction and attention move.

    python examples/quickstart.py
"""
import torch

from vlm_inspect import PGD, attention_shift, load, text_guided_attention, zero_shot_ce
from vlm_inspect.data.shapes import ShapesDataset

data = ShapesDataset("shapes-combo", split="test", length=8)
sample = data[0]
clip = load("shapes-clip")  # the trained checkpoint shipped in checkpoints/shapes-clip
pixels = clip.preprocess(sample["image"])
prompts, label = data.prompts, sample["label"]

objective = zero_shot_ce(clip, prompts, [label])
attack = PGD(eps=4 / 255, alpha=1 / 255, steps=10)
result = attack(pixels, objective, generator=torch.Generator().manual_seed(0))


def top3(px):
    with torch.no_grad():
        probs = clip.zero_shot_logits(px, prompts).softmax(-1)[0]
    return ", ".join(f"{prompts[i]!r} {probs[i]:.2f}" for i in probs.topk(3).indices)


with torch.no_grad():
    clean_map = text_guided_attention(clip, pixels, prompts[label])
    adv_map = text_guided_attention(clip, result.adv, prompts[label])
print(f"model      : {clip.name} (weights: {clip.weights})")
print(f"true class : {prompts[label]!r}   ({sample['caption']})")
print(f"clean top-3: {top3(pixels)}")
print(f"adv top-3  : {top3(result.adv)}")
print(f"attack     : {attack}  |delta|_inf = {result.delta.abs().max() * 255:.2f}/255")
print(f"loss       : {result.losses[0]:.3f} -> {objective(result.adv).item():.3f}")
print(f"attention shift (L2, TGA-ZSR): {attention_shift(clean_map, adv_map).item():.3f}")
