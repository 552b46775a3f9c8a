"""What every model adapter shares: pixel checks, normalisation, preprocessing, the conv stem."""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Sequence

import torch
from PIL import Image
from torch import nn

from ..images import image_pixels

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)


class ModelUnavailableError(RuntimeError):
    """Weights for a model could not be obtained (usually: no network, or a package is missing)."""


@contextlib.contextmanager
def model_guard(module: nn.Module | None) -> Iterator[None]:
    """Eval mode and ``requires_grad=False`` on every weight while attacking; both restored after.

    Eval mode matters (BatchNorm statistics must not drift during an attack) and frozen
    weights mean no graph is built for them (about a third faster on CPU) and no ``.grad`` is left.
    """
    if module is None or not isinstance(module, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        module.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


def families_of(model: Any) -> tuple[str, ...]:
    """Every family ``model`` serves: its ``families`` (a LLaVA is a captioner and a VQA model), else its ``family``."""
    return tuple(getattr(model, "families", ()) or (getattr(model, "family", None),))


def serves(model: Any, family: str) -> bool:
    """True if ``model`` can be used as the ``family`` model (compare with this, not with ``model.family``)."""
    return family in families_of(model)


def image_index_of(image_index: Any, batch: int, device: Any) -> torch.Tensor | None:
    """``image_index`` (which of ``batch`` images each question asks about) as a 1-D long tensor, or None;
    a ValueError unless every entry indexes an image."""
    if image_index is None:
        return None
    index = torch.as_tensor(image_index, dtype=torch.long, device=device)
    if index.ndim != 1 or (len(index) and not 0 <= int(index.min()) <= int(index.max()) < batch):
        raise ValueError(f"image_index must be a 1-D list of indices into the {batch} images")
    return index


def check_pixels(pixels: Any, image_size: int | None = None) -> torch.Tensor:
    """Raise a ValueError saying what was expected unless ``pixels`` is a float (B,3,H,W) tensor in [0,1]."""
    want = f"(B, 3, {image_size}, {image_size})" if image_size else "(B, 3, H, W)"
    if not isinstance(pixels, torch.Tensor):
        raise ValueError(f"pixels must be a torch.Tensor of shape {want} in [0, 1], got {type(pixels).__name__}")
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must have shape {want}, got {tuple(pixels.shape)}")
    if image_size is not None and tuple(pixels.shape[-2:]) != (image_size, image_size):
        raise ValueError(
            f"pixels must have shape {want}, got {tuple(pixels.shape)}; "
            "use adapter.preprocess(image) to resize an image to the model's input size"
        )
    if not pixels.is_floating_point():
        raise ValueError(f"pixels must be a floating point tensor in [0, 1], got dtype {pixels.dtype}")
    if pixels.numel():
        lo, hi = torch.aminmax(pixels.detach())
        if lo < 0 or hi > 1 or torch.isnan(lo) or torch.isnan(hi):
            raise ValueError(
                f"pixels must lie in [0, 1], got values in [{lo.item():.4g}, {hi.item():.4g}]; "
                "pass unnormalised pixels - mean/std normalisation happens inside the adapter"
            )
    return pixels


def as_text_list(texts: str | Sequence[str], batch: int | None = None, what: str = "texts") -> list[str]:
    """One string per image: a single string is repeated ``batch`` times."""
    if isinstance(texts, str):
        return [texts] * (batch if batch is not None else 1)
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{what} must be strings")
    if batch is not None and len(texts) != batch:
        raise ValueError(f"expected {batch} {what} (one per image) or a single string, got {len(texts)}")
    return texts


class ConvStem(nn.Module):
    """A small convolutional stem in place of a ViT's patchify convolution (Xiao et al. 2021,
    "Early Convolutions Help Transformers See Better"): ``log2(patch_size)`` 3x3 stride-2 convolutions,
    each but the last followed by ``extra`` 3x3 stride-1 convolutions, GELU between them, giving the
    same (B, width, H/p, W/p) grid as the patchify. No BatchNorm: it would change statistics during
    attacks and collapse on the noisy style (docs/ARCHITECTURE.md, "Design notes").
    """

    def __init__(self, width: int, patch_size: int, channels: Sequence[int] = (32, 64), extra: int = 0,
                 norm: str = "none") -> None:
        super().__init__()
        n = patch_size.bit_length() - 1
        if 2**n != patch_size or n < 1:
            raise ValueError(f"conv stem needs a power-of-two patch size, got {patch_size}")
        chans = [3, *list(channels)[: n - 1]]
        while len(chans) < n:
            chans.append(chans[-1])
        chans.append(width)
        if norm not in ("none", "group"):
            raise ValueError(f"conv stem norm must be 'none' or 'group', got {norm!r}")

        def act(c: int) -> list[nn.Module]:
            # GroupNorm normalises each image on its own: no running statistics to drift under attack
            return ([nn.GroupNorm(min(8, c), c)] if norm == "group" else []) + [nn.GELU()]

        layers: list[nn.Module] = []
        for i in range(n):
            layers.append(nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1))
            if i < n - 1:
                layers += act(chans[i + 1])
                for _ in range(extra):
                    layers += [nn.Conv2d(chans[i + 1], chans[i + 1], 3, padding=1), *act(chans[i + 1])]
        self.convs = nn.Sequential(*layers)

    @property
    def weight(self) -> torch.Tensor:
        """The first kernel; transformers' ViT/BLIP read ``projection.weight.dtype`` to cast inputs."""
        return self.convs[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Convolutions stay in fp32: bf16 autocast makes them several times slower on CPU
        # (docs/ARCHITECTURE.md, "Design notes").
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return self.convs(x.float())
        return self.convs(x)


class PatchifyConv(nn.Conv2d):
    """A ViT's patchify convolution (kernel = stride, no padding) computed as one matrix product.

    The same parameters and state-dict keys as the ``nn.Conv2d`` it replaces and the same result, but
    as a reshape + ``F.linear``: on CPU, oneDNN's convolution backward for a 32x32 stride-32 kernel
    took 8% of a ViT-B-32 attack step (fp32), and under bf16 autocast the convolution is several times
    slower than in fp32 while the matrix product is several times faster (docs/BENCHMARKS.md).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        kh, kw = self.kernel_size
        gh, gw = h // kh, w // kw
        if gh * kh != h or gw * kw != w:  # not a whole number of patches: the plain convolution
            return super().forward(x)
        patches = x.reshape(b, c, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c * kh * kw)
        out = torch.nn.functional.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)
        return out.reshape(b, gh, gw, self.out_channels).permute(0, 3, 1, 2)


def use_patchify_matmul(owner: nn.Module, attr: str) -> None:
    """Swap ``owner.<attr>``, a patchify ``nn.Conv2d`` (kernel = stride, no padding, no groups), for a
    :class:`PatchifyConv` sharing its parameters; anything else is left alone."""
    conv = getattr(owner, attr, None)
    if type(conv) is not nn.Conv2d or conv.kernel_size != conv.stride or conv.padding != (0, 0) \
            or conv.groups != 1 or conv.dilation != (1, 1):
        return
    new = PatchifyConv(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                       bias=conv.bias is not None, device="meta")
    new.weight, new.bias = conv.weight, conv.bias
    setattr(owner, attr, new)


def install_vit_stem(embeddings_owner: nn.Module, attr: str, stem: dict[str, Any] | None) -> None:
    """Replace the patchify conv ``getattr(embeddings_owner, attr)`` by a :class:`ConvStem`."""
    if not stem or stem.get("type", "patch") == "patch":
        return
    if stem["type"] != "conv":
        raise ValueError(f"unknown stem type {stem['type']!r}; valid: patch, conv")
    old = getattr(embeddings_owner, attr)
    setattr(embeddings_owner, attr, ConvStem(old.out_channels, old.stride[0], stem.get("channels", (32, 64)),
                     stem.get("extra", 0), stem.get("norm", "none")))


class Adapter(nn.Module):
    """Base of the family adapters. ``self.model`` is the wrapped open_clip / transformers module.

    Subclasses set ``family``. Pixels go in as (B,3,H,W) in [0,1] at ``image_size``; normalisation
    with ``mean``/``std`` happens in :meth:`normalize`, inside every forward.
    """

    family: str = ""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        tokenizer: Any,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        spec: dict[str, Any],
    ) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.spec = spec  # how this model was built: preset, architecture, tokenizer kind, source
        self.weights = "random"  # where the weights came from: "random", a folder, or a hub source
        self.checkpoint: dict[str, Any] | None = None  # the checkpoint's config.json, when loaded from one
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, image_size={self.image_size}, weights={self.weights!r}, "
                f"device={self.device})")

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Check ``pixels`` and map them to the model's normalised ``inputs``."""
        check_pixels(pixels, self.image_size)
        return (pixels - self.pixel_mean) / self.pixel_std

    def preprocess(self, image: Image.Image | str | Any) -> torch.Tensor:
        """Any PIL image (or path / array) -> (1, 3, H, W) pixels in [0, 1] at the model's input size,
        on the model's device: shorter side resized, centre crop."""
        return image_pixels(image, self.image_size).to(self.device)

    def image_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised image features, used by the task-agnostic embedding attack."""
        raise NotImplementedError

    def unknown_words(self, text: str) -> list[str]:
        """Words of ``text`` the tokenizer does not know (always [] for sub-word tokenizers)."""
        from .tokenizers import unknown_words

        return unknown_words(self.tokenizer, text) if hasattr(self.tokenizer, "unk_token_id") else []
