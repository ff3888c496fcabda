"""A corpus of damaged image files mixed with good ones, written into a temporary folder by the
tests that need it (never committed): what a scraped or half-copied dataset holds. Every damaged
file is one the CPU path (PIL, and simplejpeg's strict libjpeg-turbo decode for JPEGs) refuses,
several of them files that a lenient JPEG decoder decodes with only a warning."""
from __future__ import annotations

import io
import os
import zlib

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def good_images() -> dict[str, bytes]:
    """JPEGs of several sizes (baseline, progressive, grayscale, 4:4:4) and a PNG."""
    import skimage.data

    coffee, astronaut = Image.fromarray(skimage.data.coffee()), Image.fromarray(skimage.data.astronaut())
    out = {}
    for k in range(8):
        src = (coffee, astronaut)[k % 2]
        out[f"photo{k}.jpg"] = encode(src.resize((64 + 8 * k, 48 + 4 * (k % 3))), quality=85 + k)
    out["progressive.jpg"] = encode(coffee.resize((80, 60)), quality=90, progressive=True)
    out["gray.jpg"] = encode(astronaut.resize((56, 56)).convert("L"), quality=90)
    out["full_chroma.jpg"] = encode(astronaut.resize((48, 64)), quality=90, subsampling=0)
    out["drawing.png"] = encode(coffee.resize((60, 45)), "PNG")
    return out


def damaged_images(good: bytes, progressive: bytes, png: bytes) -> dict[str, bytes]:
    """Damaged versions of a baseline JPEG, a progressive JPEG and a PNG, and files that are no image."""
    sos = good.index(b"\xff\xda")  # start of scan: the entropy-coded data follows its header
    mid = (sos + len(good)) // 2
    noise = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
    dht = good.index(b"\xff\xc4")
    bad_huffman = bytearray(good)
    bad_huffman[dht + 5:dht + 21] = b"\xf0" * 16  # the table's 16 code counts sum past 256
    ihdr = png.index(b"IHDR")
    bad_crc = bytearray(png)
    bad_crc[ihdr + 17:ihdr + 21] = (zlib.crc32(png[ihdr:ihdr + 17]) ^ 1).to_bytes(4, "big")
    return {
        "cut_in_header.jpg": good[:40],
        "cut_after_sos.jpg": good[:sos + 20],
        "cut_in_body.jpg": good[:mid],
        "cut_before_eoi.jpg": good[:-2],  # only the end marker missing
        "body_cut_eoi_kept.jpg": good[:mid] + b"\xff\xd9",  # a valid header, a cut body, an end marker
        "progressive_cut_eoi_kept.jpg": progressive[:len(progressive) // 2] + b"\xff\xd9",
        "noise_in_body.jpg": good[:mid] + noise + good[mid + 64:],
        "zeros_in_body.jpg": good[:mid] + bytes(64) + good[mid + 64:],
        "marker_in_body.jpg": good[:mid] + b"\xff\xd0" + good[mid + 2:],  # a stray restart marker
        "bad_huffman_table.jpg": bytes(bad_huffman),
        "empty.jpg": b"",
        "text.jpg": b"not an image, only its suffix says so\n" * 8,
        "bad_crc.png": bytes(bad_crc),
        "png_named.jpg": png[:len(png) // 2],  # a PNG cut short, with a JPEG suffix
    }


def write_corpus(root: str) -> tuple[list[str], list[str]]:
    """Two class folders under `root`, each damaged file after a good one in path order (so a
    damaged file's replacement is a good file). -> (good paths, damaged paths)."""
    good = good_images()
    damaged = damaged_images(good["photo0.jpg"], good["progressive.jpg"], good["drawing.png"])
    names = sorted(good)
    paths: dict[str, list] = {"good": [], "damaged": []}
    for k, (name, data) in enumerate(sorted(damaged.items())):
        pair = (("good", f"{k:02d}a_{names[k % len(names)]}", good[names[k % len(names)]]),
                ("damaged", f"{k:02d}b_{name}", data))
        for kind, file, content in pair:
            path = os.path.join(root, f"class{k % 2}", file)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(content)
            paths[kind].append(path)
    return paths["good"], paths["damaged"]
