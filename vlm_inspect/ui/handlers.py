"""The page's listeners as plain functions: widget values in, widget values out. No torch math here:
everything goes through :class:`~vlm_inspect.service.InspectService`."""
from __future__ import annotations

import functools
import logging
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from ..checkpoints import CheckpointError, file_sha256
from ..images import ImageError, load_image
from .serve import IMAGE_SUFFIXES  # one list for the upload route and the handlers
from ..models import FAMILIES, PHOTO_CLIP, ModelUnavailableError
from ..report import render_png, write_json
from ..runtime import inside
from ..service import (attack_text, DEFAULT_LABEL_SET, DEFAULT_QUESTION, SIDES, Cancelled, InputError, InspectRequest,
                       InspectService, Inspection, label_sets, matrix_markdown, side_entries, side_markdown)

NONE = "(none)"
PERSON_ERRORS = (InputError, ImageError, ModelUnavailableError, CheckpointError)


def person_error(e: Exception) -> gr.Error:
    """A message for the page (a modal), never a stack trace."""
    return gr.Error(str(e), title="Cannot run this inspection")


def guarded(fn: Callable[..., Any], what: str = "inspection") -> Callable[..., Any]:
    """Turn a person's mistake into a message; an unexpected failure gets a short message too, and is
    logged in full on the server, which keeps serving."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Cancelled as e:  # nobody is waiting for an answer
            logging.getLogger(__name__).info("%s", e)
            raise gr.Error(str(e), title="Cancelled") from None
        except PERSON_ERRORS as e:
            raise person_error(e) from None
        except Exception as e:  # noqa: BLE001 - the server must keep serving
            logging.getLogger(__name__).exception("%s failed", what)
            raise gr.Error(f"the {what} failed unexpectedly ({type(e).__name__}: {e}); see the server log",
                           title="Internal error") from None
    return wrapper


def model_value(name: str | None) -> str | None:
    return None if not name or name == NONE else name


def build_request(models: dict[str, dict[str, str | None]], attack: str, norm: str, eps_k: Any, steps: Any,
                  alpha_k: Any, random_start: bool, seed: Any, target: str, classes: str | list[str], template: str,
                  question: str, target_text: str, heatmap: str, momentum: Any = 0.0,
                  diversity: Any = 0.0, crafted_on: str = "own", word: str = "", text_size: Any = 0.2,
                  colour: str = "white", opacity: Any = 1.0, font: str = "", position: str = "auto",
                  patch_side: Any = 0.2, patch: Any = None, assets: str | Path | None = None) -> InspectRequest:
    """A validated :class:`InspectRequest` from the page's (or the API's) values, taken as they are (the
    page always shows what it sends; the API fills empty fields with :meth:`InspectService.suite_fields`).
    ``word`` ... ``patch`` set the attacks without an epsilon; ``patch`` is an uploaded image (read as
    :func:`request_image` reads one)."""
    region = {k: v for k, v in (("text_size", text_size), ("opacity", opacity), ("patch_side", patch_side),
                                ("colour", colour), ("font", font), ("position", position)) if v not in (None, "")}
    return InspectRequest(
        word=word or "", patch=request_image(patch, assets) if patch else None, **region,
        baseline={f: model_value(models["baseline"].get(f)) for f in FAMILIES},
        defended={f: model_value(models["defended"].get(f)) for f in FAMILIES},
        attack=attack, norm=norm, eps_k=eps_k, steps=steps, alpha_k=alpha_k if alpha_k is not None else 0,
        random_start=bool(random_start), seed=seed if seed is not None else 0, target=target,
        classes=classes or "", template=template or "{}", question=question or "", target_text=target_text or "",
        heatmap=heatmap, momentum=momentum if momentum is not None else 0.0,
        diversity=diversity if diversity is not None else 0.0, crafted_on=crafted_on or "own",
    ).validate()


def verdict_markdown(report: dict[str, Any], side: str) -> str:
    v = report.get("verdicts", {}).get(side)
    if v is None:
        return ""
    colour = "#b91c1c" if v["fooled"] else "#15803d"  # a coloured dot: emoji fonts are not everywhere
    return f"#### <span style='color:{colour}'>●</span> {v['text']}"


def label_value(report: dict[str, Any], side: str, which: str) -> dict[str, float] | None:
    clip = side_entries(report, side).get("clip")
    zs = clip[1].get(which, {}).get("zero_shot") if clip else None
    return dict(zip(zs["labels"], zs["probs"])) if zs else None


def perturbation_markdown(report: dict[str, Any]) -> str:
    a = report["attack"]
    parts = [f"**{attack_text(a)}**, objective: {a['target']}"
             + (f", target “{a['target_text']}”" if a["targeted"] else " (untargeted)")]
    for side, p in report["perturbation"]["sides"].items():
        where = f", at {p['position']} ({p['area']:.1%} of the pixels)" if "area" in p else ""
        parts.append(f"{side}: ‖δ‖∞ = {p['linf'] * 255:.2f}/255, ‖δ‖₂ = {p['l2']:.3f}{where}")
    parts.append(f"{report['seconds']:.2f} s")
    return " · ".join(parts)


def warnings_markdown(inspection_or_warnings) -> str:
    warnings = getattr(inspection_or_warnings, "warnings", inspection_or_warnings) or []
    return "\n".join(f"⚠️ {w}" for w in warnings)


OUTPUT_IMAGES = ["clean"] + [f"{k}/{s}" for s in SIDES for k in ("adversarial", "perturbation")] + \
    [f"heatmap/{s}/{w}" for s in SIDES for w in ("clean", "adversarial")]


def inspection_outputs(ins: Inspection) -> list[Any]:
    """Values for the page's result widgets, in the order :func:`layout.build_demo` lists them."""
    rep = ins.report
    out: list[Any] = [ins.images.get(k) for k in OUTPUT_IMAGES]
    out.append(perturbation_markdown(rep))
    for side in SIDES:
        out += [verdict_markdown(rep, side), label_value(rep, side, "clean"), label_value(rep, side, "adversarial"),
                side_markdown(rep, side)]
    out.append(matrix_markdown(rep))
    out.append(warnings_markdown(ins))
    return out


