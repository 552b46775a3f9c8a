"""``python app.py``: parse the options, build the service and the page, launch (127.0.0.1 by default)."""
from __future__ import annotations

import argparse
import os
import sys

from ..runtime import add_arguments, apply_weights_dir

MAX_FILE_SIZE = "25mb"  # uploads above this are refused before they reach the image decoder


def theme():
    """Gradio's default look with system fonts: the default theme fetches web fonts from Google, and on
    the embedded suite nothing may leave the machine, not even from the browser."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python app.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="vlm_inspect: see how FGSM/BIM/PGD change what CLIP, a captioner and a VQA model say, "
                    "for a baseline and a defended model side by side.")
    ap.add_argument("--suite", choices=["embedded", "pretrained"], default="embedded",
                    help="model suite shown first (embedded: offline shapes-world models in checkpoints/)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the app to your network")
    ap.add_argument("--port", type=int, default=7860, help="port (the next free one is used if it is taken)")
    add_arguments(ap)
    ap.add_argument("--models-dir", action="append", default=None,
                    help="folder whose sub-folders hold checkpoints from `python -m vlm_inspect.train --out` "
                         "(repeatable; default: runs)")
    ap.add_argument("--max-file-size", default=MAX_FILE_SIZE, help="largest upload accepted")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ..checkpoints import CheckpointError
    from ..service import InspectService
    from .layout import build_demo

    try:
        apply_weights_dir(args)
        service = InspectService(suite=args.suite, device=args.device, precision=args.precision,
                                 model_dirs=args.models_dir or ["runs"])
    except (ValueError, CheckpointError) as e:
        ap.error(str(e))
    demo = build_demo(service)
    demo.queue(default_concurrency_limit=1)
    port = args.port
    for attempt in range(20):
        try:
            demo.launch(server_name=args.host, server_port=port + attempt, max_file_size=args.max_file_size,
                        show_error=True, ssr_mode=False, footer_links=["api"], theme=theme())
            return
        except OSError as e:
            if "port" not in str(e).lower() and "address" not in str(e).lower():
                raise
    sys.exit(f"no free port from {port} to {port + 19}: pass --port")


if __name__ == "__main__":
    main()
