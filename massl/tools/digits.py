"""Write scikit-learn's handwritten digits (1797 real 8x8 images) as train/val image folders.

The split: numpy RandomState(0).permutation(1797), first 1297 train, last 500 val.
    python -m massl.tools.digits --out data/digits     # -> data/digits/{train,val}/<label>/<index>.png
"""
from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image

from massl.errors import UserError, fail

N_TRAIN = 1297


def write_digits(out: str, size: int = 32) -> dict:
    """Write the split; `size` > 8 upscales each image (bicubic) so crops of it are not limited to whole 8x8 pixels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("massl.tools.digits needs scikit-learn (its digits data set): "
                        "pip install 'massl[quickstart]' (or pip install scikit-learn)") from None

    digits = load_digits()
    order = np.random.RandomState(0).permutation(len(digits.images))
    counts = {}
    for split, idx in (("train", order[:N_TRAIN]), ("val", order[N_TRAIN:])):
        for i in idx:
            folder = os.path.join(out, split, str(digits.target[i]))
            os.makedirs(folder, exist_ok=True)
            pixels = np.round(digits.images[i] * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
            img = Image.fromarray(pixels, mode="L")
            if size != 8:
                img = img.resize((size, size), Image.Resampling.BICUBIC)
            img.save(os.path.join(folder, f"{i:04d}.png"))
        counts[split] = len(idx)
    return counts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/digits", help="output root (default: data/digits)")
    p.add_argument("--size", type=int, default=32,
                   help="image side in pixels (default 32, as the quickstart trains on; 8 is the original; larger is bicubic)")
    args = p.parse_args(argv)
    if args.size < 1:
        fail(f"--size: must be >= 1, got {args.size}")
    try:
        counts = write_digits(args.out, args.size)
    except UserError as e:
        fail(e)
    print(f"wrote {counts['train']} train and {counts['val']} val digits under {args.out}")


if __name__ == "__main__":
    main()
