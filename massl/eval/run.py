"""One massl-eval command: load the backbone, get the features of --train and --val (from the
cache or extracted over all ranks), run the protocol on rank 0 and return its JSON result."""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from ..checkpoint.manager import read_checkpoint_manifest
from ..checkpoint.reader import load_teacher_backbone, read_config, resolve_checkpoint
from ..dist import init_distributed, resolve_device
from ..errors import UserError
from ..logging import setup_logging
from .cache import cache_key, cache_path, load_cached, save_cached, weights_digest
from .extract import (FeatureSpec, Features, align_labels, check_classes, eval_transform, extract_features,
                      unusable)
from .inputs import open_input
from .knn import knn_classify
from .linear import linear_probe_accuracy, sgd_probe_accuracy
from .lowshot import lowshot_accuracy
from .retrieval import retrieval_metrics

SGD_ABOVE = 20000  # --solver auto: SGD (DINOv2) above this many training images, L-BFGS up to it
SKIPPED_NAMED = 100  # unreadable images named in the JSON (all are counted)


class PixelFeatures(torch.nn.Module):
    """--weights pixels: the image itself, at the evaluation size, flattened (levels / 255, the
    evaluation transform's normalisation undone): the raw-pixel baseline a trained network
    should beat."""

    mean: torch.Tensor  # buffers, [1, 3, 1, 1]
    std: torch.Tensor

    def __init__(self, mean: list, std: list):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.std + self.mean).flatten(1)


def load_weights(a: argparse.Namespace, ckpt_dir: str):
    """(feature module, run config) for --weights teacher | random-init | pixels."""
    if getattr(a, "weights", "teacher") == "pixels":
        cfg = read_config(ckpt_dir)  # the run's image size and normalisation; no weights read
        return PixelFeatures(cfg.data.aug.mean, cfg.data.aug.std).eval(), cfg
    return load_teacher_backbone(ckpt_dir, random_init=a.random_init, seed=a.seed, trust=a.trust_checkpoint)


def weights_name(a: argparse.Namespace) -> str:
    if getattr(a, "weights", "teacher") == "pixels":
        return "pixels"
    return "random-init" if a.random_init else "teacher"


def open_inputs(a: argparse.Namespace) -> tuple:
    """--train and --val opened (folders listed, manifests read) and checked before any work: an
    empty set or a val class that train lacks is refused here, not after hours of extraction."""
    opened = []
    for flag, path in (("--train", a.train), ("--val", a.val)):
        try:
            data = open_input(path)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"{flag}: {e}") from None
        if len(data) == 0:
            raise UserError(f"{flag}: {path!r} holds no samples; point it at a labelled image folder or shards")
        opened.append(data)
    check_classes(opened[0].classes, opened[1].classes)
    return tuple(opened)


def check_usable(a: argparse.Namespace, train: Features, val: Features, inputs: tuple) -> None:
    """After extraction: a set none of whose images could be read gives no result (not k=0 or 0/0)."""
    for flag, path, feats, data in (("--train", a.train, train, inputs[0]), ("--val", a.val, val, inputs[1])):
        why = unusable(flag, path, feats, len(data))
        if why:
            raise UserError(f"{why}; nothing to evaluate")


def features_of(data, backbone, digest: str, settings: dict, spec: FeatureSpec, a, env,
                label: str = "") -> Features | None:
    """The features of one opened input (open_inputs) on rank 0 (None on the others): cached, or
    extracted by all ranks."""
    key_path = cache_path(a.cache, cache_key(digest, data.identity(), settings)) if a.cache else ""
    hit = [load_cached(key_path) if key_path and env.is_main else None]
    if env.world_size > 1:  # every rank must agree on whether to extract (a collective)
        flag = [hit[0] is not None]
        dist.broadcast_object_list(flag, group_src=0, group=env.group)
        if flag[0]:
            return hit[0]
    elif hit[0] is not None:
        return hit[0]
    size = settings["image_size"]
    tf = eval_transform(settings["mean"], settings["std"], size, settings["crop_ratio"])
    feats = extract_features(backbone, data, tf, size, a.batch_size, a.workers, env.device, env.group, spec,
                             label=label)
    if feats is not None and key_path:
        save_cached(key_path, feats)
    return feats


