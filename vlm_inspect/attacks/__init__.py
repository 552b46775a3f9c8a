"""FGSM, BIM and PGD in L-inf and L2 (DESIGN §3.3): ``atk(pixels, objective) -> AttackResult``."""
from .base import ATTACKS, Attack, AttackResult, model_guard
from .bim import BIM
from .fgsm import FGSM
from .pgd import PGD
from .projection import NORMS

__all__ = ["ATTACKS", "Attack", "AttackResult", "BIM", "FGSM", "NORMS", "PGD", "model_guard"]