def export(ins: Inspection | None) -> tuple[str, str]:
    """Write the current inspection as report.png + report.json in a fresh temporary folder."""
    if ins is None:
        raise gr.Error("nothing to export yet: run an inspection first")
    global _EXPORTS
    if _EXPORTS is None or not _EXPORTS.is_dir():  # private to this process (mkdtemp: mode 0700)
        _EXPORTS = Path(tempfile.mkdtemp(prefix="vlm_inspect_exports_"))
    root = _EXPORTS
    for old in root.iterdir():  # Gradio serves a copy from its own cache: ours are not needed for long
        try:
            if old.stat().st_mtime < time.time() - EXPORT_TTL_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    folder = Path(tempfile.mkdtemp(prefix="export_", dir=root))
    return str(render_png(ins, folder / "report.png")), str(write_json(ins, folder / "report.json"))


EXPORT_TTL_S = 600
_EXPORTS: Path | None = None


def models_from_widgets(values: list[str | None]) -> dict[str, dict[str, str | None]]:
    """``[b_clip, b_cap, b_vqa, d_clip, d_cap, d_vqa]`` -> ``{"baseline": {...}, "defended": {...}}``."""
    n = len(FAMILIES)
    return {"baseline": dict(zip(FAMILIES, values[:n])), "defended": dict(zip(FAMILIES, values[n:2 * n]))}


def model_choices(service: InspectService, suite: str, family: str) -> list[str]:
    return [NONE] + service.models(family, suite)


def dropdown_updates(service: InspectService, suite: str, current: list[str | None] | None = None) -> list[dict]:
    """Choices (re-read from disk) and values for the six model dropdowns. On a refresh (``current``
    given) the current values are kept, typed-in names too; otherwise the suite's defaults are used."""
    d = service.defaults(suite)
    ups = []
    for i, (side, fam) in enumerate((s, f) for s in SIDES for f in FAMILIES):
        choices = model_choices(service, suite, fam)
        keep = current[i] if current and current[i] else None
        ups.append(gr.update(choices=choices, value=keep or d[side][fam] or NONE))
    return ups


def label_set_values(name: str) -> tuple[str, str]:
    sets = label_sets()
    if name not in sets:
        raise gr.Error(f"unknown class preset {name!r}")
    labels, template = sets[name]
    return ", ".join(labels), template


def suite_defaults(suite: str) -> tuple[str, str, str, str]:
    """Class preset, classes, template and question for a suite."""
    name = DEFAULT_LABEL_SET[suite]
    return (name, *label_set_values(name), DEFAULT_QUESTION[suite])


