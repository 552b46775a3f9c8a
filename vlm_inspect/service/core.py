"""InspectService: the model cache and the entry points the page, the API and ``vlm_inspect.inspect`` call."""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

from ..models import ModelUnavailableError, load
from ..models.base import families_of, serves
from ..models.loading import weights_stamp
from ..models.presets import is_pretrained
from ..policy import ModelPolicy, ModelRefused
from ..runtime import resolve_device, resolve_precision
from .catalog import ModelCatalog
from .check import run_check
from .inspection import Inspection, run_curve, run_inspection
from .request import CURVE_EPS_K, InputError, InspectRequest
from .views import ModelViews

log = logging.getLogger(__name__)

# ``precision="auto"``: models at least this large run attacks and inference in bf16 where the hardware
# has it (ViT-B-32: 1.5x faster at batch 16, equal at batch 1); the embedded ones (< 10 M) stay fp32
AUTO_LOW_PRECISION_MIN_PARAMS = 50_000_000


class InspectService(ModelCatalog):
    """Holds the models (loaded on first use, reloaded when their checkpoint changes on disk) and runs
    inspections. Thread-safe: one model computation at a time (the UI queues its listeners too). No
    gradio here: the UI and the headless twin call :meth:`inspect` and :meth:`curve` and only lay out
    what comes back. Which models it offers is :class:`~.catalog.ModelCatalog`'s job.

    Args:
        suite: default suite for :meth:`defaults` (``embedded`` or ``pretrained``).
        device: torch device for every model (``auto``: a CUDA GPU if visible, else the CPU).
        precision: autocast precision of attacks and inference (:mod:`vlm_inspect.runtime`): ``fp32``,
            ``bf16``, ``fp16`` (GPU) or ``auto``: per request, bf16 (fp16 on a GPU without bf16) when a
            model of the request is large (``AUTO_LOW_PRECISION_MIN_PARAMS``) and the hardware computes
            bf16 natively, else fp32. The small embedded models run *slower* in bf16 on a CPU (0.64x,
            docs/BENCHMARKS.md), so they stay fp32. Under ``auto`` on a CPU, captions and answers are
            decoded in fp32 (:func:`vlm_inspect.runtime.decoding_precision`; the report's
            ``runtime.generation_precision``): only the token-by-token loops, while the image (and BLIP's
            question) encoders feeding them keep the request's precision.
        model_dirs: extra folders whose sub-folders holding a vlm_inspect checkpoint are offered as
            models (e.g. ``runs/`` where ``python -m vlm_inspect.train --out runs/NAME`` writes).
        max_models: how many models stay loaded (least recently used are dropped).
        policy: which model names a request may use (:mod:`vlm_inspect.policy`). The default is a
            served app's: the catalog only. The local ``inspect`` command passes ``ModelPolicy.local()``.
    """

    def __init__(self, suite: str = "embedded", device: str = "cpu", precision: str = "fp32",
                 model_dirs: Sequence[str | Path] = ("runs",), max_models: int = 8,
                 policy: ModelPolicy | None = None) -> None:
        super().__init__(suite, model_dirs)
        self.device = resolve_device(device)
        self.precision = "auto" if str(precision).lower() == "auto" else resolve_precision(precision, self.device)
        self.max_models = max_models
        self.policy = policy if policy is not None else ModelPolicy()
        self._models: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self.views = ModelViews(self.device, weights_stamp)  # retrained weights on disk: views rebuilt
        self.lock = threading.RLock()

    # -- loading --
    def model(self, name: str, progress: Callable[[float, str], None] | None = None):
        """The adapter for ``name``, loaded once and kept (LRU). A model that cannot be had (no network
        for a first download, a bad checkpoint) raises an :class:`InputError` that says how to fix it."""
        name = str(name)
        with self.lock:
            try:  # before anything touches the disk: a refused name learns nothing about the server
                with self.policy.loading(self.catalog_roots()):
                    self.policy.admit(name, self.catalog)
            except ModelRefused as e:
                raise InputError(str(e)) from None
            stamp = weights_stamp(name)  # a retrained run folder, --weights-dir copy or tower part reloads
            hit = self._models.get(name)
            if hit is not None and hit[1] == stamp:
                self._models.move_to_end(name)
                return hit[0]
            if progress is not None:
                first = is_pretrained(name)
                progress(0.0, f"loading {name}" + (" (the first use downloads its weights)" if first else ""))
            adapter = self._load(name)
            adapter.eval()
            for p in adapter.parameters():  # the app never trains: no weight graphs (a third faster)
                p.requires_grad_(False)
            self._models[name] = (adapter, stamp)
            self._models.move_to_end(name)
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
            return adapter

    def _load(self, name: str):
        try:
            with self.policy.loading(self.catalog_roots()):
                return load(name, device=self.device)
        except FileNotFoundError as e:
            raise InputError(f"model {name!r}: {e}") from None
        # no network for a first download (the message says what to do); an unknown name, a checkpoint
        # of another architecture, a truncated file, a folder the policy refuses...
        except (ModelUnavailableError, ValueError) as e:
            raise InputError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - a library failing on a strange folder: still one sentence
            log.exception("loading %s failed", name)
            first = str(e).splitlines()[0][:200] if str(e) else ""
            raise InputError(f"model {name[:80]!r} could not be loaded ({type(e).__name__}: {first})") from None

    def family_model(self, name: str, family: str, progress: Callable[[float, str], None] | None = None):
        """:meth:`model`, refused with a clear message unless it serves ``family`` (a LLaVA serves two: the
        caption box and the VQA box then hold the same loaded object)."""
        adapter = self.model(name, progress)
        if not serves(adapter, family):
            raise InputError(f"{name} is a {' and '.join(families_of(adapter))} model; it cannot be used as the "
                             f"{family} model")
        return adapter

    def precision_for(self, models: Sequence[Any]) -> str:
        """The autocast precision for a request on ``models`` (resolves ``auto``, see the class doc)."""
        if self.precision != "auto":
            return self.precision
        big = any(sum(p.numel() for p in m.parameters()) >= AUTO_LOW_PRECISION_MIN_PARAMS for m in models if m)
        return resolve_precision("auto", self.device) if big else "fp32"

    # -- the work --
    def inspect(self, image: Any, request: InspectRequest, progress: Callable[[float, str], None] | None = None,
                cancelled: Callable[[], bool] | None = None) -> Inspection:
        """Run one inspection of ``image`` (path, bytes, PIL image or array); see
        :mod:`~.inspection` for its steps. Raises :class:`InputError` (or
        :class:`~vlm_inspect.images.ImageError`) for a person's mistake, and :class:`~.request.Cancelled`
        between two attack steps once ``cancelled()`` is true (the client has gone)."""
        return run_inspection(self, image, request, progress, cancelled)

    def curve(self, image: Any, request: InspectRequest, eps_k: Sequence[float] = CURVE_EPS_K,
              progress: Callable[[float, str], None] | None = None,
              cancelled: Callable[[], bool] | None = None) -> dict[str, Any]:
        """The target task's metric against epsilon for the baseline and the defended model, one
        batched attack per side (the image repeated once per epsilon, each with its own budget; the
        step size follows the default rule 2.5 * eps / steps for every budget).

        Metric (the objective's ``metric``): probability of the clean top-1 (or target) class for
        zero-shot; per-token probability of the clean caption / answer (exp of minus the mean token NLL)
        for caption and VQA; cosine similarity to the clean image embedding for the embedding attack.
        """
        return run_curve(self, image, request, eps_k, progress, cancelled)

    def check(self, image: Any, request: InspectRequest, budget: str = "quick",
              progress: Callable[[float, str], None] | None = None,
              cancelled: Callable[[], bool] | None = None) -> dict[str, Any]:
        """The AutoAttack check of ``image`` for each side's zero-shot model (:mod:`~.check`): survives at
        the request's eps, or broken by which attack at which step, next to the chosen attack's verdict."""
        return run_check(self, image, request, budget, progress, cancelled)
