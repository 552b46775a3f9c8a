"""The page in a real browser: Debian's Chromium driven by playwright (never `playwright install`).

Uploads an image, runs an inspection, drags the epsilon slider, waits for the new results and checks
that the adversarial heatmap and predictions changed and that no error is shown; then runs the AutoAttack
check and finds a verdict next to each side. The screenshot goes
to ``docs/screenshot.png`` (the one in the README) when ``VLM_INSPECT_SCREENSHOT=1``, else to a
temporary folder.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def ensure_chromium() -> str:
    """Debian's chromium, installed with apt-get if missing (CI starts from a clean machine)."""
    if not Path(CHROMIUM).exists():
        apt = shutil.which("apt-get")
        if apt is None:
            pytest.fail("the browser test needs Debian's chromium (apt-get install chromium); no apt-get here")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        subprocess.run([*sudo, apt, "update", "-qq"], check=False, env=env, capture_output=True)
        r = subprocess.run([*sudo, apt, "install", "-y", "-qq", "--no-install-recommends", "chromium"],
                           env=env, capture_output=True, text=True)
        if r.returncode != 0 or not Path(CHROMIUM).exists():
            pytest.fail(f"could not install chromium with apt-get: {r.stderr[-500:]}")
    return CHROMIUM


@contextlib.contextmanager
def opened_page(width: int, height: int):
    """A Chromium page of ``width`` x ``height``, closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=ensure_chromium(), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": width, "height": height})
        yield page
        browser.close()


def goto(page, url: str) -> None:
    from playwright.sync_api import expect

    page.goto(url, wait_until="domcontentloaded")  # not networkidle: the page keeps a live connection
    expect(page.locator("#run")).to_be_visible(timeout=60_000)


def run_on_the_photo_model(page):
    """After a photo was picked: the classes switch to everyday objects; run; the baseline's text names
    the ConSE model. Returns the baseline text's locator."""
    import re

    from playwright.sync_api import expect

    expect(page.locator("#classes textarea")).to_have_value(re.compile(r"\bcat\b"), timeout=30_000)
    page.locator("#run").click()
    expect(page.locator("#sizes")).to_contain_text("eps 4/255", timeout=120_000)
    text = page.locator("#text-baseline")
    expect(text).to_contain_text("conse/efficientnet-lite0-minilm", timeout=30_000)
    return text


def _results(page) -> dict[str, str]:
    return {
        "heat_adv": page.locator("#heat-baseline-adversarial img").first.get_attribute("src") or "",
        "label_adv": page.locator("#label-baseline-adversarial").inner_text(),
        "text": page.locator("#text-baseline").inner_text(),
        "sizes": page.locator("#sizes").inner_text(),
    }


