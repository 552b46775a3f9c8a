"""What a request to a served app may name as a model (:class:`ModelPolicy`).

The page and its ``/inspect`` API take model names typed by whoever can reach the server. Left open,
such a name reads any folder on the server (and tells which exist), builds whatever architecture a
config describes (a 10-billion-parameter random model fills the memory) and downloads any hub
repository. So a served app lets a request name only its **catalog**: the presets, the folders in
``checkpoints/`` and in the run folders (``runs/``), and the local copies in the operator's
``--weights-dir``. The operator can allow more when starting the app:

- ``--allow-model-paths DIR``: typed checkpoint folders inside ``DIR`` (resolved, so ``..`` and links
  cannot leave it). Before anything is built, the folder's configs must be small, its weights must be
  safetensors, no part may come from the hub, and the model its config describes, counted on the
  ``meta`` device (no memory), must stay under ``max_params``.
- ``--allow-hub PATTERN``: open_clip ``hf-hub:<org>/<repo>`` names matching the pattern (``*`` for
  any); the repository must hold safetensors weights no larger than ``max_hub_bytes`` (asked of the
  hub before downloading).

Every refused name gets the same sentence, whatever is or is not on the disk: no oracle. The local
commands (``inspect``, ``train``, ``evaluate``) use :meth:`ModelPolicy.open`: their user owns the
machine.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .runtime import inside

MAX_NAME_CHARS = 300
HUB_NAME = re.compile(r"hf-hub:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")  # fullmatch
OUTSIDE = ("local-dir:", "hf-hub:")  # open_clip names that read another folder or the hub
CONFIG_FILES = ("config.json", "open_clip_config.json", "trainer.json")


_ADMITTED_HUB: set[str] = set()  # hub names checked once by this process


class ModelRefused(ValueError):
    """A request named a model this server does not offer; the message is the same for every such name."""


def refused(name: str) -> ModelRefused:
    shown = name if len(name) <= 80 else name[:77] + "..."
    return ModelRefused(f"model {shown!r} is not offered by this server: choose one from the model list "
                        "(the operator can allow more with --allow-model-paths or --allow-hub)")


def _hub_keys(data: Any) -> list[str]:
    """Keys of a config that make open_clip (or timm) fetch a part from the hub, or a value that names
    another folder or a hub repository (``local-dir:...``, ``hf-hub:...``)."""
    if isinstance(data, dict):
        found = [k for k, v in data.items() if (k.startswith("hf_") or k == "timm_model_pretrained") and v]
        found += [k for k, v in data.items() if isinstance(v, str) and v.startswith(OUTSIDE)]
        return found + [k for v in data.values() for k in _hub_keys(v)]
    if isinstance(data, list):
        return [k for v in data for k in _hub_keys(v)]
    return []


@dataclass(frozen=True)
class ModelPolicy:
    """Which model names a request may use. ``open``: any (the local commands)."""

    open: bool = False
    model_paths: tuple[Path, ...] = ()
    hub: tuple[str, ...] = ()
    max_params: int = 500_000_000       # ViT-L-14 is 428 M
    max_config_bytes: int = 1_000_000
    max_hub_bytes: int = 2_000_000_000  # ViT-L-14's safetensors are 1.7 GB
    max_hub_models: int = 8             # distinct hub models one server downloads

    @classmethod
    def served(cls, model_paths: Iterable[str | Path] = (), hub: Iterable[str] = (), **limits: int) -> "ModelPolicy":
        """The policy of an app served to others: the catalog, plus what the operator allows."""
        return cls(open=False, model_paths=tuple(Path(p).expanduser().resolve() for p in model_paths),
                   hub=tuple(hub), **limits)

    @classmethod
    def local(cls) -> "ModelPolicy":
        return cls(open=True)

    # -- the decision --
    def admit(self, name: str, catalog: Callable[[], set[str]]) -> None:
        """Raise :class:`ModelRefused` unless a request may name ``name``; ``catalog`` lists the offered names."""
        if len(name) > MAX_NAME_CHARS:
            raise ModelRefused(f"a model name has at most {MAX_NAME_CHARS} characters; this one has {len(name)}")
        if self.open or name in catalog():
            return
        from .models.llava import TOWER_SEP, split_tower

        if TOWER_SEP in name:  # a LLaVA with another CLIP's vision tower: each part is a model name like any other
            try:
                parts = split_tower(name)
            except ValueError:
                raise refused(name) from None
            for part in parts:
                self.admit(str(part), catalog)
            return
        if name.startswith("hf-hub:"):
            if HUB_NAME.fullmatch(name) and any(fnmatch.fnmatchcase(name.removeprefix("hf-hub:"), p.removeprefix("hf-hub:"))
                                            for p in self.hub):
                self.check_hub(name)
                return
            raise refused(name)
        folder = self._allowed_folder(name)
        if folder is None:
            raise refused(name)
        self.check_folder(folder, name)

    def _allowed_folder(self, name: str) -> Path | None:
        """``name`` resolved, if it is a folder inside an allowed directory (outside the upload folder)."""
        if not self.model_paths or "\x00" in name:
            return None
        try:
            path = Path(name).expanduser().resolve()
        except (OSError, RuntimeError, ValueError):
            return None
        if not inside(path, self.model_paths):
            return None
        try:
            from gradio.utils import get_upload_folder

            uploads = Path(get_upload_folder()).resolve()
        except ImportError:  # no gradio: no uploads either
            uploads = None
        if uploads is not None and inside(path, [uploads]):
            return None  # an uploaded file is never a model
        return path if path.is_dir() else None

    def check_folder(self, folder: Path, name: str | None = None) -> None:
        """Limits on an allowed folder, checked before anything is built."""
        from .models.loading import meta_param_count  # the models layer counts; the policy decides

        shown = name or str(folder)
        for f in CONFIG_FILES:
            p = folder / f
            if p.is_file() and p.stat().st_size > self.max_config_bytes:
                raise ModelRefused(f"{shown}: {f} is {p.stat().st_size:,} bytes; this server reads configs of at "
                                   f"most {self.max_config_bytes:,}")
        for f in ("open_clip_config.json", "config.json"):
            if not (folder / f).is_file():
                continue
            try:
                keys = _hub_keys(json.loads((folder / f).read_text()))
            except (OSError, ValueError) as e:
                raise ModelRefused(f"{shown}: {f} is not valid JSON ({e})") from None
            if keys:
                raise ModelRefused(f"{shown}: its {f} fetches parts from the hub or another folder ({keys[0]}); "
                                   "this server loads only the folder's own safetensors")
        oc = folder / "open_clip_config.json"
        if oc.is_file():
            if not (folder / "open_clip_model.safetensors").is_file():
                raise ModelRefused(f"{shown}: no open_clip_model.safetensors in the folder; this server loads "
                                   "safetensors weights only")
        elif not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise refused(shown)
        try:
            n = meta_param_count(folder)
        except ModelRefused:
            raise
        except Exception as e:  # noqa: BLE001 - a config of any shape may be sent
            raise ModelRefused(f"{shown}: its config does not describe a model this server can build "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
        if n > self.max_params:
            raise ModelRefused(f"{shown}: its config describes a model of {n / 1e6:,.0f} M parameters; this server "
                               f"builds at most {self.max_params / 1e6:,.0f} M")

    def check_hub(self, name: str) -> None:
        """Ask the hub about the repository before anything large is downloaded: it must hold
        ``open_clip_model.safetensors`` (what open_clip loads first; never its pickled fallback) of at
        most ``max_hub_bytes``, and its config, read on its own, must fetch nothing else and describe
        at most ``max_params`` parameters. Admitted names are remembered; at most ``max_hub_models``."""
        if name in _ADMITTED_HUB:
            return
        if len(_ADMITTED_HUB) >= self.max_hub_models:
            raise ModelRefused(f"{name}: this server has already downloaded {self.max_hub_models} hub models, "
                               "its limit")
        repo = name.removeprefix("hf-hub:")
        try:
            from huggingface_hub import HfApi, hf_hub_download

            info = HfApi().model_info(repo, files_metadata=True)
            files = {s.rfilename: (s.size or 0) for s in (info.siblings or [])}
            if "open_clip_config.json" not in files or "open_clip_model.safetensors" not in files:
                raise ModelRefused(f"{name}: not an open_clip repository with open_clip_model.safetensors weights")
            size = files["open_clip_model.safetensors"]
            if size > self.max_hub_bytes:
                raise ModelRefused(f"{name}: its weights are {size / 1e9:.1f} GB; this server downloads at most "
                                   f"{self.max_hub_bytes / 1e9:.1f} GB")
            if files["open_clip_config.json"] > self.max_config_bytes:
                raise ModelRefused(f"{name}: its open_clip_config.json is too large")
            config = Path(hf_hub_download(repo, "open_clip_config.json"))
        except ModelRefused:
            raise
        except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated, rate limited...
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise ModelRefused(f"{name}: the hub could not be asked about it ({reason})") from None
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:  # the config alone, checked like an allowed folder
            shutil.copy(config, Path(tmp) / "open_clip_config.json")
            (Path(tmp) / "open_clip_model.safetensors").touch()
            self.check_folder(Path(tmp), name)
        _ADMITTED_HUB.add(name)

    # -- while loading --
    @contextlib.contextmanager
    def loading(self, catalog_roots: Iterable[str | Path] = ()) -> Iterator[None]:
        """While loading a model, check every checkpoint folder the models layer reads (a ``base`` named
        in a config too): inside ``catalog_roots`` (the operator's folders) or an allowed directory."""
        from .models.loading import load_guard

        roots = [Path(r).resolve() for r in catalog_roots]

        def guard(folder: Path) -> None:
            try:
                path = Path(folder).resolve()
            except (OSError, RuntimeError, ValueError):
                raise refused(str(folder)) from None
            if inside(path, roots):
                return
            allowed = self._allowed_folder(str(path))
            if allowed is None:
                raise refused(str(folder))
            self.check_folder(allowed)

        with load_guard(None if self.open else guard):
            yield
