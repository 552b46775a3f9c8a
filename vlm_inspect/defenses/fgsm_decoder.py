"""``--defense fgsm-decoder``: adversarial training of an image captioner on FGSM images, decoder only.

"AI Safety in Practice: Enhancing Adversarial Robustness in Multimodal Image Captioning",
arXiv 2407.21174, https://arxiv.org/abs/2407.21174 (docs/METHODS.md; no code was available to us).

Faithful: a ViT encoder + GPT-2 decoder captioner; FGSM images with eps = 0.1 on the processor's
normalised input (mean = std = 0.5, i.e. [-1, 1]), which is 0.05 = 12.75/255 in pixels - converted in
one place, :func:`vlm_inspect.attacks.base.pixel_eps`; only the text decoder trains, the image encoder
is frozen; ``--part full`` and ``--part encoder`` give the paper's two comparisons.
Our choices (the paper's text does not pin them): FGSM maximises the teacher-forced caption NLL of the
reference caption, crafted with the model in eval mode (no dropout) and no random start; each batch is
half clean, half FGSM (``adv_fraction``); the loss is the mean caption NLL over the mixed batch; the
optimiser is the shared loop's AdamW. The shapes-world recipe is in docs/REPRODUCTION.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..attacks import FGSM
from ..attacks.base import pixel_eps
from ..objectives import CaptionNLL
from .common import DEFENSES
from .generative import GenerativeConfig, GenerativeTask


@dataclass
class FgsmDecoderConfig(GenerativeConfig):
    part: str = "decoder"       # the paper's method; full and encoder are its comparisons (arXiv 2407.21174)
    attack_eps: float = 0.1     # FGSM budget in normalised units, [-1, 1] inputs (paper: eps 0.1) = 12.75/255 pixels
    adv_fraction: float = 0.5   # share of each batch replaced by its FGSM image - our choice


@DEFENSES.register("fgsm-decoder", families=("captioner",))
class FgsmDecoder(GenerativeTask):
    families = ("captioner",)
    Config = FgsmDecoderConfig

    def __init__(self, model, config, data) -> None:
        if not 0 <= config.adv_fraction <= 1:
            raise ValueError(f"adv_fraction must lie in [0, 1], got {config.adv_fraction}")
        if config.attack_eps < 0:
            raise ValueError(f"attack_eps must be >= 0, got {config.attack_eps}")
        super().__init__(model, config, data)
        self.eps_pixels = pixel_eps(config.attack_eps, model.pixel_std.flatten().tolist())

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        x, captions = batch["pixels"], batch["captions"]
        n_adv = int(round(x.shape[0] * self.config.adv_fraction))
        k = x.shape[0] - n_adv  # the last n_adv images are replaced by their FGSM image
        parts: dict[str, float] = {"eps_pixels_255": round(self.eps_pixels * 255, 3)}
        if n_adv and self.eps_pixels > 0:
            adv = FGSM(eps=self.eps_pixels)(x[k:], CaptionNLL(self.model, captions[k:])).adv
            x = torch.cat([x[:k], adv])
        nll = self.model.caption_nll(x, captions)
        if k:
            parts["ce_clean"] = float(nll[:k].detach().mean())
        if n_adv:
            parts["ce_adv"] = float(nll[k:].detach().mean())
        return nll.mean(), parts
