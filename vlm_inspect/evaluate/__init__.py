"""``python -m vlm_inspect.evaluate``: clean and robust metrics, tables and plots."""
from .metrics import caption_scores, exact_match, vqa_accuracy
from .run import AttackSpec, evaluate, evaluate_model, parse_eps

__all__ = ["AttackSpec", "caption_scores", "evaluate", "evaluate_model", "exact_match", "parse_eps", "vqa_accuracy"]
