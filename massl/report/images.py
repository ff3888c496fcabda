"""The validation images a report shows: a labelled image folder (class sub-folders; a flat folder
is shown unlabelled) or massl-shard shards, spread evenly over the set."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..data.files import scan_image_folder
from ..data.multicrop import DECODE_ERRORS
from ..data.shards import MANIFEST_NAME
from ..errors import UserError
from ..eval.inputs import ShardInput, open_rgb
from ..logging import log


@dataclass
class ImageSet:
    images: list  # PIL RGB images
    labels: list  # class positions in `classes`, -1 without a label
    classes: list
    names: list


def _spread(n: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(n) (class-sorted sets then show every class)."""
    return sorted(set(np.linspace(0, n - 1, num=min(count, n)).round().astype(int).tolist())) if n else []


def read_images(path: str, count: int) -> ImageSet:
    """Up to `count` usable images of `path`; unreadable ones are skipped with a warning."""
    out = ImageSet([], [], [], [])
    if os.path.isfile(path) or os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        try:
            data = ShardInput(path)
        except (OSError, ValueError) as e:
            raise UserError(f"--images {path}: {e}") from None
        out.classes, wanted = data.classes, set(_spread(len(data), count))
        samples = (s for s in data.read(0, len(data)) if s.index in wanted)
        for s in samples:
            if s.image is None:
                log.warning(f"warning: massl-report: skipping image {s.name}: {s.error}")
                continue
            out.images.append(s.image)
            out.labels.append(s.label)
            out.names.append(s.name)
        return out
    try:
        paths, labels, out.classes = scan_image_folder(path)
    except FileNotFoundError:
        raise UserError(f"--images {path}: neither an image folder nor massl-shard shards (manifest.json); "
                        f"give a folder of validation images") from None
    for i in _spread(len(paths), count):
        try:
            image = open_rgb(paths[i])
        except DECODE_ERRORS as e:
            log.warning(f"warning: massl-report: skipping image {paths[i]}: {type(e).__name__}: {e}")
            continue
        out.images.append(image)
        out.labels.append(labels[i])
        out.names.append(paths[i])
    return out


def pick_for_maps(labels: list, count: int) -> list[int]:
    """`count` positions, one per class first (the first image of each), then the next ones."""
    first: dict[int, int] = {}  # label -> position of its first image
    for i, y in enumerate(labels):
        first.setdefault(y, i)
    chosen = sorted(first.values())[:count]
    rest = [i for i in range(len(labels)) if i not in chosen]
    return sorted(chosen + rest[:count - len(chosen)])


def as_display(image: Image.Image, size: int, crop_ratio: float) -> Image.Image:
    """The pixels the network sees (resize + centre crop of eval_transform), before normalisation."""
    import torchvision.transforms as T

    return T.Compose([T.Resize(int(round(size / crop_ratio)), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size)])(image)
