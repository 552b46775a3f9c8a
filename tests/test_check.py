"""The "check with AutoAttack" of one image: per side, survives or broken (by which attack, at which step),
the warning when the chosen attack said "survives" but the ensemble broke the model, the API's answer and
its bad input."""
from __future__ import annotations

from pathlib import Path

import pytest

from vlm_inspect.service import CHECK_BUDGETS, InputError, InspectRequest, InspectService, check_markdown, label_sets

ROOT = Path(__file__).resolve().parents[1]
COMBO, TEMPLATE = label_sets()["shapes: colour + shape (48)"]
SCENE = ROOT / "assets" / "shapes_plain_3.png"


@pytest.fixture(scope="module")
def service():
    return InspectService(model_dirs=[])


def request(**kw) -> InspectRequest:
    base = dict(baseline={"clip": "shapes-clip"}, defended={"clip": "shapes-clip+tga-zsr"}, classes=COMBO,
                template=TEMPLATE, eps_k=4, steps=10)
    base.update(kw)
    return InspectRequest(**base)


def test_a_weak_attack_that_says_survives_is_contradicted(service):
    # one PGD step of 0.25/255 from the clean image: far too weak to break anything at 8/255
    seen = []
    res = service.check(SCENE, request(eps_k=8, steps=1, alpha_k=0.25, random_start=False),
                        progress=lambda f, what: seen.append((f, what)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] <= 1  # the bar only moves on
    assert any("defended: APGD-CE" in what for _, what in seen)
    assert res["budget"] == "quick" and res["settings"] == CHECK_BUDGETS["quick"].describe()
    for side, e in res["sides"].items():
        assert e["survives"] is (e["broken_by"] is None) and e["clean_top1"] in COMBO
        assert [s["attack"] for s in e["stages"]][0] == "APGD-CE"
    base = res["sides"]["baseline"]
    assert not base["survives"] and base["chosen"] == {"attack": "pgd", "survives": True}
    assert base["adversarial_top1"] != base["clean_top1"] and isinstance(base["broken_at"], int)
    assert "PGD said shapes-clip survives" in base["warning"]
    text = check_markdown(res, "baseline")
    assert "is broken at 8/255 linf by" in text and "overstates robustness" in text


def test_a_side_without_clip_and_bad_input(service):
    res = service.check(SCENE, request(eps_k=0, defended={"captioner": "shapes-captioner"}))
    assert list(res["sides"]) == ["baseline"] and res["sides"]["baseline"]["survives"]  # eps 0 breaks nothing
    assert "no zero-shot model" in check_markdown(res, "defended") and "survives" in check_markdown(res, "baseline")
    with pytest.raises(InputError, match="unknown AutoAttack budget 'huge'"):
        service.check(SCENE, request(), budget="huge")
    with pytest.raises(InputError, match="select one on either side"):
        service.check(SCENE, request(baseline={"captioner": "shapes-captioner"}, defended={}, target="caption"))
    with pytest.raises(InputError, match="epsilon"):
        service.check(SCENE, request(eps_k=99))


def test_the_api_returns_the_same_verdict(app_url, service):
    from gradio_client import Client, handle_file

    c = Client(app_url, verbose=False, download_files=False)
    res = c.predict(handle_file(str(SCENE)), eps=8.0, steps=2, api_name="/check")
    assert set(res["sides"]) == {"baseline", "defended"}
    here = service.check(SCENE, request(eps_k=8, steps=2, defended={"clip": res["sides"]["defended"]["model"]}))
    for side in ("baseline", "defended"):
        a, b = res["sides"][side], here["sides"][side]
        assert (a["model"], a["survives"], a["broken_by"], a["broken_at"]) == (b["model"], b["survives"],
                                                                                b["broken_by"], b["broken_at"])
    with pytest.raises(Exception, match="unknown AutoAttack budget"):
        c.predict(handle_file(str(SCENE)), budget="huge", api_name="/check")


def test_the_headless_twin_writes_the_check(tmp_path, capsys):
    import json

    from vlm_inspect import inspect as inspect_cli

    assert inspect_cli.main([str(SCENE), "--out", str(tmp_path), "--eps", "0", "--steps", "1", "--check", "quick",
                             "--baseline", "captioner=none,vqa=none", "--defended", "captioner=none,vqa=none"]) == 0
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["budget"] == "quick" and all(e["survives"] for e in check["sides"].values())
    out = capsys.readouterr().out
    assert "baseline: AutoAttack (quick budget" in out and "survives at 0/255 linf" in out