def run_protocol(a: argparse.Namespace, train: Features, val: Features, device: torch.device) -> dict | list:
    """The protocol's results, computed on `device` (the features stay on the host until here)."""
    num_classes = len(train.classes)
    x, y, vx, vy = (t.to(device) for t in (train.feats, train.labels, val.feats, val.labels))
    if a.cmd == "knn":
        return knn_classify(x, y, vx, vy, a.k, a.temperature, num_classes)
    if a.cmd == "retrieval":
        return retrieval_metrics(x, y, vx, vy, a.recall_k)
    if a.cmd == "lowshot":
        return lowshot_accuracy(x, y, vx, vy, num_classes, a.shots, a.draws, a.seed, a.weight_decay)
    if a.solver == "sgd" or (a.solver == "auto" and len(y) > SGD_ABOVE):
        return sgd_probe_accuracy(x, y, vx, vy, num_classes, a.lrs, a.epochs, a.probe_batch_size, a.holdout, a.seed)
    return linear_probe_accuracy(x, y, vx, vy, num_classes, a.weight_decay)


def evaluate(a: argparse.Namespace) -> dict | None:
    """The result on rank 0, None on the other ranks."""
    if a.threads:
        torch.set_num_threads(a.threads)
    ckpt_dir = os.path.abspath(resolve_checkpoint(a.checkpoint))
    resolve_device(a.device, key="--device")  # an error names the flag, not the training key
    inputs = open_inputs(a)
    env = init_distributed(a.device)
    setup_logging(env.rank)
    backbone, cfg = load_weights(a, ckpt_dir)
    pixels = isinstance(backbone, PixelFeatures)
    patch, depth = (1, 1) if pixels else (cfg.model.patch_size, len(backbone.blocks))
    size = a.image_size or cfg.data.global_crop_size
    if size % patch:
        raise UserError(f"--image-size: {size} is not a multiple of the model's patch size {patch}")
    spec = FeatureSpec(a.n_last_blocks, a.avgpool) if a.cmd == "linear" else FeatureSpec()
    if spec.n_last_blocks > depth:
        raise UserError(f"--n-last-blocks: {spec.n_last_blocks} exceeds the model's {depth} blocks"
                        + (" (--weights pixels has one feature vector: the pixels)" if pixels else ""))
    if pixels and spec.avgpool:
        raise UserError("--avgpool: --weights pixels has no patch tokens; drop --avgpool")
    backbone = backbone.to(env.device)
    settings = {"image_size": size, "crop_ratio": a.crop_ratio, "mean": list(cfg.data.aug.mean),
                "std": list(cfg.data.aug.std), "n_last_blocks": spec.n_last_blocks, "avgpool": spec.avgpool}
    digest = ("pixels" if pixels else weights_digest(backbone)) if a.cache else ""
    train, val = (features_of(data, backbone, digest, settings, spec, a, env, label)
                  for data, label in zip(inputs, ("train", "val")))
    if not env.is_main:
        return None
    assert train is not None and val is not None  # features_of returns None only off the main rank
    check_usable(a, train, val, inputs)
    align_labels(train.classes, val)
    skipped = train.skipped + val.skipped
    return {
        "protocol": a.cmd, "weights": weights_name(a), "checkpoint": ckpt_dir,
        "step": read_checkpoint_manifest(ckpt_dir).get("step"), "train": a.train, "val": a.val,
        "n_train": len(train.labels), "n_val": len(val.labels), "num_classes": len(train.classes),
        "skipped_train": len(train.skipped), "skipped_val": len(val.skipped),
        "skipped_images": [{"name": name, "reason": why} for _, name, why in skipped[:SKIPPED_NAMED]],
        "feature_dim": train.feats.shape[1], "world_size": env.world_size, **settings,
        "parameters": {k: v for k, v in vars(a).items() if k not in ("cmd", "checkpoint", "train", "val", "out")},
        "results": run_protocol(a, train, val, env.device),
    }
