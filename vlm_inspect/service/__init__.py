"""The inspection service: everything the page, the API and ``python -m vlm_inspect.inspect`` compute,
without gradio.

Modules, one job each: ``request`` (what an inspection asks for, its checks and the ranges the page
offers), ``catalog`` (which models and label sets are offered, and each suite's defaults), ``views``
(each model's outputs on an image, cached), ``outputs`` (those outputs as types, the images as shown,
batched captions and answers), ``inspection`` (one inspection and one robustness curve, step by step),
``summary`` (the verdict and the words of a report, shared by the page and the PNG report), ``check``
(the AutoAttack check of one image, per side) and ``core`` (:class:`InspectService`, the model cache and the entry points).
"""
from ..images import ImageError
from .catalog import DEFAULT_LABEL_SET, DEFAULT_QUESTION, ModelCatalog, label_sets
from .check import BUDGETS as CHECK_BUDGETS, check_markdown, check_text
from .core import AUTO_LOW_PRECISION_MIN_PARAMS, InspectService
from .inspection import Inspection
from .outputs import DISPLAY_SIZE, ClipOutputs, TextBatch, TextOutputs, amplify, image_digest
from .request import (CRAFTED_ON, CURVE_EPS_K, EPS_MAX_K, MAX_CLASS_CHARS, MAX_CLASSES, MAX_TEXT_CHARS, MOMENTUM_MAX, SIDES,
                      STEPS_MAX,
                      TOP_K_MAX, Cancelled, InputError, InspectRequest, make_attack, parse_classes, target_family,
                      targets)
from .transfer import matrix_markdown
from .summary import attack_text, side_entries, side_markdown, side_text, side_verdict

__all__ = [
    "AUTO_LOW_PRECISION_MIN_PARAMS", "attack_text", "CHECK_BUDGETS", "CRAFTED_ON", "CURVE_EPS_K", "check_markdown", "check_text", "Cancelled", "ClipOutputs", "DEFAULT_LABEL_SET",
    "DEFAULT_QUESTION", "DISPLAY_SIZE", "EPS_MAX_K", "ImageError", "InputError", "InspectRequest", "InspectService",
    "Inspection", "MAX_CLASSES", "MAX_CLASS_CHARS", "MAX_TEXT_CHARS", "MOMENTUM_MAX", "ModelCatalog", "SIDES", "STEPS_MAX",
    "TOP_K_MAX", "TextBatch", "TextOutputs", "amplify", "image_digest", "label_sets", "make_attack", "matrix_markdown",
    "parse_classes", "side_entries", "side_markdown", "side_text", "side_verdict", "target_family", "targets",
]
