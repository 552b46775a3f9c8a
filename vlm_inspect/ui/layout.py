"""The page: one Gradio Blocks layout, its listeners wired to :mod:`handlers`, and the ``/inspect`` API."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
from gradio import FileData

from ..attacks import ATTACKS, NORMS, is_bounded, taking as _taking
from ..attacks.placement import POSITIONS
from ..attacks.typographic import DEFAULT_FONT, available_fonts
from ..explain import HEATMAPS
from ..models import FAMILIES, SUITES
from ..report import curve_figure
from ..service import (CHECK_BUDGETS, CRAFTED_ON, CURVE_EPS_K, EPS_MAX_K, MOMENTUM_MAX, SIDES, STEPS_MAX, InspectService,
                       check_markdown, label_sets, targets)
from . import handlers as H
from .serve import UPLOAD_TTL_S

ASSETS = Path(__file__).resolve().parents[2] / "assets"
FAMILY_TITLES = {"clip": "CLIP (zero-shot)", "captioner": "Captioner", "vqa": "VQA"}
COLOURS = ["white", "black", "red", "green", "blue", "yellow"]
FONTS = [f for f in available_fonts() if f.startswith("DejaVu")] or [DEFAULT_FONT]
CONCURRENCY = {"concurrency_id": "models", "concurrency_limit": 1}  # one model computation at a time

INTRO = """# vlm_inspect
Upload an image (or pick a sample), choose an attack and slide **epsilon**: each side's model is
attacked white-box on the chosen task (or, with **Crafted on**, the other side's model or both at once),
and every model of that side is shown the result; the **transfer matrix** shows each crafted image to
both sides. Release the slider to re-run; clean results are cached. Budgets are in k/255 of the pixel range; for L2 the
radius is k/255·√(pixel values), the same root-mean-square change per pixel as L∞ at the same k.
The shapes models know only their procedural world: a photo (a sample or your own) switches
zero-shot to **ConSE**, a real ImageNet classifier + sentence encoder that works offline; for
captions and answers about photos, switch **Models → Model suite** to *pretrained*.
"""


def sample_images() -> list[str]:
    return [str(p) for p in sorted(ASSETS.glob("shapes_*.png")) + sorted(ASSETS.glob("photo_*.jpg"))]


def build_demo(service: InspectService, upload_ttl_s: int = UPLOAD_TTL_S) -> gr.Blocks:
    """The inspection page for ``service`` (models live in the service, never in ``gr.State``); uploads
    and exports are deleted ``upload_ttl_s`` after they were made."""
    suite0 = service.suite
    preset0, classes0, template0, question0 = H.suite_defaults(suite0)
    defaults = service.defaults(suite0)

    with gr.Blocks(title="vlm_inspect", analytics_enabled=False,
                   delete_cache=(max(1, min(300, upload_ttl_s // 2)), upload_ttl_s)) as demo:
        gr.Markdown(INTRO)
        last = gr.State(None)  # the last Inspection (data only: images and report), for export
        with gr.Row():
            with gr.Column(scale=1, min_width=340):
                image = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 height=240, elem_id="input-image")
                samples = sample_images()
                if samples:
                    gr.Examples(examples=[[p] for p in samples], inputs=[image], label="Samples",
                                examples_per_page=len(samples))
                with gr.Accordion("Models", open=False):
                    suite = gr.Radio(list(SUITES), value=suite0, label="Model suite")
                    dropdowns = []
                    for side in SIDES:
                        gr.Markdown(f"**{side.capitalize()}**")
                        for fam in FAMILIES:
                            dropdowns.append(gr.Dropdown(H.model_choices(service, suite0, fam),
                                                         value=defaults[side][fam] or H.NONE,
                                                         label=f"{side} {FAMILY_TITLES[fam]}",
                                                         allow_custom_value=True,
                                                         elem_id=f"model-{side}-{fam}"))
                    gr.Markdown("Pick a model or type one: a checkpoint folder, or for CLIP an open_clip "
                                "`hf-hub:<org>/<repo>` name (e.g. a published robust CLIP as the defended model); "
                                "a LLaVA with another CLIP's vision encoder is `<llava>|tower=<CLIP>` "
                                "(e.g. `llava-hf/llava-1.5-7b-hf|tower=hf-hub:chs20/fare2-clip`). "
                                "Pretrained weights download on first use; offline, start the app with "
                                "`--weights-dir` (see `python -m vlm_inspect.models.fetch --help`).")
                    refresh = gr.Button("↻ Refresh model lists", size="sm", elem_id="refresh-models")
                attack = gr.Radio(ATTACKS.list(), value="pgd", label="Attack")
                crafted_on = gr.Radio([(text, key) for key, text in CRAFTED_ON.items()], value="own",
                                      label="Crafted on (each side's image)", elem_id="crafted-on")
                eps = gr.Slider(0, EPS_MAX_K, value=4, step=0.5, label="Epsilon (k/255)", elem_id="eps")
                with gr.Accordion("Attack settings", open=False):
                    norm = gr.Radio(list(NORMS), value="linf", label="Norm")
                    steps = gr.Slider(1, STEPS_MAX, value=10, step=1, label=f"Steps ({_taking('steps')})")
                    alpha = gr.Slider(0, EPS_MAX_K, value=0, step=0.25,
                                      label="Step size (k/255; 0 = 2.5·eps/steps)")
                    with gr.Row():
                        random_start = gr.Checkbox(True, label=f"Random start ({_taking('random_start')})")
                        seed = gr.Number(0, precision=0, minimum=0, label="Seed")
                    # transfer boosters (attacks/boosters.py): off at 0; the labels name the attacks taking them
                    with gr.Row():
                        momentum = gr.Slider(0, MOMENTUM_MAX, value=0, step=0.1, elem_id="momentum",
                                             label=f"Momentum, MI ({_taking('momentum')}; 1 = MI-FGSM, 0 = off)")
                        diversity = gr.Slider(0, 1, value=0, step=0.1, elem_id="diversity",
                                              label=f"Input diversity, DI ({_taking('diversity')}; 0.5 = DI, 0 = off)")
                    check_budget = gr.Radio(list(CHECK_BUDGETS), value="quick", elem_id="check-budget",
                                            label="AutoAttack check budget (quick: seconds; standard: the "
                                                  "reference's, about a minute per side)")
                # the attacks without an epsilon (typographic, patch): open when one of them is chosen
                with gr.Accordion("Typographic and patch attacks (no epsilon)", open=False,
                                  elem_id="region-panel") as region_panel:
                    word = gr.Textbox(label="Word to write (typographic; empty = the target class)",
                                      placeholder="e.g. a wrong class", elem_id="typo-word")
                    with gr.Row():
                        text_size = gr.Slider(0.05, 0.5, value=0.2, step=0.01, elem_id="typo-size",
                                              label="Letter height (fraction of the image side)")
                        opacity = gr.Slider(0.1, 1, value=1, step=0.05, label="Opacity", elem_id="typo-opacity")
                    with gr.Row():
                        colour = gr.Dropdown(COLOURS, value="white", allow_custom_value=True, elem_id="typo-colour",
                                             label="Colour (a name or #rrggbb)")
                        font = gr.Dropdown(FONTS, value=DEFAULT_FONT, label="Font (shipped with matplotlib)",
                                           elem_id="typo-font")
                    position = gr.Dropdown(list(POSITIONS), value="auto", elem_id="region-position",
                                           label="Position (auto: the worst cell of a 3x3 grid for the word; for "
                                                 "the patch, moved at random while optimised, then the worst cell)")
                    patch_side = gr.Slider(0.02, 0.5, value=0.2, step=0.01, elem_id="patch-side",
                                           label="Patch side (fraction of the image side)")
                    patch_image = gr.Image(label="Patch image (optional): apply it instead of optimising one, "
                                                 "e.g. a universal patch from evaluate", type="filepath",
                                           image_mode=None, sources=["upload"], height=100, elem_id="patch-image")
                target = gr.Radio(targets(), value="zero-shot", label="Attack objective (task)")
                target_text = gr.Textbox(label="Target (optional): a class, caption or answer for a targeted attack",
                                         placeholder="empty = untargeted")
                with gr.Accordion("Prompts and question", open=True):
                    label_set = gr.Dropdown(list(label_sets()), value=preset0, label="Class presets")
                    classes = gr.Textbox(classes0, lines=2, max_lines=6, label="Classes (comma-separated)",
                                         elem_id="classes")
                    template = gr.Textbox(template0, label="Prompt template ({} = class)")
                    question = gr.Textbox(question0, label="VQA question", elem_id="question")
                    heatmap = gr.Radio(HEATMAPS.list(), value="attention",
                                       label=f"Heatmap ({', or '.join(HEATMAPS.meta(h).get('label', h) for h in HEATMAPS.list())})")
                with gr.Row():
                    run = gr.Button("Inspect", variant="primary", elem_id="run")
                    check_btn = gr.Button("Check with AutoAttack", elem_id="check")
            with gr.Column(scale=3):
                warnings = gr.Markdown(elem_id="warnings")
                with gr.Row():
                    # five images side by side down to a 1280-px window (Gradio's default min width wraps them)
                    img_kw: dict[str, Any] = {"format": "png", "height": 180, "interactive": False, "min_width": 100,
                                              "buttons": ["fullscreen", "download"]}
                    clean_img = gr.Image(label="Clean", elem_id="clean", **img_kw)
                    adv_b = gr.Image(label="Adv. baseline", elem_id="adv-baseline", **img_kw)
                    pert_b = gr.Image(label="δ baseline (amplified)", elem_id="pert-baseline", **img_kw)
                    adv_d = gr.Image(label="Adv. defended", elem_id="adv-defended", **img_kw)
                    pert_d = gr.Image(label="δ defended (amplified)", elem_id="pert-defended", **img_kw)
                sizes = gr.Markdown(elem_id="sizes")
                heat, labels, texts, verdicts, checks = {}, {}, {}, {}, {}
                with gr.Row():
                    for side in SIDES:
                        with gr.Column():
                            gr.Markdown(f"### {side.capitalize()}")
                            verdicts[side] = gr.Markdown(elem_id=f"verdict-{side}")
                            checks[side] = gr.Markdown(elem_id=f"check-{side}")
                            with gr.Row():
                                for w in ("clean", "adversarial"):
                                    heat[side, w] = gr.Image(label=f"Heatmap ({w})", elem_id=f"heat-{side}-{w}",
                                                             **{**img_kw, "height": 200})
                            with gr.Row():
                                for w in ("clean", "adversarial"):
                                    labels[side, w] = gr.Label(num_top_classes=5, label=f"Zero-shot top-5 ({w})",
                                                               elem_id=f"label-{side}-{w}")
                            texts[side] = gr.Markdown(elem_id=f"text-{side}")
                transfer_md = gr.Markdown(elem_id="transfer")
                # empty until used: collapsed, so the results read at a glance
                with gr.Accordion("Export PNG + JSON", open=False, elem_id="export-panel"):
                    export_btn = gr.Button("Export PNG + JSON", size="sm", elem_id="export-btn")
                    with gr.Row():
                        png_file = gr.File(label="report.png", interactive=False, height=80)
                        json_file = gr.File(label="report.json", interactive=False, height=80)
                with gr.Accordion("Robustness curve", open=False, elem_id="curve-panel"):
                    curve_btn = gr.Button(f"Robustness curve (eps {', '.join(f'{e:g}' for e in CURVE_EPS_K)} /255)",
                                          size="sm", elem_id="curve-btn")
                    curve_plot = gr.Plot(label="Robustness curve", elem_id="curve")

        settings = [attack, norm, eps, steps, alpha, random_start, seed, target, classes, template, question,
                    target_text, heatmap, momentum, diversity, crafted_on, word, text_size, colour, opacity, font,
                    position, patch_side, patch_image]
        result_widgets = ([clean_img, adv_b, pert_b, adv_d, pert_d,
                           heat["baseline", "clean"], heat["baseline", "adversarial"],
                           heat["defended", "clean"], heat["defended", "adversarial"], sizes]
                          + [w for s in SIDES for w in (verdicts[s], labels[s, "clean"], labels[s, "adversarial"],
                                                       texts[s])]
                          + [transfer_md, warnings])
        # the image order inside result_widgets must follow handlers.OUTPUT_IMAGES
        assert len(result_widgets) == len(H.OUTPUT_IMAGES) + 1 + 4 * len(SIDES) + 2

        def request_from(values: list[Any]):
            _suite, *rest = values  # the suite only decides what the dropdowns offer
            return H.build_request(H.models_from_widgets(rest[:6]), *rest[6:], assets=ASSETS)

        def on_inspect(request: gr.Request, img, suite_v, *rest, progress=gr.Progress()):
            if not img:
                raise gr.Error("upload an image or pick a sample first", title="No image")
            req = request_from([suite_v, *rest])
            ins = service.inspect(H.request_image(img, ASSETS), req, progress=lambda f, d: progress(f, desc=d),
                                  cancelled=H.client_gone(demo, request))
            return [*H.inspection_outputs(ins), ins]

        def on_curve(request: gr.Request, img, suite_v, *rest, progress=gr.Progress()):
            if not img:
                raise gr.Error("upload an image or pick a sample first", title="No image")
            req = request_from([suite_v, *rest])
            return curve_figure(service.curve(H.request_image(img, ASSETS), req,
                                              progress=lambda f, d: progress(f, desc=d),
                                              cancelled=H.client_gone(demo, request)))

        def on_check(request: gr.Request, img, budget, suite_v, *rest, progress=gr.Progress()):
            if not img:
                raise gr.Error("upload an image or pick a sample first", title="No image")
            req = request_from([suite_v, *rest])
            res = service.check(H.request_image(img, ASSETS), req, budget, progress=lambda f, d: progress(f, desc=d),
                                cancelled=H.client_gone(demo, request))
            return [check_markdown(res, side) for side in SIDES]

        inputs = [image, suite, *dropdowns, *settings]
        run_fn = H.guarded(on_inspect)
        run.click(run_fn, inputs, [*result_widgets, last], api_visibility="private", **CONCURRENCY)
        eps.release(run_fn, inputs, [*result_widgets, last], api_visibility="private", trigger_mode="always_last",
                    **CONCURRENCY)
        check_btn.click(H.guarded(on_check, "AutoAttack check"), [image, check_budget, *inputs[1:]],
                        [checks[s] for s in SIDES], api_visibility="private", **CONCURRENCY)
        # a new inspection clears the last check: it was made for other settings
        for trigger in (run.click, eps.release):
            trigger(lambda: [""] * len(SIDES), None, [checks[s] for s in SIDES], api_visibility="private")
        curve_btn.click(H.guarded(on_curve, "robustness curve"), inputs, [curve_plot], api_visibility="private",
                        **CONCURRENCY)
        export_btn.click(H.guarded(H.export, "export"), [last], [png_file, json_file], api_visibility="private")
        attack.change(lambda a: gr.update() if is_bounded(a) else gr.update(open=True), [attack], [region_panel],
                      api_visibility="private")
        patch_image.upload(H.guarded(lambda p: H.patch_side_of(p, ASSETS), "patch image"), [patch_image],
                           [patch_side], api_visibility="private")
        label_set.change(H.label_set_values, [label_set], [classes, template], api_visibility="private")

        clip_dropdowns = [dropdowns[FAMILIES.index("clip")], dropdowns[len(FAMILIES) + FAMILIES.index("clip")]]
        image.change(H.guarded(lambda *v: H.on_image(service, ASSETS, *v), "image check"),
                     [image, suite, *clip_dropdowns, label_set, classes],
                     [*clip_dropdowns, label_set, classes, template], api_visibility="private")

        def on_suite(suite_v):
            return [*H.dropdown_updates(service, suite_v), *H.suite_defaults(suite_v)]

        suite.change(H.guarded(on_suite, "suite change"), [suite], [*dropdowns, label_set, classes, template, question],
                     api_visibility="private")
        refresh.click(H.guarded(lambda s, *cur: H.dropdown_updates(service, s, list(cur)), "refresh"),
                      [suite, *dropdowns], dropdowns,
                      api_visibility="private")

        def inspect_api(image: FileData, attack: str = "pgd", eps: float = 4.0, steps: int = 10, norm: str = "linf",
                        step_size: float = 0.0, random_start: bool = True, seed: int = 0, target: str = "zero-shot",
                        classes: str = "", template: str = "", question: str = "", target_text: str = "",
                        heatmap: str = "attention", suite: str = "embedded",
                        baseline_clip: str = "default", baseline_captioner: str = "default",
                        baseline_vqa: str = "default", defended_clip: str = "default",
                        defended_captioner: str = "default", defended_vqa: str = "default",
                        momentum: float = 0.0, diversity: float = 0.0, crafted_on: str = "own",
                        word: str = "", text_size: float = 0.2, colour: str = "white", opacity: float = 1.0,
                        font: str = DEFAULT_FONT, position: str = "auto", patch_side: float = 0.2,
                        patch: FileData | None = None, request: gr.Request = None) -> dict:
            """One inspection; returns the JSON report (its fields are described in the README). eps and
            step_size are in k/255. Model arguments: a model name, "default" (the suite's default) or
            "none". Empty classes, template or question use the suite's defaults. momentum and diversity
            are the transfer boosters MI and DI (0 = off); crafted_on is "own" (white-box per side),
            "other" (each side shown the image crafted on the other side's model) or "ensemble"; the
            report's "transfer" holds the matrix. word ... patch set the attacks without an epsilon
            ("typographic": word, text_size and patch_side are fractions of the image side, colour,
            opacity, font, position; "patch": patch_side, position, and patch, an image to apply instead
            of optimising one). The image (and the patch) must be an upload (gradio_client.handle_file)."""
            args = {k: v for k, v in locals().items() if k != "request"}
            return H.api_inspect(service, image, args, cancelled=H.client_gone(demo, request))

        gr.api(H.guarded(inspect_api), api_name="inspect", **CONCURRENCY)

        def check_api(image: FileData, attack: str = "pgd", eps: float = 4.0, steps: int = 10, norm: str = "linf",
                      step_size: float = 0.0, random_start: bool = True, seed: int = 0, target: str = "zero-shot",
                      classes: str = "", template: str = "", question: str = "", target_text: str = "",
                      heatmap: str = "attention", suite: str = "embedded",
                      baseline_clip: str = "default", baseline_captioner: str = "default",
                      baseline_vqa: str = "default", defended_clip: str = "default",
                      defended_captioner: str = "default", defended_vqa: str = "default",
                      momentum: float = 0.0, diversity: float = 0.0, budget: str = "quick",
                      request: gr.Request = None) -> dict:
            """The AutoAttack check of the image for each side's zero-shot model, with the arguments of
            /inspect plus budget ("quick" or "standard"); returns per side whether the model survives at
            eps, which attack broke it at which step, and whether the chosen attack said it survives."""
            args = {k: v for k, v in locals().items() if k != "request"}
            return H.api_check(service, image, args, cancelled=H.client_gone(demo, request))

        gr.api(H.guarded(check_api, "AutoAttack check"), api_name="check", **CONCURRENCY)
    return demo