def test_upload_slide_epsilon_and_see_results_change(app_url, tmp_path):
    from playwright.sync_api import expect

    shot = ROOT / "docs" / "screenshot.png" if os.environ.get("VLM_INSPECT_SCREENSHOT") == "1" \
        else tmp_path / "screenshot.png"
    with opened_page(1600, 1300) as page:
        requests: list[str] = []  # nothing may leave the machine, not even web fonts
        page.on("request", lambda r: requests.append(r.url))
        goto(page, app_url)
        page.locator("#input-image input[type=file]").set_input_files(str(ROOT / "assets" / "shapes_plain_3.png"))
        expect(page.locator("#input-image img").first).to_be_visible(timeout=30_000)
        page.locator("#run").click()
        expect(page.locator("#sizes")).to_contain_text("eps 4/255", timeout=120_000)
        expect(page.locator("#heat-baseline-adversarial img").first).to_be_visible(timeout=30_000)
        first = _results(page)
        assert "purple triangle" in page.locator("#label-baseline-clean").inner_text()
        # the transfer matrix: each side's image shown to both sides' models
        expect(page.locator("#transfer")).to_contain_text("Transfer matrix", timeout=30_000)
        assert page.locator("#transfer table tr").count() == 3  # a header and two rows: crafted on each side
        assert "crafted on baseline" in page.locator("#transfer").inner_text()

        # drag the epsilon slider from 4/255 to about 16/255 and release it: the page re-runs by itself
        slider = page.locator("#eps input[type=range]")
        box = slider.bounding_box()
        y = box["y"] + box["height"] / 2
        page.mouse.move(box["x"] + box["width"] * 4 / 32, y)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 16 / 32, y, steps=8)
        page.mouse.up()
        expect(page.locator("#sizes")).not_to_contain_text("eps 4/255", timeout=120_000)
        page.wait_for_function(
            "(old) => { const i = document.querySelector('#heat-baseline-adversarial img');"
            " return i && i.getAttribute('src') !== old; }", arg=first["heat_adv"], timeout=60_000)
        second = _results(page)
        assert second["heat_adv"] != first["heat_adv"], "the adversarial heatmap did not change"
        assert second["label_adv"] != first["label_adv"], "the adversarial predictions did not change"
        assert page.locator(".toast-body.error, .toast-wrap .error").count() == 0, "the page shows an error"

        # the AutoAttack check: a verdict next to each side's result
        page.locator("#check").click()
        for side in ("baseline", "defended"):
            expect(page.locator(f"#check-{side}")).to_contain_text("AutoAttack (quick budget", timeout=120_000)
        assert "is broken at" in page.locator("#check-baseline").inner_text()
        assert page.locator(".toast-body.error, .toast-wrap .error").count() == 0, "the check shows an error"

        # crafted on the other side's model: each side now shows the image made against the other
        page.locator("#crafted-on").get_by_text("the other side's model").click()
        page.locator("#run").click()
        expect(page.locator("#verdict-baseline")).to_contain_text("crafted on the defended model", timeout=120_000)
        assert "crafted on the baseline model" in page.locator("#verdict-defended").inner_text()
        assert page.locator(".toast-body.error, .toast-wrap .error").count() == 0, "the transfer run shows an error"
        page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000
    outside = [u for u in requests if not u.startswith((app_url, "data:", "blob:"))]
    assert len(requests) > len(outside) and not outside, f"the page requested outside URLs: {outside[:5]}"


