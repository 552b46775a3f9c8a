"""The one place where perturbations are measured, stepped and projected (L-inf and L2)."""
from __future__ import annotations

import torch

NORMS = ("linf", "l2")


def check_norm(norm: str) -> str:
    n = str(norm).lower().replace("-", "").replace("_", "")
    n = {"inf": "linf", "linf": "linf", "l2": "l2", "2": "l2"}.get(n, n)
    if n not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
    return n


def _flat_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (x.ndim - 1)))


def size(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """(B,) size of each perturbation in ``norm``."""
    d = delta.detach().flatten(1)
    return d.abs().amax(1) if check_norm(norm) == "linf" else d.norm(p=2, dim=1)


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent unit step for ``norm``: sign(g) for L-inf, g/||g||_2 for L2."""
    if norm == "linf":
        return grad.sign()
    return grad / _flat_norm(grad).clamp_min(1e-12)


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project each perturbation onto the ``norm`` ball of radius ``eps``."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)


def clip_to_image(pixels: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The part of ``delta`` that keeps ``pixels + delta`` in [0,1]. Clipping only shrinks each
    coordinate towards 0, so it never leaves the norm ball."""
    return (pixels + delta).clamp(0.0, 1.0) - pixels


def random_start(pixels: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform in the L-inf ball, or uniform in the L2 ball (direction ~ N(0,I), radius eps*u^(1/d))."""
    shape, dev = pixels.shape, pixels.device
    if norm == "linf":
        d = (torch.rand(shape, generator=generator, device=dev) * 2 - 1) * eps
    else:
        g = torch.randn(shape, generator=generator, device=dev)
        u = torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=generator, device=dev)
        dim = pixels[0].numel()
        d = g / _flat_norm(g).clamp_min(1e-12) * eps * u.pow(1.0 / dim)
    return clip_to_image(pixels, d.to(pixels.dtype))
