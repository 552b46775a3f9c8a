"""``python app.py``: parse the options, build the service and the page, launch (127.0.0.1 by default)."""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..runtime import add_arguments, apply_weights_dir
from .serve import QUEUE_SIZE, RATE_PER_MINUTE

MAX_FILE_SIZE = "25mb"  # uploads above this are refused before they reach the image decoder


def parser() -> argparse.ArgumentParser:
    from ..models import SUITES

    ap = argparse.ArgumentParser(
        prog="python app.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="vlm_inspect: see how adversarial attacks change what CLIP, a captioner and a VQA model say, "
                    "for a baseline and a defended model side by side.")
    ap.add_argument("--suite", choices=list(SUITES), default="embedded",
                    help="model suite shown first (embedded: offline shapes-world models in checkpoints/)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the app to your network")
    ap.add_argument("--port", type=int, default=7860, help="port (the next free one is used if it is taken)")
    add_arguments(ap)
    ap.add_argument("--models-dir", action="append", default=None,
                    help="folder whose sub-folders hold checkpoints from `python -m vlm_inspect.train --out` "
                         "(repeatable; default: runs)")
    ap.add_argument("--max-file-size", default=MAX_FILE_SIZE, help="largest upload accepted")
    g = ap.add_argument_group("serving others (see the README, 'Running it for others')")
    g.add_argument("--allow-model-paths", action="append", default=[], metavar="DIR",
                   help="let a request name checkpoint folders inside DIR (repeatable; default: only the model "
                        "lists: presets, checkpoints/, the --models-dir folders and --weights-dir)")
    g.add_argument("--allow-hub", action="append", default=[], metavar="PATTERN",
                   help="let a request name open_clip hf-hub:ORG/REPO models matching PATTERN, e.g. 'chs20/*' "
                        "or '*' (repeatable; default: none)")
    g.add_argument("--rate-limit", type=int, default=RATE_PER_MINUTE, metavar="N",
                   help="requests (inspections, uploads, page events) a minute from one client address")
    g.add_argument("--queue-size", type=int, default=QUEUE_SIZE, metavar="N",
                   help="jobs that may wait for the model worker; past that a request is told to try again")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    for d in args.allow_model_paths:
        if not Path(d).expanduser().is_dir():
            ap.error(f"--allow-model-paths {d}: no such folder")
    if args.rate_limit < 1 or args.queue_size < 1:
        ap.error("--rate-limit and --queue-size must be at least 1")
    # uploads in a folder of this server's own, removed at exit; set before Gradio is imported
    if "GRADIO_TEMP_DIR" not in os.environ and "gradio" not in sys.modules:
        uploads = tempfile.mkdtemp(prefix="vlm_inspect_uploads_")
        os.environ["GRADIO_TEMP_DIR"] = uploads
        atexit.register(shutil.rmtree, uploads, True)
    from ..checkpoints import CheckpointError
    from ..policy import ModelPolicy
    from ..service import InspectService
    from .layout import build_demo
    from .serve import serve

    try:
        apply_weights_dir(args)
        policy = ModelPolicy.served(model_paths=args.allow_model_paths, hub=args.allow_hub)
        service = InspectService(suite=args.suite, device=args.device, precision=args.precision,
                                 model_dirs=args.models_dir or ["runs"], policy=policy)
    except (ValueError, CheckpointError) as e:
        ap.error(str(e))
    demo = build_demo(service)
    port = args.port
    for attempt in range(20):
        try:
            serve(demo, host=args.host, port=port + attempt, max_file_size=args.max_file_size,
                  rate_per_minute=args.rate_limit, queue_size=args.queue_size)
            return
        except OSError as e:
            if "port" not in str(e).lower() and "address" not in str(e).lower():
                raise
    sys.exit(f"no free port from {port} to {port + 19}: pass --port")


if __name__ == "__main__":
    main()
