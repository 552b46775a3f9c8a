"""Data specs -> datasets, for training and evaluation (``--data``).

Specs:

* ``shapes:<dataset>[@style]`` — the procedural shapes world (``docs/SHAPES_WORLD.md``)
* ``imagefolder:<dir>`` — one sub-folder per class; the Tiny-ImageNet layout (``wnids.txt``,
  ``words.txt``, ``train/<wnid>/images``, ``val/images`` + ``val/val_annotations.txt``) is recognised
* ``coco:<images_dir>,<captions.json>`` — COCO captions annotation file
* ``flickr8k:<images_dir>,<Flickr8k.token.txt>`` — ``image.jpg#k<TAB>caption`` lines
* ``vqav2:<images_dir>,<questions.json>,<annotations.json>`` — VQA v2 files

Every dataset yields dicts with ``image`` (PIL image or HxWx3 uint8) and, by kind, ``label``,
``caption`` / ``captions`` (all references), ``question`` / ``answer`` / ``answers``. Classification
sets also expose ``classes`` and ``prompts``. Problems raise :class:`DataError` with one sentence
naming the path and what was expected.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
KINDS = ("classification", "captions", "vqa", "scenes")


class DataError(ValueError):
    """A data spec or data file is unusable; the message names it and says what was expected."""


@dataclass
class Dataset:
    """A list-backed dataset of records; ``load_image`` turns a record's image reference into pixels."""

    name: str
    kind: str
    records: list[dict[str, Any]]
    classes: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    loader: Callable[[Any], Any] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = dict(self.records[i])
        if self.loader is not None:
            rec["image"] = self.loader(rec["image"])
        return rec


def _open_image(path: Any):
    from ..images import ImageError, load_image

    try:
        return load_image(path)
    except ImageError as e:
        raise DataError(str(e)) from e


def _need_dir(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataError(f"{what} {p} does not exist or is not a folder")
    return p


def _need_file(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{what} {p} does not exist or is not a file")
    return p


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not a valid {what} JSON file: {e}") from e


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _class_prompt(name: str) -> str:
    name = name.replace("_", " ").replace("-", " ").replace("/", " ").strip().lower()
    return f"a photo of a {name}"  # CLIP's own template, article included


# ---- formats -----------------------------------------------------------------------------------

def image_folder(root: str, split: str = "train") -> Dataset:
    """Class-per-folder images, or the Tiny-ImageNet layout (detected by ``wnids.txt``)."""
    base = _need_dir(root, "image folder")
    if (base / "wnids.txt").is_file():
        return _tiny_imagenet(base, split)
    if (base / split).is_dir() and not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in base.iterdir()):
        base = base / split
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"image folder {base} has no class sub-folders (expected <dir>/<class>/<image>)")
    records = [{"image": str(p), "label": i} for i, c in enumerate(classes) for p in _images_in(base / c)]
    return Dataset(f"imagefolder:{root}", "classification", records, classes, [_class_prompt(c) for c in classes],
                   _open_image)


def _tiny_imagenet(base: Path, split: str) -> Dataset:
    wnids = [w.strip() for w in (base / "wnids.txt").read_text().splitlines() if w.strip()]
    if not wnids:
        raise DataError(f"{base / 'wnids.txt'} lists no classes")
    names = {}
    if (base / "words.txt").is_file():
        for line in (base / "words.txt").read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2:
                names[parts[0]] = parts[1].split(",")[0].strip()
    classes = [names.get(w, w) for w in wnids]
    index = {w: i for i, w in enumerate(wnids)}
    records: list[dict[str, Any]] = []
    if split == "train":
        for w in wnids:
            folder = base / "train" / w / "images"
            records += [{"image": str(p), "label": index[w]} for p in _images_in(folder)]
    else:
        ann = _need_file(str(base / "val" / "val_annotations.txt"), "Tiny-ImageNet validation annotations")
        for line in ann.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 2:
                continue
            if parts[1] not in index:
                raise DataError(f"{ann}: class {parts[1]!r} is not in wnids.txt")
            records.append({"image": str(base / "val" / "images" / parts[0]), "label": index[parts[1]]})
    return Dataset(f"imagefolder:{base}", "classification", records, classes, [_class_prompt(c) for c in classes],
                   _open_image)


