"""The README stays true: its tour runs, its example prints what it says."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tour_runs():
    text = (ROOT / "README.md").read_text()
    tour = text[text.index("## A one-screen tour"):]
    blocks = re.findall(r"```python\n(.*?)```", tour, flags=re.S)
    assert blocks, "README's tour has no python block"
    exec(compile(blocks[0], "README.md", "exec"), {})


def test_readme_setup_commands():
    text = (ROOT / "README.md").read_text()
    assert "pip install -r requirements-dev.txt && python -m pytest" in text
    assert re.search(r"^pip install -r requirements.txt && python app.py$", text, flags=re.M)


def test_quickstart_example_prints_sensible_output():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(":", 1) for line in out.stdout.strip().splitlines())
    assert set(lines) >= {"true class ", "clean top-3", "adv top-3  ", "attack     ", "loss       ",
                          "attention shift (L2, TGA-ZSR)"}
    assert "a photo of a" in lines["true class "]
    linf = float(re.search(r"\|delta\|_inf = ([\d.]+)/255", lines["attack     "]).group(1))
    assert 0 < linf <= 4.0 + 1e-3
    before, after = map(float, lines["loss       "].split("->"))
    assert after > before


@pytest.mark.parametrize("doc", ["README.md", "docs/REPRODUCTION.md", "docs/BASELINES.md", "docs/ATTACK_STUDIES.md"])
def test_documented_train_and_evaluate_commands_parse(doc):
    """Every `python -m vlm_inspect.train|evaluate ...` line in the docs uses options that exist, and
    every --set KEY names an option of its defense."""
    import shlex

    from vlm_inspect.defenses import DEFENSES
    from vlm_inspect.evaluate import cli as evaluate_cli
    from vlm_inspect.train import cli as train_cli

    from vlm_inspect.reproduce import cli as reproduce_cli
    from vlm_inspect.reproduce.manifest import find

    text = (ROOT / doc).read_text()
    lines = re.findall(r"-m vlm_inspect\.(train|evaluate|reproduce) ([^`\n]*)", text)
    assert lines
    for module, rest in lines:
        argv = shlex.split(rest.replace("\\", ""), comments=True)
        if "--help" in argv:
            continue
        if module == "reproduce":  # its options exist and the manifests it names are in reproduce/
            args = reproduce_cli.build_parser().parse_args(argv)
            for name in args.manifests:
                if not name.startswith("<"):  # a placeholder in prose
                    find(name)
            continue
        parser = (train_cli if module == "train" else evaluate_cli).build_parser()
        args = parser.parse_args(argv)  # exits (fails the test) on an unknown option
        if module == "train":
            fields = DEFENSES.get(args.defense).Config.__dataclass_fields__
            for item in args.options:
                assert item.split("=")[0] in fields, (doc, item)
