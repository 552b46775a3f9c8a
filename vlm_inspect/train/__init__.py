"""``python -m vlm_inspect.train``: train a baseline or reproduce a defense (see ``--help``)."""
from .loop import TrainConfig, train

__all__ = ["TrainConfig", "train"]
