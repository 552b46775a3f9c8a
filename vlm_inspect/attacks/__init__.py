"""FGSM, BIM, PGD, APGD and Square in L-inf and L2, and two threat models without a budget (typographic,
patch): ``atk(pixels, objective) -> AttackResult`` (docs/ARCHITECTURE.md,
"Attacks"). Each attack is one module that registers its class in :data:`ATTACKS`;
``ATTACKS.build(name, eps=..., steps=..., ...)`` constructs any of them from one set of settings.

Adding an attack: a module here whose class subclasses :class:`Attack` and is decorated with
``@ATTACKS.register("name", label=..., paper=...)``, plus its import line below.
"""
from .base import ATTACKS, Attack, AttackResult, eps_label, model_guard, parse_eps
# registration order is the order the page and the help texts offer them: weakest first
from .fgsm import FGSM
from .bim import BIM
from .pgd import PGD
from .apgd import APGD
from .square import Square
# no epsilon: the region is the budget (registered with bounded=False)
from .typographic import Typographic
from .patch import Patch
from .projection import NORMS

__all__ = ["APGD", "ATTACKS", "Attack", "AttackResult", "BIM", "FGSM", "NORMS", "PGD", "Patch", "Square", "Typographic", "eps_label", "model_guard", "parse_eps"]


def attack_help() -> str:
    """The registered attacks with their papers, for help texts: ``FGSM (Goodfellow et al. 2015), ...``."""
    return ", ".join(ATTACKS.describe(name) for name in ATTACKS.list())


def taking(setting: str) -> str:
    """The attacks that take ``setting``, by label, for help texts: ``taking("steps")`` -> "BIM, PGD, ..."."""
    return ", ".join(ATTACKS.meta(a).get("label", a.upper()) for a in ATTACKS.list() if setting in ATTACKS.parameters(a))


BOOSTER_HELP = {"momentum": "transfer booster MI: momentum decay, 1.0 is MI-FGSM's; 0 = off",
                "diversity": "transfer booster DI: probability of the random resize-and-pad, 0.5 is DI's; 0 = off"}


def booster_help(setting: str) -> str:
    """The command lines' help for a transfer booster (``momentum``, ``diversity``), with the attacks taking it."""
    return f"{BOOSTER_HELP[setting]} ({taking(setting)})"


def is_randomised(name: str) -> bool:
    """Whether the attack ``name`` can start at random (so restarts differ)."""
    return "random_start" in ATTACKS.parameters(name)


def is_bounded(name: str) -> bool:
    """Whether the attack ``name`` works inside an epsilon ball (typographic and patch attacks do not)."""
    return ATTACKS.meta(name).get("bounded", True)


def add_region_arguments(parser, word_help: str, patch_side: float):
    """The command lines' settings of the attacks without an epsilon (``inspect``, ``evaluate``), one group."""
    from .placement import POSITIONS
    from .typographic import DEFAULT_FONT

    g = parser.add_argument_group("attacks without an epsilon (--attack typographic or patch)")
    g.add_argument("--word", default="", help=f"typographic: {word_help}")
    g.add_argument("--text-size", type=float, default=0.2, help="typographic: letter height, fraction of the image side")
    g.add_argument("--colour", default="white", help="typographic: a colour name or #rrggbb")
    g.add_argument("--opacity", type=float, default=1.0, help="typographic: more than 0, at most 1")
    g.add_argument("--font", default=DEFAULT_FONT, help="typographic: a font matplotlib ships, by file name")
    g.add_argument("--position", default="auto", choices=list(POSITIONS),
                   help="where the word or patch goes: auto (the attack's search: the worst cell of a 3x3 grid), "
                        "random, or a grid cell")
    g.add_argument("--patch-side", type=float, default=patch_side, help="patch: side, fraction of the image side")
    return g