MAX_IMAGE_BYTES = 50_000_000
NOT_AN_UPLOAD = ("send the image itself as a file upload (in Python: gradio_client.handle_file(path)); "
                 "this server does not open paths on its own disk")


def request_image(value: Any, assets: str | Path | None = None):
    """The image a request sent, decoded: a file Gradio stored from an upload (or one of the shipped
    samples), never any other path on the server. Every other path gets the same sentence, whether it
    exists or not, and the file is opened without following links or waiting on a pipe."""
    from gradio.utils import get_upload_folder

    path = value.get("path") if isinstance(value, dict) else getattr(value, "path", value)
    orig = value.get("orig_name") if isinstance(value, dict) else getattr(value, "orig_name", None)
    if not path:
        raise InputError("no image was sent: upload one or pick a sample")
    path = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(path, str) or "\x00" in path:
        raise InputError(NOT_AN_UPLOAD)
    roots = [os.path.realpath(get_upload_folder())] + ([os.path.realpath(assets)] if assets else [])
    lexical, real = os.path.abspath(path), os.path.realpath(path)
    if not (inside(lexical, roots) and inside(real, roots)):
        raise InputError(NOT_AN_UPLOAD)
    name = Path(str(orig)).name if orig else Path(path).name
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise InputError(NOT_AN_UPLOAD) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InputError(NOT_AN_UPLOAD)
        if Path(name).suffix.lower() not in IMAGE_SUFFIXES and Path(path).suffix.lower() not in IMAGE_SUFFIXES:
            raise ImageError(f"{name[:80]!r} is not an image file: upload a PNG, JPEG, WebP, BMP, GIF or TIFF image")
        if st.st_size > MAX_IMAGE_BYTES:
            raise ImageError(f"{name[:80]!r} is {st.st_size / 1e6:.0f} MB; images of at most "
                             f"{MAX_IMAGE_BYTES / 1e6:.0f} MB are inspected")
        data = f.read(MAX_IMAGE_BYTES + 1)
    return load_image(data, name=name)


def api_inspect(service: InspectService, image: Any, args: dict[str, Any],
                cancelled: Callable[[], bool] | None = None) -> dict[str, Any]:
    """The ``/inspect`` API: arguments as :func:`layout.build_demo`'s ``inspect_api`` documents them."""
    return service.inspect(request_image(image), api_request(service, args), cancelled=cancelled).report


def api_check(service: InspectService, image: Any, args: dict[str, Any],
              cancelled: Callable[[], bool] | None = None) -> dict[str, Any]:
    """The ``/check`` API: the ``/inspect`` arguments plus ``budget`` (quick or standard)."""
    return service.check(request_image(image), api_request(service, args), str(args.get("budget") or "quick"),
                         cancelled=cancelled)


def api_request(service: InspectService, args: dict[str, Any]) -> InspectRequest:
    """The request of an API call: its models ("default", "none" or a name) and empty fields filled in."""
    models: dict[str, dict[str, str | None]] = {"baseline": {}, "defended": {}}
    for side in SIDES:
        for fam in FAMILIES:
            v = str(args.get(f"{side}_{fam}") or "default")
            if v != "default":
                models[side][fam] = None if v.lower() == "none" else v
    f = service.suite_fields(args.get("suite") or "embedded", models, args["classes"], args["template"],
                             args["question"] or None)
    return build_request({"baseline": f["baseline"], "defended": f["defended"]}, args["attack"], args["norm"],
                        args["eps"], args["steps"], args["step_size"], args["random_start"], args["seed"],
                        args["target"], f["classes"], f["template"], f["question"], args["target_text"],
                        args["heatmap"], args.get("momentum", 0.0), args.get("diversity", 0.0),
                        args.get("crafted_on") or "own", args.get("word") or "", args.get("text_size"),
                        args.get("colour"), args.get("opacity"), args.get("font"), args.get("position"),
                        args.get("patch_side"), args.get("patch"))


def patch_side_of(path: Any, assets: str | Path | None = None):
    """The patch-side slider after a patch image is uploaded: the side its PNG records (a patch saved by
    ``evaluate --attack patch --universal``), or unchanged."""
    from ..attacks.patch import load_patch

    if not path:
        return gr.update()
    _, side = load_patch(request_image(path, assets))
    return gr.update(value=side) if side is not None else gr.update()