def test_a_corrupt_upload_shows_a_message_and_the_page_still_works(app_url, tmp_path):
    from playwright.sync_api import expect

    bad = tmp_path / "broken.png"
    good = (ROOT / "assets" / "shapes_plain_11.png").read_bytes()
    bad.write_bytes(good[: len(good) // 4])  # a truncated PNG: the browser may still preview part of it
    with opened_page(1500, 1200) as page:
        goto(page, app_url)
        page.locator("#input-image input[type=file]").set_input_files(str(bad))
        page.wait_for_timeout(1000)
        page.locator("#run").click()
        expect(page.get_by_text("truncated").first).to_be_visible(timeout=60_000)
        # the server keeps serving: a good image goes through afterwards
        page.reload(wait_until="domcontentloaded")
        expect(page.locator("#run")).to_be_visible(timeout=60_000)
        page.locator("#input-image input[type=file]").set_input_files(str(ROOT / "assets" / "shapes_plain_11.png"))
        expect(page.locator("#input-image img").first).to_be_visible(timeout=30_000)
        page.locator("#run").click()
        expect(page.locator("#label-baseline-clean")).to_contain_text("orange circle", timeout=120_000)


def test_a_photo_sample_is_inspected_with_the_conse_photo_model(app_url):
    """Clicking a photo sample switches zero-shot to ConSE and the classes to everyday objects; the
    inspection then calls the cat a cat, says the model is not CLIP and shows the ImageNet classes."""

    from playwright.sync_api import expect

    with opened_page(1600, 1300) as page:
        goto(page, app_url)
        page.locator("img[src$='photo_chelsea.jpg']").first.click()
        text = run_on_the_photo_model(page)
        expect(text).to_contain_text("not CLIP")
        expect(text).to_contain_text("ImageNet classes behind it")
        assert page.locator("#label-baseline-clean").inner_text().split("\n")[1].strip() == "cat"


ROW = ["clean", "adv-baseline", "pert-baseline", "adv-defended", "pert-defended"]


def test_a_photo_upload_is_inspected_with_the_photo_model_and_the_page_reads_at_a_glance(app_url, tmp_path):
    """A photo that is not one of the samples: zero-shot switches to ConSE and everyday objects, the
    shapes captioner says it knows only the shapes world, each side has a verdict, the five images stay
    on one row at 1280 and 1920 px, and the empty export and curve panels are collapsed."""
    import re

    import matplotlib
    from playwright.sync_api import expect

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    shot = ROOT / "docs" / "screenshot_photo.png" if os.environ.get("VLM_INSPECT_SCREENSHOT") == "1" \
        else tmp_path / "photo.png"
    with opened_page(1280, 1000) as page:
        goto(page, app_url)
        page.locator("#input-image input[type=file]").set_input_files(str(photo))
        text = run_on_the_photo_model(page)
        expect(text).to_contain_text("shapes-captioner knows only the shapes world")
        expect(page.locator("#verdict-baseline")).to_contain_text(re.compile(r"fooled|held"))
        assert page.locator(".toast-body.error, .toast-wrap .error").count() == 0, "the page shows an error"
        for width in (1280, 1920):
            page.set_viewport_size({"width": width, "height": 1000})
            page.wait_for_timeout(500)
            tops = [page.locator(f"#{e}").bounding_box()["y"] for e in ROW]
            assert max(tops) - min(tops) < 2, (width, tops)  # one row, not wrapped
            assert not page.locator("#curve").is_visible() and not page.locator("#export-btn").is_visible()
        page.set_viewport_size({"width": 1280, "height": 1000})
        page.wait_for_timeout(300)
        page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000


def test_the_typographic_attack_writes_a_word_and_an_empty_word_gets_one_sentence(app_url, tmp_path):
    """Choosing the typographic attack opens its panel; an empty word is refused in one sentence and the
    page keeps working; a word is written on each side's image, the sizes line names the threat model
    (no epsilon), and the verdicts and the transfer matrix follow as for any attack."""
    from playwright.sync_api import expect

    shot = tmp_path / "typographic.png"
    with opened_page(1600, 1300) as page:
        goto(page, app_url)
        page.locator("#input-image input[type=file]").set_input_files(str(ROOT / "assets" / "shapes_plain_3.png"))
        expect(page.locator("#input-image img").first).to_be_visible(timeout=30_000)
        page.get_by_label("typographic").check()
        expect(page.locator("#typo-word textarea")).to_be_visible(timeout=10_000)  # its panel opened
        page.locator("#run").click()
        expect(page.get_by_text("needs a word to write").first).to_be_visible(timeout=60_000)
        page.locator("#typo-word textarea").fill("red star")
        page.locator("#run").click()
        expect(page.locator("#sizes")).to_contain_text("TYPOGRAPHIC “red star”", timeout=120_000)
        sizes = page.locator("#sizes").inner_text()
        assert "eps" not in sizes and "% of the pixels" in sizes
        for side in ("baseline", "defended"):
            assert page.locator(f"#verdict-{side}").inner_text().strip()
        expect(page.locator("#transfer")).to_contain_text("Transfer matrix", timeout=30_000)
        page.locator("#clean").scroll_into_view_if_needed()  # typing in the panel scrolled down; images load lazily
        for e in ROW:  # the written image on each side, next to the clean one
            expect(page.locator(f"#{e} img").first).to_be_visible(timeout=30_000)
        expect(page.locator("#heat-baseline-adversarial img").first).to_be_visible(timeout=30_000)
        page.screenshot(path=str(shot), full_page=True)

        # a saved universal patch loads back: the side slider takes the side its PNG records, and it is applied
        from vlm_inspect.attacks.patch import save_patch

        save_patch(torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(0)), tmp_path / "patch.png", 0.1)
        page.get_by_label("patch", exact=True).check()
        page.locator("#patch-image input[type=file]").set_input_files(str(tmp_path / "patch.png"))
        expect(page.locator("#patch-side input[type=number]")).to_have_value("0.1", timeout=30_000)
        page.locator("#run").click()
        expect(page.locator("#sizes")).to_contain_text("PATCH side 0.1 (1.0% of the image), a given patch",
                                                       timeout=120_000)
        errors = [t for t in page.locator(".toast-body.error").all_inner_texts() if "needs a word" not in t]
        assert not errors, errors  # the empty word's message may still be showing; nothing else
    assert shot.stat().st_size > 50_000
