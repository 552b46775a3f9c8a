"""What every training objective provides to the training loop."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..attacks.base import parse_fraction
from ..registry import Registry

DEFENSES: Registry = Registry("defense")


class Task:
    """A training objective for one model.

    Subclasses set ``families`` and ``Config`` (a dataclass whose field defaults come from the paper,
    each with its source in a comment), and implement :meth:`collate` (records -> batch, runs in a
    data-loading worker, no model) and :meth:`loss` (batch -> scalar loss and named parts).
    """

    families: tuple[str, ...] = ()
    Config: type = dataclasses.make_dataclass("Config", [])
    # the training data when --data is not given (scenes with captions and questions for plain training)
    default_data: str = "shapes:shapes-scenes"

    def __init__(self, model: nn.Module, config: Any, data: Any) -> None:
        self.model = model
        self.config = config
        self.data = data
        self.base_digest: str | None = None  # weights digest of the model a partial checkpoint sits on

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def lr_scales(self) -> dict[int, float]:
        """``id(param) -> factor`` on the loop's learning rate, for parameters that should move slower
        or faster than the rest (none by default)."""
        return {}

    def modules_to_save(self) -> nn.Module:
        """The module whose weights make the checkpoint (the adapter's wrapped model by default)."""
        return self.model.model

    def checkpoint_module(self) -> nn.Module:
        """The module whose weights make the shipped ``model.safetensors`` (what :meth:`modules_to_save`
        snapshots for resuming may hold more, e.g. a teacher)."""
        return self.modules_to_save()

    def checkpoint_tensors(self) -> dict[str, torch.Tensor] | None:
        """Only these named tensors of the model go in the shipped ``model.safetensors`` - a *partial*
        checkpoint on top of the base model it names, whose weights digest is :attr:`base_digest` - or
        None for the whole :meth:`checkpoint_module`."""
        return None

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """The wrapped model's parameters that train (tied weights once): a partial checkpoint's tensors."""
        return {k: p for k, p in self.model.model.named_parameters() if p.requires_grad}

    def checkpoint_extra(self) -> dict[str, Any]:
        """Extra ``config.json`` entries the checkpoint needs to load (e.g. the prompts' shape)."""
        return {}

    def collate(self, records: list[dict[str, Any]], step: int) -> dict[str, Any]:
        raise NotImplementedError

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


def make_config(cls: type, overrides: dict[str, Any]) -> Any:
    """``cls(**overrides)`` with unknown keys and wrongly typed values reported clearly."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {cls.__qualname__}; "
                         f"valid: {', '.join(fields) or '(none)'}")
    values = {}
    for k, v in overrides.items():
        default = fields[k].default
        if isinstance(v, str) and default is not dataclasses.MISSING and not isinstance(default, str):
            try:
                if isinstance(default, bool):
                    v = {"true": True, "false": False}[v.lower()]
                elif isinstance(default, (int, float)):
                    number = parse_fraction(v)
                    if isinstance(default, int) and number != int(number):
                        raise ValueError(v)  # 5.5 steps: not silently 5
                    v = type(default)(number)
            except (ValueError, KeyError, ZeroDivisionError):
                raise ValueError(f"option {k}={v!r}: expected {'a whole number' if type(default) is int else 'a ' + type(default).__name__}") from None
        values[k] = v
    return cls(**values)
