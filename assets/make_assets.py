"""Regenerate the sample images shown in the app's gallery.

    python assets/make_assets.py [--skimage-data DIR]

Shapes scenes are rendered from the shapes world (test split, fixed indices) at 128 px in each style.
The photos come from scikit-image's bundled sample data (``skimage/data``; pass the folder, e.g. from
an unpacked scikit-image wheel), downscaled to 256 px on the short side; their licences are in
``assets/LICENSES.md``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from vlm_inspect.data.shapes import ShapesDataset

HERE = Path(__file__).resolve().parent
SCENES = {"plain": (3, 11), "outline": (5, 17), "noisy": (8, 21)}  # dataset indices picked for variety
PHOTOS = {"astronaut": "astronaut.png", "coffee": "coffee.png", "chelsea": "chelsea.png", "rocket": "rocket.jpg"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skimage-data", type=Path, default=None, help="folder with scikit-image's sample images")
    args = ap.parse_args()
    for style, indices in SCENES.items():
        ds = ShapesDataset("shapes-scenes", split="test", style=style, length=100, image_size=128)
        for i in indices:
            Image.fromarray(ds.image(i)).save(HERE / f"shapes_{style}_{i}.png", optimize=True)
            print(f"shapes_{style}_{i}.png: {ds[i]['caption']}")
    if args.skimage_data:
        for name, file in PHOTOS.items():
            img = Image.open(args.skimage_data / file).convert("RGB")
            scale = 256 / min(img.size)
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
            img.save(HERE / f"photo_{name}.jpg", quality=88, optimize=True)


if __name__ == "__main__":
    main()
