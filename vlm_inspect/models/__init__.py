"""Model adapters, presets and the shapes-world tokenizer.

>>> from vlm_inspect.models import load, list_presets
>>> clip = load("shapes-clip")          # trained weights from checkpoints/ when present
"""
from .base import Adapter, ConvStem, check_pixels
from .captioner import CaptionerAdapter
from .clip import ClipAdapter
from .presets import (FAMILIES, PRESETS, SUITES, ModelUnavailableError, Preset, checkpoints_dir, list_presets, load,
                      load_folder, preset_spec)
from .tokenizers import build_shapes_tokenizer, shapes_vocabulary, unknown_words
from .vqa import VqaAdapter

__all__ = [
    "Adapter", "CaptionerAdapter", "ClipAdapter", "ConvStem", "FAMILIES", "ModelUnavailableError", "PRESETS",
    "Preset", "SUITES", "VqaAdapter", "build_shapes_tokenizer", "check_pixels", "checkpoints_dir",
    "list_presets", "load", "load_folder", "preset_spec", "shapes_vocabulary", "unknown_words",
]
