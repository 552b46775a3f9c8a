"""Model adapters, the preset table, builders and the one loading door.

>>> from vlm_inspect.models import load, list_presets
>>> clip = load("shapes-clip")          # trained weights from checkpoints/ when present

Modules: ``base`` (what every adapter shares), ``clip`` / ``conse`` / ``captioner`` / ``vqa`` /
``prompted`` (the adapters), ``attention`` (the text-guided map of a CLIP adapter's tokens),
``architectures`` (the presets' architecture dicts), ``tokenizers`` (built in code; tokenizer
references), ``builders`` (how each kind of model is built and wrapped), ``presets`` (the table, as
data), ``loading`` (:func:`load` and every checkpoint folder it reads), ``fetch`` (local copies).
"""
from ..runtime import checkpoints_dir
from .base import Adapter, ConvStem, ModelUnavailableError, check_pixels
from .captioner import CaptionerAdapter
from .clip import ClipAdapter
from .loading import load, load_folder
from .presets import FAMILIES, PHOTO_CLIP, PRESETS, SUITES, Preset, list_presets, preset_spec
from .tokenizers import build_shapes_tokenizer, shapes_vocabulary, unknown_words
from .vqa import VqaAdapter

__all__ = [
    "Adapter", "CaptionerAdapter", "ClipAdapter", "ConvStem", "FAMILIES", "ModelUnavailableError", "PHOTO_CLIP",
    "PRESETS", "Preset", "SUITES", "VqaAdapter", "build_shapes_tokenizer", "check_pixels", "checkpoints_dir",
    "list_presets", "load", "load_folder", "preset_spec", "shapes_vocabulary", "unknown_words",
]