def client_gone(demo: gr.Blocks, request: gr.Request | None) -> Callable[[], bool]:
    """True once the client of this queued job has disconnected (Gradio marks its job not alive)."""
    session = getattr(request, "session_hash", None) if request is not None else None

    def gone() -> bool:
        queue = getattr(demo, "_queue", None)
        if queue is None or session is None:
            return False
        jobs = [e for job in getattr(queue, "active_jobs", []) if job for e in job
                if getattr(e, "session_hash", None) == session]
        return bool(jobs) and not any(getattr(e, "alive", True) for e in jobs)

    return gone


PHOTO_LABEL_SET = "everyday objects (12)"


def _file_digest(path: str | Path) -> str | None:
    try:
        p = Path(path)
        if p.stat().st_size > 20_000_000:
            return None
        return file_sha256(p)
    except (OSError, TypeError):
        return None


@functools.lru_cache(maxsize=4)
def _sample_digests(assets: str) -> dict[str, str]:
    """sha256 of each shipped sample -> ``"photo"`` or ``"shapes"``."""
    out = {}
    for kind, pattern in (("photo", "photo_*.jpg"), ("shapes", "shapes_*.png")):
        for p in sorted(Path(assets).glob(pattern)):
            digest = _file_digest(p)
            if digest:
                out[digest] = kind
    return out


def sample_kind(path: str | None, assets: str | Path) -> str | None:
    """``"photo"`` / ``"shapes"`` when ``path`` holds one of the shipped samples (by content: Gradio hands
    the page a copy), else None."""
    digest = _file_digest(path) if path else None
    return _sample_digests(str(assets)).get(digest) if digest else None


def image_kind(path: str | None, assets: str | Path) -> str | None:
    """``"photo"`` or ``"shapes"`` for an image the page holds: a shipped sample by its content, anything
    else by :func:`vlm_inspect.data.scene_kind.is_shapes_scene`; None when it cannot be read."""
    if not path:
        return None
    kind = sample_kind(path, assets)
    if kind is not None:
        return kind
    from ..data.scene_kind import is_shapes_scene

    try:
        return "shapes" if is_shapes_scene(request_image(path, assets)) else "photo"
    except (InputError, ImageError):
        return None  # the inspection will say what is wrong with it


def on_image(service: InspectService, assets: str | Path, path: str | None, suite: str, baseline_clip: str | None,
             defended_clip: str | None, label_set: str, classes: str | None = None) -> list[Any]:
    """A new image in the embedded suite: a photo (a photo sample, or an upload that is not a shapes-world
    scene) switches the zero-shot model to the ConSE photo model (the shapes models know only the shapes
    world; there is no defended ConSE, so the defended side's zero-shot model is cleared) and the class
    preset to everyday objects; a shapes scene switches back. Models the person chose and classes they
    typed are kept, and the pretrained suite is left as it is. Returns updates for the two zero-shot
    dropdowns, the class preset, classes and template."""
    keep = [gr.skip()] * 5
    kind = image_kind(path, assets) if suite == "embedded" else None
    if kind is None:
        return keep
    defaults = service.defaults(suite)["baseline"]["clip"], service.defaults(suite)["defended"]["clip"]
    chosen_models = (model_value(baseline_clip) not in (None, defaults[0], PHOTO_CLIP)
                     or model_value(defended_clip) not in (None, defaults[1]))
    sets = label_sets()
    typed_classes = classes is not None and label_set in sets and \
        [c.strip() for c in classes.split(",") if c.strip()] != sets[label_set][0]
    if kind == "photo":
        ups = [gr.skip()] * 2 if chosen_models or baseline_clip == PHOTO_CLIP else \
            [gr.update(value=PHOTO_CLIP), gr.update(value=NONE)]
        if label_set == PHOTO_LABEL_SET or typed_classes:
            return ups + [gr.skip()] * 3
        return ups + [gr.update(value=PHOTO_LABEL_SET), *label_set_values(PHOTO_LABEL_SET)]
    if baseline_clip != PHOTO_CLIP:
        return keep
    name = DEFAULT_LABEL_SET[suite]
    ups = [gr.update(value=defaults[0] or NONE), gr.update(value=defaults[1] or NONE)]
    if typed_classes or label_set == name:
        return ups + [gr.skip()] * 3
    return ups + [gr.update(value=name), *label_set_values(name)]
