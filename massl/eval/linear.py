"""Linear probe on frozen features: a linear layer trained with cross-entropy (full-batch L-BFGS).

Features are extracted once (no augmentation), so the probe is cheap and deterministic; the
regularisation strength is the one hyper-parameter (`weight_decay`, an L2 penalty on the weights).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def train_linear_probe(feats: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       weight_decay: float = 1e-4, max_iter: int = 500) -> torch.nn.Linear:
    torch.manual_seed(0)
    probe = torch.nn.Linear(feats.shape[1], num_classes).double()
    x, y = feats.double(), labels
    opt = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(x), y) + weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe


@torch.no_grad()
def linear_probe_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes: int,
                          weight_decay: float = 1e-4) -> dict:
    with torch.enable_grad():
        probe = train_linear_probe(train_feats, train_labels, num_classes, weight_decay)
    logits = probe(test_feats.double())
    top5 = logits.topk(min(5, num_classes), dim=1).indices
    return {"top1": (top5[:, 0] == test_labels).double().mean().item(),
            "top5": (top5 == test_labels[:, None]).any(1).double().mean().item(),
            "weight_decay": weight_decay, "n_train": train_feats.shape[0], "n_test": test_feats.shape[0]}
