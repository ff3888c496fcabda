"""Linear probes on frozen features.

- `sgd` (DINOv2's protocol, the default for large sets): linear classifiers for several learning
  rates trained at once with SGD (momentum 0.9, no weight decay, cosine schedule, lr scaled by
  batch / 256, weights N(0, 0.01)) on a random part of the training features; the one with the
  best top-1 on the held-out rest is the result.
- `lbfgs` (small sets): one classifier, full-batch L-BFGS on mean cross-entropy + weight_decay x
  |W|^2 (bias unpenalised): a convex problem with a unique, deterministic solution.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UserError

DINOV2_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    return (top5[:, 0] == labels).double().mean().item(), (top5 == labels[:, None]).any(1).double().mean().item()


def classifier_accuracy(feats, labels, weight, bias, chunk: int = 16384) -> tuple[float, float]:
    """Top-1 / top-5 of x @ weight.T + bias, a chunk of rows at a time."""
    hits = torch.zeros(2, dtype=torch.float64)
    for x, y in zip(feats.split(chunk), labels.split(chunk)):
        top1, top5 = topk_accuracy(x @ weight.T + bias, y)
        hits += torch.tensor([top1, top5], dtype=torch.float64) * len(y)
    return tuple((hits / len(labels)).tolist())


def train_linear_probe(feats: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       weight_decay: float = 1e-4, max_iter: int = 500) -> torch.nn.Linear:
    probe = torch.nn.Linear(feats.shape[1], num_classes, device=feats.device, dtype=torch.float64)
    torch.nn.init.zeros_(probe.weight)  # a convex problem: any start reaches the same optimum; no RNG drawn
    torch.nn.init.zeros_(probe.bias)
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
    top1, top5 = topk_accuracy(probe(test_feats.double()), test_labels)
    return {"solver": "lbfgs", "top1": top1, "top5": top5, "weight_decay": weight_decay}


def train_sgd_probes(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, lrs, epochs: int = 10,
                     batch_size: int = 1024, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [L, C, d] and biases [L, C] of one classifier per learning rate, trained together:
    the summed loss gives each classifier exactly its own gradient. All start from the same
    weights, N(0, 0.01) drawn from Generator(seed), which then draws one order per epoch."""
    g = torch.Generator().manual_seed(seed)
    n, d = feats.shape
    w = (torch.randn(num_classes, d, generator=g) * 0.01).expand(len(lrs), -1, -1).to(feats.device)
    w = w.clone().requires_grad_()
    b = torch.zeros(len(lrs), num_classes, device=feats.device, requires_grad=True)
    peak = torch.tensor(lrs, dtype=torch.float32, device=feats.device) * batch_size / 256
    velocity = [torch.zeros_like(w), torch.zeros_like(b)]
    steps, step = epochs * math.ceil(n / batch_size), 0
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(batch_size):
            x, y = feats[idx.to(feats.device)], labels[idx.to(labels.device)]
            logits = torch.einsum("nd,lcd->lnc", x, w) + b[:, None]
            loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(lrs)), reduction="sum") / len(idx)
            grads = torch.autograd.grad(loss, (w, b))
            lr = peak * 0.5 * (1 + math.cos(math.pi * step / steps))
            with torch.no_grad():
                for p, v, grad in zip((w, b), velocity, grads):
                    v.mul_(0.9).add_(grad)
                    p.sub_(lr.view(-1, *[1] * (p.dim() - 1)) * v)
            step += 1
    return w.detach(), b.detach()


@torch.no_grad()
def sgd_probe_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes: int, lrs=DINOV2_LRS,
                       epochs: int = 10, batch_size: int = 1024, holdout: float = 0.1, seed: int = 0) -> dict:
    """Train on (1 - holdout) of the training features, pick the lr with the best held-out top-1
    (the smallest such lr on a tie), report that classifier on the test features."""
    n = train_feats.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    n_held = max(1, int(round(n * holdout)))
    if n_held >= n:
        raise UserError(f"--holdout {holdout} leaves no training features out of {n}")
    held, fit = perm[:n_held], perm[n_held:]
    with torch.enable_grad():
        w, b = train_sgd_probes(train_feats[fit], train_labels[fit], num_classes, lrs, epochs, batch_size, seed)
    held_top1 = [classifier_accuracy(train_feats[held], train_labels[held], w[j], b[j])[0] for j in range(len(lrs))]
    best = max(range(len(lrs)), key=lambda j: (held_top1[j], -j))
    top1, top5 = classifier_accuracy(test_feats, test_labels, w[best], b[best])
    return {"solver": "sgd", "top1": top1, "top5": top5, "best_lr": lrs[best], "epochs": epochs,
            "batch_size": batch_size, "holdout": holdout, "n_fit": len(fit), "n_heldout": n_held,
            "heldout_top1": [{"lr": lr, "top1": a} for lr, a in zip(lrs, held_top1)]}
