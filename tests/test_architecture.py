"""The structure holds (docs/ARCHITECTURE.md): one-way layers checked by import-linter, no import cycle,
ruff clean, registries that drive the page, the command lines and the service, and a repository
whose docs and docstrings point only at files it has."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not Path(path).exists():
        pytest.fail(f"{name} is not installed: pip install -r requirements-dev.txt")
    return path


def test_layers_contract_is_kept():
    out = subprocess.run([_tool("lint-imports")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "one-way layers KEPT" in out.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The contract can fail: a copy of the package whose models layer imports the service is refused."""
    shutil.copytree(ROOT / "vlm_inspect", tmp_path / "vlm_inspect", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    base = tmp_path / "vlm_inspect" / "models" / "base.py"
    base.write_text(base.read_text() + "\n\ndef _upward():\n    from ..service import InspectService  # noqa\n")
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([_tool("lint-imports")], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "BROKEN" in out.stdout, out.stdout + out.stderr
    assert "vlm_inspect.models.base -> vlm_inspect.service" in out.stdout


def test_no_import_cycle_between_modules():
    """No strongly connected group of modules in the import graph (lazy imports inside functions count)."""
    import grimp

    graph = grimp.build_graph("vlm_inspect")
    adj = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in adj[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    assert not cycles, cycles


def test_ruff_check_passes():
    out = subprocess.run([_tool("ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ---- registries are the source ---------------------------------------------------------------------

@pytest.fixture
def throwaway():
    """A throw-away attack and heatmap, registered the way a new module would register them, and removed
    after the test."""
    from vlm_inspect.attacks import ATTACKS, Attack
    from vlm_inspect.explain import HEATMAPS

    class Throwaway(Attack):
        """One signed-gradient step of half the budget (a test attack)."""

        name = "throwaway"

        def __init__(self, eps: float, norm: str = "linf") -> None:
            super().__init__(eps=eps, alpha=eps / 2 if isinstance(eps, float) else [e / 2 for e in eps],
                             steps=1, norm=norm)

    def centre_map(model, pixels, prompt, text_features, tokens=None):
        h, w = pixels.shape[-2:]
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        return (1 - (xs ** 2 + ys ** 2).sqrt().clamp(max=1)).expand(pixels.shape[0], h, w)

    ATTACKS.register("throwaway", Throwaway, label="THROWAWAY", paper="a test")
    HEATMAPS.register("centre", centre_map, label="a centred blob", uses_tokens=False)
    try:
        yield Throwaway
    finally:
        ATTACKS.unregister("throwaway")
        HEATMAPS.unregister("centre")


def _choices(parser, flag: str) -> list[str]:
    action = next(a for a in parser._actions if flag in a.option_strings)
    return list(action.choices or [])


def test_a_registered_attack_and_heatmap_are_offered_everywhere(throwaway, tmp_path):
    import gradio as gr

    from vlm_inspect import inspect as inspect_cli
    from vlm_inspect.evaluate import cli as evaluate_cli
    from vlm_inspect.service import InspectRequest, InspectService
    from vlm_inspect.ui import build_demo

    # the page
    service = InspectService(model_dirs=[])
    demo = build_demo(service)
    radios = {b.label: b for b in demo.blocks.values() if isinstance(b, gr.Radio)}
    assert "throwaway" in [c[0] for c in radios["Attack"].choices]
    heat = next(r for label, r in radios.items() if label.startswith("Heatmap"))
    assert "centre" in [c[0] for c in heat.choices] and "a centred blob" in heat.label
    steps = next(b for b in demo.blocks.values() if isinstance(b, gr.Slider) and b.label.startswith("Steps"))
    assert "THROWAWAY" not in steps.label  # it takes no steps setting
    demo.close()

    # the command lines
    parser = inspect_cli.build_parser()
    assert "throwaway" in _choices(parser, "--attack") and "centre" in _choices(parser, "--heatmap")
    assert "THROWAWAY (a test)" in next(a for a in parser._actions if "--attack" in a.option_strings).help
    args = evaluate_cli.build_parser().parse_args(["--models", "shapes-clip", "--attack", "throwaway,pgd",
                                                   "--eps", "4/255"])
    specs = evaluate_cli.attack_specs(args)
    assert [s.name for s in specs] == ["throwaway", "pgd"] and isinstance(specs[0].build(), throwaway)
    assert specs[0].describe()["steps"] == 1 and "restarts" not in specs[0].describe()

    # the service, end to end, and the headless twin
    fields = service.suite_fields(models={"baseline": {"captioner": None, "vqa": None},
                                          "defended": {"captioner": None, "vqa": None}}, question="")
    req = InspectRequest(**fields, attack="throwaway", heatmap="centre", eps_k=8)
    scene = sorted((Path(__file__).resolve().parents[1] / "assets").glob("shapes_*.png"))[0]
    rep = service.inspect(scene, req).report
    assert rep["attack"]["name"] == "throwaway" and rep["attack"]["steps"] == 1
    assert rep["heatmap"] == "centre"
    assert abs(rep["perturbation"]["sides"]["baseline"]["linf"] - 4 / 255) < 1e-6  # half the budget, one step
    out = tmp_path / "out"
    assert inspect_cli.main([str(scene), "--out", str(out), "--attack", "throwaway", "--heatmap", "centre",
                             "--baseline", "captioner=none,vqa=none", "--defended", "captioner=none,vqa=none"]) == 0
    assert (out / "report.png").is_file()


def test_task_choices_come_from_the_objectives():
    from vlm_inspect.objectives import OBJECTIVES
    from vlm_inspect.service import target_family, targets

    assert targets() == [n for n in OBJECTIVES.list() if OBJECTIVES.meta(n).get("inspects")]
    # what the service's own tables said before the registry carried it
    assert {t: target_family(t) for t in ("zero-shot", "caption", "vqa", "embedding")} == \
        {"zero-shot": "clip", "caption": "captioner", "vqa": "vqa", "embedding": "clip"}
    assert OBJECTIVES.meta("zero-shot")["metric"] == "p(clean top-1 class)"
    assert OBJECTIVES.meta("caption")["target_metric"] == "per-token p(target caption)"
    assert not OBJECTIVES.meta("embedding")["targetable"] and OBJECTIVES.meta("embedding")["needs_random_start"]
    for name in targets():
        meta = OBJECTIVES.meta(name)
        assert meta["family"] in (None, meta["inspects"])


def test_the_registries_hold_what_ships():
    """Parametrised tests shrink silently when a registration is lost: the shipped entries are pinned."""
    from vlm_inspect.attacks import ATTACKS
    from vlm_inspect.defenses import DEFENSES
    from vlm_inspect.explain import HEATMAPS
    from vlm_inspect.models import PRESETS

    assert {"fgsm", "bim", "pgd", "apgd", "square"} <= set(ATTACKS.list())
    assert {"attention", "gradcam"} <= set(HEATMAPS.list())
    assert {"base", "tecoa", "tga-zsr", "apd", "capt", "prsl", "ce", "fgsm-decoder"} <= set(DEFENSES.list())
    assert {"shapes-clip", "shapes-captioner", "shapes-vqa", "openai/ViT-B-32"} <= set(PRESETS)


def test_every_module_is_in_a_layer():
    import tomllib

    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    named = {m.strip().removeprefix("vlm_inspect.") for layer in layers for m in layer.split("|")}
    top = {p.stem if p.is_file() else p.name for p in (ROOT / "vlm_inspect").iterdir()
           if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").is_file())}
    assert top == named, top ^ named


# ---- the repository explains itself ----------------------------------------------------------------

_OUTSIDE = re.compile(r"DESIGN ?§|DESIGN\.md|PAPERS\.md|STYLE\.md|\.\./shared|seeds/")
# a document of the project: an upper-case name (README.md, docs/METHODS.md), not a file a test writes
_MD = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[A-Z][\w-]*\.md)\b")


def _sources() -> list[Path]:
    files = [p for d in ("vlm_inspect", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    return files + [ROOT / "app.py", ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_nothing_points_outside_the_repository():
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()[:100]}" for p in _sources() if p.name != "test_architecture.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if _OUTSIDE.search(line)]
    assert not hits, "\n".join(hits)


def test_every_markdown_file_named_exists():
    missing = []
    for p in _sources():
        if p.name == "test_architecture.py":
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            for name in _MD.findall(line):
                here = [ROOT / name, p.parent / name, ROOT / "docs" / name]
                if name.startswith("http") or any(c.is_file() for c in here):
                    continue
                missing.append(f"{p.relative_to(ROOT)}:{i}: {name}")
    assert not missing, "\n".join(missing)


# ---- packaging ---------------------------------------------------------------------------------------

def test_pyproject_declares_the_pinned_dependencies_and_the_commands():
    import importlib
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def name(req: str) -> str:
        return re.split(r"[<>=!~ ;\[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")

    pinned = {name(line) for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith(("#", "-"))}
    assert pinned == {name(d) for d in project["dependencies"]}
    scripts = project["scripts"]
    assert {"vlm-inspect", "vlm-inspect-image", "vlm-inspect-train", "vlm-inspect-evaluate"} <= set(scripts)
    for target in scripts.values():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func)), target


def test_console_script_runs():
    exe = shutil.which("vlm-inspect-evaluate")
    if exe is None:
        pytest.skip("the package is not installed with its console scripts (pip install -e .)")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--attack" in out.stdout, out.stderr
