"""Where and at what precision models run: ``--device cuda|cpu|auto`` and ``--precision fp32|bf16|fp16|auto``.

One place for both choices, used by the app, ``inspect``, ``train`` and ``evaluate``:

- ``resolve_device("auto")`` is ``cuda`` when a GPU is visible, else ``cpu``; asking for ``cuda`` without
  one is refused with one sentence.
- Precision is autocast, never a cast of the weights: matrix products run in bf16/fp16 while
  pixels, perturbations and the attack's projection stay fp32. fp16 needs a GPU (CPU autocast has no
  fp16 kernels worth using); ``auto`` is bf16 on a GPU that has it and on a CPU with native bf16
  (AMX / AVX512-BF16, where it roughly halves a ViT-B-32 attack step, docs/BENCHMARKS.md), else fp32.
- Token-by-token decoding (captions, answers) may run at its own precision: under ``auto`` on a CPU it
  runs in fp32 while encoders and attacks keep bf16 (:func:`decoding_precision`). The models wrap their
  decoding loops in :func:`decoding`, which applies the choice made by the enclosing :func:`autocast`.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from pathlib import Path

import torch

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | None = "auto") -> str:
    """``auto`` -> ``cuda`` if available else ``cpu``; ``cpu``, ``cuda`` and ``cuda:N`` are checked."""
    device = str(device or "auto").strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA GPU is visible to torch on this machine; "
                             "use --device cpu (or auto)")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
        return device
    raise ValueError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N")


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (oneDNN reports bf16 support: AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - private API; absence means "don't know" = no
        return False


def resolve_precision(precision: str | None, device: str) -> str:
    """Check ``precision`` for ``device`` and turn ``auto`` into a concrete choice."""
    precision = str(precision or "fp32").strip().lower()
    kind = torch.device(device).type
    if precision == "auto":
        if kind == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: auto, {', '.join(PRECISIONS)}")
    if precision == "fp16" and kind != "cuda":
        raise ValueError("fp16 needs a CUDA GPU (CPU autocast has no fast fp16); use bf16 or fp32 on the CPU")
    return precision


# (device type, precision) of decoding loops inside the enclosing autocast(); None: as the autocast
_DECODING: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("vlm_inspect_decoding",
                                                                                   default=None)


def decoding_precision(requested: str | None, precision: str, device: str) -> str:
    """The precision of token-by-token decoding in a run whose attacks and encoders use ``precision``
    (``requested`` is what the person asked for, before :func:`resolve_precision`).

    ``fp32`` when ``auto`` was asked for on a CPU, else ``precision``. Decoding one token at a time is
    bound by reading the weights, and CPU autocast re-casts frozen weights at every call (its cast
    cache only keeps weights that require grad), so each token pays a bf16 copy of the whole decoder:
    fp32 decoding is the faster one there (docs/BENCHMARKS.md has the measurement). An explicit
    precision is obeyed."""
    if str(requested or "fp32").strip().lower() == "auto" and torch.device(device).type == "cpu":
        return "fp32"
    return precision


def _autocast_context(device_type: str, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=DTYPES[precision])


@contextlib.contextmanager
def autocast(device: str, precision: str, decoding: str | None = None):
    """Autocast for ``precision`` on ``device`` (a no-op for fp32). Decoding loops inside it (those the
    models wrap in :func:`decoding`) run at ``decoding`` instead when it is given and differs."""
    kind = torch.device(device).type
    token = _DECODING.set((kind, decoding) if decoding and decoding != precision else None)
    try:
        with (contextlib.nullcontext() if precision == "fp32" else _autocast_context(kind, precision)):
            yield
    finally:
        _DECODING.reset(token)


def decoding() -> contextlib.AbstractContextManager:
    """The context a model's token-by-token decoding loop runs in: the decoding precision chosen by the
    enclosing :func:`autocast` (outside one, or when none was chosen: nothing changes). Inputs coming
    from an encoder that ran in bf16 must be cast to fp32 before they enter an fp32 decoder."""
    chosen = _DECODING.get()
    return contextlib.nullcontext() if chosen is None else _autocast_context(*chosen)


def fp16_active() -> bool:
    """True inside fp16 autocast on a GPU (attacks then scale the loss so small gradients survive)."""
    return torch.cuda.is_available() and torch.is_autocast_enabled("cuda") \
        and torch.get_autocast_dtype("cuda") == torch.float16


DEVICE_HELP = "torch device: auto (a CUDA GPU if one is visible, else the CPU), cpu, cuda, cuda:N"
PRECISION_HELP = ("autocast precision: auto = bf16 on a GPU or on a CPU with native bf16 (AMX / AVX512-BF16), "
                  "else fp32; fp16 only on a GPU")
WEIGHTS_DIR_HELP = ("folder of local copies of pretrained weights (<dir>/<name>, e.g. <dir>/openai/ViT-B-32), "
                    "for machines without internet; `python -m vlm_inspect.models.fetch --out <dir>` writes them")


def add_arguments(parser, precision_default: str = "auto", device: bool = True, precision: bool = True) -> None:
    """``--device``, ``--precision`` and ``--weights-dir`` with the same meaning in every command."""
    if device:
        parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    if precision:
        parser.add_argument("--precision", default=precision_default, choices=["auto", *PRECISIONS],
                            help=f"{PRECISION_HELP} (attacks and inference)")
    parser.add_argument("--weights-dir", default=None, metavar="DIR", help=WEIGHTS_DIR_HELP)


def apply_weights_dir(args) -> None:
    """Make ``--weights-dir`` (if given) the place pretrained models load from."""
    if getattr(args, "weights_dir", None):
        set_weights_dir(args.weights_dir)


# ---- where weights live ---------------------------------------------------------------------------

def checkpoints_dir() -> Path:
    """Where embedded checkpoints live: ``$VLM_INSPECT_CHECKPOINTS`` or ``<repo>/checkpoints``."""
    env = os.environ.get("VLM_INSPECT_CHECKPOINTS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "checkpoints"


WEIGHTS_DIR_ENV = "VLM_INSPECT_WEIGHTS_DIR"


def weights_dir() -> Path | None:
    """The folder of local copies of pretrained weights (``--weights-dir`` / ``$VLM_INSPECT_WEIGHTS_DIR``):
    ``<dir>/<name>`` holds the copy of ``<name>``, e.g. ``<dir>/openai/ViT-B-32`` or, for an open_clip hub
    name ``hf-hub:org/repo``, ``<dir>/org/repo``."""
    env = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(env) if env else None


def set_weights_dir(folder: str | Path | None) -> None:
    """Use ``folder`` for local copies of pretrained weights (an environment variable, so that worker
    processes and ``torchrun`` ranks see it too); ``None`` switches it off."""
    from .checkpoints import CheckpointError

    if folder is None:
        os.environ.pop(WEIGHTS_DIR_ENV, None)
        return
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"--weights-dir {folder}: no such folder")
    os.environ[WEIGHTS_DIR_ENV] = str(folder.resolve())


def inside(path: str | Path, roots) -> bool:
    """``path`` is one of ``roots`` or below one (both already resolved: no links, no ``..``)."""
    path = Path(path)
    return any(path == Path(r) or Path(r) in path.parents for r in roots)


def local_copy_path(name: str, root: Path | None = None) -> Path | None:
    """Where the local copy of ``name`` lives (whether or not it is there); None without a weights dir."""
    root = root or weights_dir()
    if root is None:
        return None
    return root / name.removeprefix("hf-hub:")
