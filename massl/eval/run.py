"""One massl-eval command: load the backbone, get the features of --train and --val (from the
cache or extracted over all ranks), run the protocol on rank 0 and return its JSON result."""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from ..checkpoint.manager import read_checkpoint_manifest
from ..checkpoint.reader import load_teacher_backbone, resolve_checkpoint
from ..dist import init_distributed
from ..errors import UserError
from ..logging import setup_logging
from .cache import cache_key, cache_path, load_cached, save_cached, weights_digest
from .extract import FeatureSpec, Features, align_labels, eval_transform, extract_features
from .inputs import open_input
from .knn import knn_classify
from .linear import linear_probe_accuracy, sgd_probe_accuracy
from .lowshot import lowshot_accuracy
from .retrieval import retrieval_metrics

SGD_ABOVE = 20000  # --solver auto: SGD (DINOv2) above this many training images, L-BFGS up to it
SKIPPED_NAMED = 100  # unreadable images named in the JSON (all are counted)


def features_of(path: str, backbone, digest: str, settings: dict, spec: FeatureSpec, a, env) -> Features | None:
    """The features of one input on rank 0 (None on the others): cached, or extracted by all ranks."""
    data = open_input(path)
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
    feats = extract_features(backbone, data, tf, size, a.batch_size, a.workers, env.device, env.group, spec)
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
    env = init_distributed(a.device)
    setup_logging(env.rank)
    backbone, cfg = load_teacher_backbone(ckpt_dir, random_init=a.random_init, seed=a.seed,
                                          trust=a.trust_checkpoint)
    patch, depth = cfg.model.patch_size, len(backbone.blocks)
    size = a.image_size or cfg.data.global_crop_size
    if size % patch:
        raise UserError(f"--image-size: {size} is not a multiple of the model's patch size {patch}")
    spec = FeatureSpec(a.n_last_blocks, a.avgpool) if a.cmd == "linear" else FeatureSpec()
    if spec.n_last_blocks > depth:
        raise UserError(f"--n-last-blocks: {spec.n_last_blocks} exceeds the model's {depth} blocks")
    backbone = backbone.to(env.device)
    settings = {"image_size": size, "crop_ratio": a.crop_ratio, "mean": list(cfg.data.aug.mean),
                "std": list(cfg.data.aug.std), "n_last_blocks": spec.n_last_blocks, "avgpool": spec.avgpool}
    digest = weights_digest(backbone) if a.cache else ""
    train = features_of(a.train, backbone, digest, settings, spec, a, env)
    val = features_of(a.val, backbone, digest, settings, spec, a, env)
    if not env.is_main:
        return None
    align_labels(train.classes, val)
    skipped = train.skipped + val.skipped
    return {
        "protocol": a.cmd, "weights": "random-init" if a.random_init else "teacher", "checkpoint": ckpt_dir,
        "step": read_checkpoint_manifest(ckpt_dir).get("step"), "train": a.train, "val": a.val,
        "n_train": len(train.labels), "n_val": len(val.labels), "num_classes": len(train.classes),
        "skipped_train": len(train.skipped), "skipped_val": len(val.skipped),
        "skipped_images": [{"name": name, "reason": why} for _, name, why in skipped[:SKIPPED_NAMED]],
        "feature_dim": train.feats.shape[1], "world_size": env.world_size, **settings,
        "parameters": {k: v for k, v in vars(a).items() if k not in ("cmd", "checkpoint", "train", "val", "out")},
        "results": run_protocol(a, train, val, env.device),
    }