def coco_captions(images_dir: str, captions_json: str) -> Dataset:
    folder = _need_dir(images_dir, "COCO images folder")
    data = _read_json(_need_file(captions_json, "COCO captions file"), "COCO captions")
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DataError(f"{captions_json} is not a COCO captions file (expected 'images' and 'annotations')")
    caps: dict[Any, list[str]] = {}
    for a in data["annotations"]:
        caps.setdefault(a["image_id"], []).append(str(a["caption"]).strip())
    records = [{"image": str(folder / im["file_name"]), "caption": caps[im["id"]][0], "captions": caps[im["id"]]}
               for im in data["images"] if im["id"] in caps]
    return Dataset(f"coco:{images_dir}", "captions", records, loader=_open_image)


def flickr8k(images_dir: str, token_file: str) -> Dataset:
    folder = _need_dir(images_dir, "Flickr8k images folder")
    path = _need_file(token_file, "Flickr8k captions file")
    caps: dict[str, list[str]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line or "#" not in line.split("\t")[0]:
            raise DataError(f"{path} line {n} is not '<image>#<k><TAB><caption>' (Flickr8k.token.txt format)")
        key, cap = line.split("\t", 1)
        caps.setdefault(key.rsplit("#", 1)[0], []).append(cap.strip())
    records = [{"image": str(folder / k), "caption": v[0], "captions": v} for k, v in caps.items()]
    return Dataset(f"flickr8k:{images_dir}", "captions", records, loader=_open_image)


def vqav2(images_dir: str, questions_json: str, annotations_json: str) -> Dataset:
    folder = _need_dir(images_dir, "VQA v2 images folder")
    qs = _read_json(_need_file(questions_json, "VQA v2 questions file"), "VQA v2 questions")
    anns = _read_json(_need_file(annotations_json, "VQA v2 annotations file"), "VQA v2 annotations")
    if "questions" not in qs or "annotations" not in anns:
        raise DataError(f"expected VQA v2 files with 'questions' and 'annotations' ({questions_json}, {annotations_json})")
    by_qid = {a["question_id"]: a for a in anns["annotations"]}
    files = {}
    for p in _images_in(folder):
        digits = "".join(ch for ch in p.stem.rsplit("_", 1)[-1] if ch.isdigit())
        if digits:
            files[int(digits)] = p
    records = []
    for q in qs["questions"]:
        a = by_qid.get(q["question_id"])
        if a is None:
            continue
        if q["image_id"] not in files:
            raise DataError(f"no image for image_id {q['image_id']} in {folder} (expected e.g. "
                            f"COCO_val2014_{q['image_id']:012d}.jpg)")
        answers = [x["answer"] for x in a.get("answers", [])] or [a["multiple_choice_answer"]]
        records.append({"image": str(files[q["image_id"]]), "question": q["question"],
                        "answer": a["multiple_choice_answer"], "answers": answers})
    return Dataset(f"vqav2:{images_dir}", "vqa", records, loader=_open_image)


# ---- the door ----------------------------------------------------------------------------------

FORMATS = ("shapes", "imagefolder", "coco", "flickr8k", "vqav2")
_MIXTURE_SPLIT = re.compile(r"\+(?=(?:" + "|".join(FORMATS) + r"):)")  # "a+b": split before each spec


def shapes_kind(name: str) -> str:
    return "scenes" if name.startswith("shapes-scenes") else "classification"


class Mixture:
    """Several data sets interleaved item by item (``spec1+spec2``): item i comes from set ``i % k``."""

    def __init__(self, parts: list) -> None:
        self.parts = parts
        self.kind = "scenes" if any(p.kind == "scenes" for p in parts) else parts[0].kind
        self.classes, self.prompts = [], []
        self.name = "+".join(getattr(p, "name", "") for p in parts)

    def __len__(self) -> int:
        return min(len(p) for p in self.parts) * len(self.parts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        k = len(self.parts)
        return self.parts[i % k][i // k]


def open_data(spec: str, split: str = "train", *, seed: int = 0, length: int | None = None,
              image_size: int = 64, shots: int | None = None):
    """Open a data spec (see module docstring). ``shots`` keeps K samples per class (classification)
    or K samples in all (other kinds), chosen deterministically from ``seed``. ``a+b`` interleaves
    several specs (e.g. ``shapes:shapes-scenes+shapes:shapes-combo``)."""
    parts = _MIXTURE_SPLIT.split(spec)
    if len(parts) > 1:
        return Mixture([open_data(p, split, seed=seed, length=length, image_size=image_size, shots=shots)
                        for p in parts])
    if ":" not in spec:
        raise DataError(f"data spec {spec!r} needs a format prefix: one of {', '.join(f + ':' for f in FORMATS)}")
    fmt, rest = spec.split(":", 1)
    args = [a for a in rest.split(",")]
    if fmt == "shapes":
        from .shapes import ShapesDataset

        try:
            ds = ShapesDataset(rest, split=split, seed=seed, length=length or (10**8 if split == "train" else 1000),
                               image_size=image_size)
        except ValueError as e:
            raise DataError(f"data spec {spec!r}: {e}") from e
        ds.kind = shapes_kind(rest)
    elif fmt == "imagefolder" and len(args) == 1:
        ds = image_folder(args[0], split)
    elif fmt == "coco" and len(args) == 2:
        ds = coco_captions(*args)
    elif fmt == "flickr8k" and len(args) == 2:
        ds = flickr8k(*args)
    elif fmt == "vqav2" and len(args) == 3:
        ds = vqav2(*args)
    elif fmt in FORMATS:
        want = {"imagefolder": "imagefolder:<dir>", "coco": "coco:<images_dir>,<captions.json>",
                "flickr8k": "flickr8k:<images_dir>,<Flickr8k.token.txt>",
                "vqav2": "vqav2:<images_dir>,<questions.json>,<annotations.json>"}[fmt]
        raise DataError(f"data spec {spec!r} has the wrong number of parts; expected {want}")
    else:
        raise DataError(f"unknown data format {fmt!r} in {spec!r}; valid: {', '.join(FORMATS)}")
    if len(ds) == 0:
        raise DataError(f"data set {spec!r} is empty")
    if shots:
        ds = few_shot(ds, shots, seed)
    elif length is not None and fmt != "shapes" and length < len(ds):
        ds = Subset(ds, list(range(length)))
    return ds


class Subset:
    """A view of some indices of a dataset, keeping its kind, classes and prompts."""

    def __init__(self, base, indices: Sequence[int]) -> None:
        self.base, self.indices = base, list(indices)
        self.kind = base.kind
        self.classes = list(getattr(base, "classes", []))
        self.prompts = list(getattr(base, "prompts", []))
        self.name = getattr(base, "name", "")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.base[self.indices[i]]


def few_shot(ds, shots: int, seed: int = 0, pool: int | None = None) -> Subset:
    """K samples per class for classification sets (class-balanced), else K samples in all."""
    if shots < 1:
        raise DataError(f"--shots must be >= 1, got {shots}")
    rng = random.Random(seed)
    n = len(ds)
    if getattr(ds, "kind", "") != "classification":
        idx = list(range(min(n, pool or n)))
        rng.shuffle(idx)
        return Subset(ds, sorted(idx[:shots]))
    # ShapesDataset knows a sample's label without rendering it; other sets read the record
    label_of = ds.label if hasattr(ds, "label") else (lambda i: ds.records[i]["label"])
    limit = min(n, pool or (shots * len(ds.classes) * 4 if hasattr(ds, "label") else n))
    per: dict[int, list[int]] = {}
    for i in range(limit):
        per.setdefault(int(label_of(i)), []).append(i)
    chosen: list[int] = []
    for y in sorted(per):
        idx = per[y]
        rng.shuffle(idx)
        chosen += idx[:shots]
    return Subset(ds, sorted(chosen))
