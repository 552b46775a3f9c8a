"""Training objectives: ``base`` (plain training of each family) and the published defenses.

Each entry is a :class:`~vlm_inspect.defenses.common.Task` subclass registered under its key with
the families it applies to; ``python -m vlm_inspect.train --defense KEY`` looks it up here.
"""
from .common import DEFENSES, Task
from . import advpt, apd, base, capt, fare, fgsm_decoder, prsl, tecoa, tga_zsr  # noqa: F401  (each module registers its defense)

__all__ = ["DEFENSES", "Task"]
