"""Feature cache: extracted features saved under a key of everything they depend on.

The key hashes the backbone's weights (so a checkpoint, a random init and its seed each have
their own entries, whatever path they were read from), the input's identity (an image folder's
file names, sizes and modification times; a shard manifest's checksums), the transform settings
and the feature spec. Entries hold only tensors and plain values, read back with
`torch.load(weights_only=True)`: a cache file cannot run code.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from typing import Optional

import torch
import torch.nn as nn

from ..logging import log
from .extract import Features

CACHE_VERSION = 1


def weights_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(weights: str, input_identity: str, settings: dict) -> str:
    blob = json.dumps({"version": CACHE_VERSION, "weights": weights, "input": input_identity, **settings},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cache_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, f"features-{key}.pt")


def load_cached(path: str) -> Optional[Features]:
    """The cached features, or None when absent or unreadable (then they are extracted again)."""
    if not os.path.isfile(path):
        return None
    try:
        d = torch.load(path, weights_only=True)
        return Features(d["feats"], d["labels"], d["index"], list(d["classes"]), [tuple(s) for s in d["skipped"]])
    except (OSError, RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as e:
        log.warning(f"massl eval: ignoring unreadable feature cache {path} ({type(e).__name__}: {e})")
        return None


def save_cached(path: str, f: Features) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".partial"
    torch.save({"feats": f.feats, "labels": f.labels, "index": f.index, "classes": f.classes,
                "skipped": [list(s) for s in f.skipped]}, tmp)
    os.replace(tmp, path)
