"""k-NN of the teacher during training (the `eval` config section; docs/eval.md).

Every rank of the training job extracts a disjoint part of `eval.train` and `eval.val` with the
training teacher's own backbone, in place: no copy of the model, features on the host. The
random number generators are left as they were and the training data loader is not touched, so
the run trains exactly as without evaluation. The numbers equal `massl-eval knn` on a
checkpoint of the same step with the same settings (--k, --temperature, --crop-ratio,
--batch-size).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import Config, ConfigError
from ..logging import log
from .extract import align_labels, eval_transform, extract_features, unusable
from .inputs import open_input
from .knn import knn_classify


class EmptyEvaluation(ValueError):
    """A set of the evaluation has no usable image at evaluation time."""


# What an evaluation may meet mid-run (inputs deleted or unmounted, a loader worker gone); a
# warning, not the end of the training: evaluation steps are not checkpoint steps.
EVAL_FAILURES = (OSError, ValueError, RuntimeError)


class PeriodicKNN:
    def __init__(self, cfg: Config, env):
        self.e, self.env = cfg.eval, env
        self.enabled = self.e.every_epochs > 0 or self.e.every_steps > 0
        if not self.enabled:
            return
        self.size = cfg.data.global_crop_size
        self.transform = eval_transform(cfg.data.aug.mean, cfg.data.aug.std, self.size, self.e.crop_ratio)
        # opened (folders listed, manifests read) before training starts: a bad input fails early
        self.train, self.val = (self._open(key) for key in ("train", "val"))
        unknown = sorted(set(self.val.classes) - set(self.train.classes))
        if unknown:
            raise ConfigError(f"eval.val: {len(unknown)} class(es) are not in eval.train, e.g. {unknown[0]!r}")

    def _open(self, key: str):
        try:
            data = open_input(getattr(self.e, key))
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"eval.{key}: {e}") from None
        if len(data) == 0:
            raise ConfigError(f"eval.{key}: {getattr(self.e, key)!r} holds no samples")
        return data

    def due(self, step: int, iters_per_epoch: int) -> bool:
        """After `step` optimiser steps: is an evaluation due?"""
        e = self.e
        return self.enabled and step > 0 and ((e.every_steps > 0 and step % e.every_steps == 0) or
                                               (e.every_epochs > 0 and step % (e.every_epochs * iters_per_epoch) == 0))

    def __call__(self, backbone: nn.Module, step: int = 0) -> dict | None:
        """Collective: every rank calls it with its teacher backbone. Returns the metrics on the
        main rank ({} on the others): knn_top1/knn_top5 at the first eval.k, knn_top1_k<k> and
        knn_top5_k<k> at the others, knn_skipped_images. An evaluation that cannot give a number
        (no usable image in a set: deleted, unmounted, all unreadable) returns None after one
        warning that names the reason and the path: evaluation never stops training."""
        try:
            return self._evaluate(backbone)
        except EmptyEvaluation as e:  # found on the main rank after every collective
            why = str(e)
        except EVAL_FAILURES as e:
            if self.env.world_size > 1:
                raise  # the other ranks may wait in a collective of the extraction: no going on alone
            why = f"{type(e).__name__}: {e} (evaluating eval.train {self.e.train!r}, eval.val {self.e.val!r})"
        log.warning(f"warning: eval step {step}: no k-NN result, training goes on: {' '.join(why.split())}")
        return None

    def _evaluate(self, backbone: nn.Module) -> dict:
        was_training = backbone.training
        if self.env.is_main:  # the k-NN takes a while: say so before, not only after
            log.info(f"eval: k-NN of the teacher, features of eval.train ({len(self.train)} images) and eval.val "
                     f"({len(self.val)} images)")
        devices = [self.env.device] if self.env.device.type == "cuda" else []
        backbone.eval()
        try:
            with torch.random.fork_rng(devices=devices):  # belt and braces: extraction draws nothing
                feats = [extract_features(backbone, data, self.transform, self.size, self.e.batch_size,
                                          self.e.num_workers, self.env.device, self.env.group, progress=False)
                         for data in (self.train, self.val)]
        finally:
            backbone.train(was_training)
        if not self.env.is_main:
            return {}
        train, val = feats
        assert train is not None and val is not None  # extract_features returns None only off the main rank
        for key, f, data in (("train", train, self.train), ("val", val, self.val)):
            why = unusable(f"eval.{key}", getattr(self.e, key), f, len(data))
            if why:  # a metric of nothing would read as a collapse (0.0) or divide by zero
                raise EmptyEvaluation(why)
        align_labels(train.classes, val)
        # on the device: the other ranks wait in their next collective meanwhile
        x, y, vx, vy = (t.to(self.env.device) for t in (train.feats, train.labels, val.feats, val.labels))
        results = knn_classify(x, y, vx, vy, self.e.k, self.e.temperature, len(train.classes))
        metrics = {}
        for i, r in enumerate(results):
            suffix = "" if i == 0 else f"_k{r['k']}"
            metrics[f"knn_top1{suffix}"], metrics[f"knn_top5{suffix}"] = r["top1"], r["top5"]
        metrics["knn_skipped_images"] = len(train.skipped) + len(val.skipped)
        return metrics
