"""``python -m vlm_inspect.models.fetch``: write local copies of pretrained models for an offline machine.

On a machine with internet::

    python -m vlm_inspect.models.fetch --out weights/            # the three pretrained presets
    python -m vlm_inspect.models.fetch openai/ViT-L-14 hf-hub:org/robust-clip --out weights/

then copy ``weights/`` over and start the app with ``python app.py --suite pretrained --weights-dir weights/``
(``inspect``, ``train`` and ``evaluate`` take ``--weights-dir`` too). ``<out>/<name>`` holds each copy:
safetensors + config.json, loaded without the network. An open_clip ``hf-hub:org/repo`` name is copied
as its hub files into ``<out>/org/repo``. ``--random`` writes the same architectures with random weights
and needs no network (how the tests and benchmarks build full-size models here).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..checkpoints import CheckpointError, save_adapter
from ..runtime import local_copy_path
from .base import ModelUnavailableError
from .loading import load, unavailable
from .presets import APP_PRETRAINED, PRESETS, list_presets

log = logging.getLogger(__name__)


def fetch(names: list[str], out: str | Path, random: bool = False) -> list[Path]:
    """Write a local copy of each model in ``names`` under ``out``; returns the folders written."""
    out = Path(out)
    written = []
    for name in names:
        dest = local_copy_path(name, out)
        if name.startswith("hf-hub:"):
            if random:
                raise ValueError(f"{name}: --random needs a known architecture (a preset name)")
            try:
                from huggingface_hub import snapshot_download

                snapshot_download(name.removeprefix("hf-hub:"), local_dir=str(dest),
                                  allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
            except Exception as e:  # noqa: BLE001 - hub errors come in many types
                raise unavailable(name, e) from e
        else:
            if name not in PRESETS or PRESETS[name].suite != "pretrained":
                raise ValueError(f"{name!r} is not a pretrained preset; valid: "
                                 f"{', '.join(list_presets(suite='pretrained'))}, or hf-hub:<org>/<repo>")
            adapter = load(name, weights="random" if random else "default")
            if random and adapter.spec.get("tokenizer", {}).get("kind") == "clip-bpe-standin":
                # a transformers CLIP's copy holds its tokenizer as files (what the hub copy holds), so the
                # stand-in is saved with it and read back from the folder
                adapter.spec = {**adapter.spec, "tokenizer": {"kind": "files"}}
            save_adapter(adapter, dest, preset=name,
                         extra={"source": "random" if random else (PRESETS[name].source or name)})
        log.info("wrote %s", dest)
        written.append(dest)
    return written


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(prog="python -m vlm_inspect.models.fetch",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("names", nargs="*", default=list(APP_PRETRAINED),
                    help=f"pretrained presets ({', '.join(list_presets(suite='pretrained'))}) or open_clip "
                         "hf-hub:<org>/<repo> names; default: the app's pretrained models")
    ap.add_argument("--out", required=True, help="the weights folder to fill (pass it later as --weights-dir)")
    ap.add_argument("--random", action="store_true",
                    help="random weights of the same architectures (no network; for tests and benchmarks)")
    args = ap.parse_args(argv)
    try:
        for folder in fetch(args.names, args.out, args.random):
            print(folder)
    except (ModelUnavailableError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
