"""Deep prompts for open_clip CLIPs: learnable context tokens in the first ``depth`` layers of both the
vision and the text transformer (the IVLP / VPT-deep shape APD and CAPT build on).

* Vision: ``n_vision`` tokens are appended after the class and patch tokens before layer 0, and
  replaced by a fresh set before each of the next ``depth - 1`` layers; they are dropped before the
  final norm, so the outputs keep their shapes (and TGA-ZSR's map still works).
* Text: the ``n_text`` token positions right after the start token (the context words of a prompt
  such as ``a photo of a {}``) are replaced by learnable vectors before layer 0, initialised from
  those words' embeddings, and again by fresh vectors before each of the next ``depth - 1`` layers.
  The sequence length, causal mask and end-of-text pooling are unchanged.

With zero prompt tokens a :class:`PromptedClip` computes exactly what the plain model computes (tested).
Our choices (docs/METHODS.md, "Deep prompts (IVLP shape)"): insertion points and initialisation follow the IVLP
setting of the APD co-authors' codebase; deeper prompts start from N(0, 0.02²).

The prompted CLIP is an adapter like any other, so it lives with the adapters; APD and CAPT
(:mod:`vlm_inspect.defenses`) train its prompts, and :func:`vlm_inspect.models.load` rebuilds it from a
prompt-only checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import WEIGHTS_FILE, CheckpointError, load_weights
from .clip import ClipAdapter, class_token_pooling


class DeepPrompts(nn.Module):
    """The learnable prompt vectors: ``vision[i]`` (n_vision, W_v) and ``text[i]`` (n_text, W_t) for layer i."""

    def __init__(self, adapter: ClipAdapter, n_vision: int = 2, n_text: int = 2, depth: int = 9,
                 init_text: str = "a photo of a") -> None:
        super().__init__()
        model = adapter.model
        if getattr(model, "visual", None) is None or getattr(model, "transformer", None) is None:
            # the prompts are inserted between open_clip's residual blocks; other CLIPs lay theirs out differently
            raise ValueError(f"deep prompts (APD, CAPT) need an open_clip CLIP ViT; {adapter.name!r} is a "
                             f"{type(model).__name__}")
        if n_vision < 0 or n_text < 0 or depth < 0:
            raise ValueError("prompt sizes and depth must be >= 0")
        self.n_vision, self.n_text = int(n_vision), int(n_text)
        dv = min(depth, len(model.visual.transformer.resblocks)) if n_vision else 0
        dt = min(depth, len(model.transformer.resblocks)) if n_text else 0
        wv, wt = model.visual.transformer.width, model.transformer.width
        self.vision = nn.ParameterList([nn.Parameter(torch.randn(n_vision, wv) * 0.02) for _ in range(dv)])
        self.text = nn.ParameterList([nn.Parameter(torch.randn(n_text, wt) * 0.02) for _ in range(dt)])
        if dt:
            ids = adapter.tokenize([init_text])[0, 1:1 + n_text]
            with torch.no_grad():
                self.text[0].copy_(model.token_embedding(ids.to(model.token_embedding.weight.device)))


class PromptedClip(ClipAdapter):
    """A CLIP adapter whose encoders run with :class:`DeepPrompts`; everything else (zero-shot logits,
    TGA-ZSR maps, attacks, objectives) works on it unchanged."""

    def __init__(self, base: ClipAdapter, prompts: DeepPrompts) -> None:
        super().__init__(base.name, base.model, base.tokenizer, base.spec, base.image_size,
                         base.pixel_mean.flatten().tolist(), base.pixel_std.flatten().tolist(), base.context_length)
        self.weights, self.checkpoint = base.weights, base.checkpoint
        self.prompts = prompts.to(base.device)

    # -- vision --
    def _visual_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 1+N, width): the visual transformer's tokens after ln_post, prompt tokens dropped."""
        visual = self.model.visual
        if not class_token_pooling(visual):
            raise NotImplementedError(f"{self.name}: deep prompts need a ViT with class-token pooling")
        x = visual._embeds(self.normalize(pixels))
        n = x.shape[1]
        x = self._run(visual.transformer, x, self.prompts.vision, lambda x, p: torch.cat([x[:, :n], p], 1), None)
        return visual.ln_post(x[:, :n])

    def projected_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        x = self._visual_tokens(pixels)
        return x @ visual.proj if visual.proj is not None else x

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        # project the class token alone, as open_clip does: a (B, D) product rounds like the plain model's
        visual = self.model.visual
        x = self._visual_tokens(pixels)[:, 0]
        return F.normalize(x @ visual.proj if visual.proj is not None else x, dim=-1)

    # -- text --
    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        m = self.model
        ids = self.tokenize(texts)
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(ids).to(cast)
        k = self.prompts.n_text

        def put(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:  # replace positions 1..k
            return torch.cat([x[:, :1], p.to(x.dtype), x[:, 1 + k:]], 1)

        if len(self.prompts.text):
            x = put(x, self.prompts.text[0].expand(x.shape[0], -1, -1))
        x = x + m.positional_embedding.to(cast)
        x = self._run(m.transformer, x, self.prompts.text[1:] if len(self.prompts.text) else [], put, m.attn_mask,
                      offset=1)
        x = m.ln_final(x)
        x = text_global_pool(x, ids, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection
        return F.normalize(x, dim=-1)

    @staticmethod
    def _run(transformer, x: torch.Tensor, prompts, insert, attn_mask, offset: int = 0) -> torch.Tensor:
        """open_clip's ``Transformer.forward``, with ``insert(x, prompt)`` before layer ``offset + i``."""
        if not transformer.batch_first:
            raise NotImplementedError("deep prompts need a batch-first open_clip transformer")
        for i, block in enumerate(transformer.resblocks):
            j = i - offset
            if 0 <= j < len(prompts):
                x = insert(x, prompts[j].expand(x.shape[0], -1, -1).to(x.dtype))
            x = block(x, attn_mask=attn_mask)
        return x


# ---- prompt-only checkpoints ------------------------------------------------------------------

def prompt_spec(prompts: DeepPrompts, init_text: str) -> dict[str, Any]:
    """The JSON that rebuilds a :class:`DeepPrompts` of the same shape (``config.json["prompts"]``)."""
    return {"n_vision": prompts.n_vision, "n_text": prompts.n_text,
            "depth": max(len(prompts.vision), len(prompts.text)), "init_text": init_text}


def attach_prompts(base: ClipAdapter, folder: Path, config: dict[str, Any], name: str,
                   device: str = "cpu") -> PromptedClip:
    """A prompt-only checkpoint's prompts (``config["prompts"]``, weights in ``folder``) on ``base``, the
    CLIP it names, already loaded and checked to be the model the prompts were trained on."""
    spec = config["prompts"]
    try:
        prompts = DeepPrompts(base, n_vision=int(spec["n_vision"]), n_text=int(spec["n_text"]),
                              depth=int(spec["depth"]), init_text=str(spec.get("init_text", "a photo of a")))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: bad 'prompts' entry {spec!r} ({e})") from e
    load_weights(prompts, folder / WEIGHTS_FILE)
    for p in base.model.parameters():
        p.requires_grad_(False)
    adapter = PromptedClip(base, prompts)
    adapter.name = name
    adapter.weights = str(folder)
    adapter.checkpoint = config
    return adapter.to(device)
