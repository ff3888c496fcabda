"""Low-shot classification: N training images per class, several random draws from a fixed seed.

On each draw, two classifiers of the L2-normalised frozen features predict the test set:
- `logreg`: multinomial logistic regression (linear.train_linear_probe: L-BFGS, mean
  cross-entropy + weight_decay x |W|^2);
- `ncm`: nearest class mean (cosine similarity to the normalised mean feature of each class).
Results are the mean and the standard deviation (n - 1) of top-1 over the draws.
"""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from ..errors import UserError
from .linear import classifier_accuracy, train_linear_probe

DEFAULT_SHOTS = (1, 2, 5, 13)


def lowshot_draws(labels: torch.Tensor, num_classes: int, shots: int, draws: int, seed: int = 0) -> list[torch.Tensor]:
    """For each draw, the (sorted) row numbers of `shots` images per class, chosen without replacement."""
    by_class = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    small = [c for c, rows in enumerate(by_class) if 0 < len(rows) < shots]
    if small:
        raise UserError(f"--shots {shots}: class {small[0]} has only {len(by_class[small[0]])} training images")
    out = []
    for d in range(draws):
        g = torch.Generator().manual_seed(seed * 1_000_003 + shots * 1009 + d)
        out.append(torch.cat([rows[torch.randperm(len(rows), generator=g)[:shots]]
                              for rows in by_class if len(rows)]).sort().values)
    return out


def _summary(values: list[float]) -> dict:
    return {"top1_mean": statistics.fmean(values), "top1_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "top1": values}


@torch.no_grad()
def lowshot_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes: int, shots=DEFAULT_SHOTS,
                     draws: int = 5, seed: int = 0, weight_decay: float = 1e-4) -> list[dict]:
    train_feats, test_feats = F.normalize(train_feats.float(), dim=-1), F.normalize(test_feats.float(), dim=-1)
    results = []
    for n in shots:
        logreg, ncm = [], []
        for rows in lowshot_draws(train_labels.cpu(), num_classes, n, draws, seed):
            rows = rows.to(train_feats.device)
            x, y = train_feats[rows], train_labels[rows]
            with torch.enable_grad():
                probe = train_linear_probe(x, y, num_classes, weight_decay)
            logreg.append(classifier_accuracy(test_feats.double(), test_labels, probe.weight, probe.bias)[0])
            means = x.new_zeros(num_classes, x.shape[1]).index_add_(0, y, x)
            present = torch.zeros(num_classes, dtype=torch.bool, device=x.device)
            present[y] = True
            bias = torch.where(present, 0.0, -float("inf"))  # a class without images is never predicted
            ncm.append(classifier_accuracy(test_feats, test_labels, F.normalize(means, dim=-1), bias)[0])
        results.append({"shots": n, "draws": draws, "logreg": _summary(logreg), "ncm": _summary(ncm)})
    return results
