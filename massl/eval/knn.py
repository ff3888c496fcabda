"""Weighted k-NN classification of frozen features (DINO's protocol: cosine similarity, T=0.07).

Each of the k nearest training features votes for its label with weight exp(similarity / T).
All k are answered from one top-max(k) search per chunk of test features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_KS = (10, 20, 100, 200)


@torch.no_grad()
def knn_classify(train_feats, train_labels, test_feats, test_labels, ks=DEFAULT_KS, temperature: float = 0.07,
                 num_classes: int | None = None, chunk_elements: int = 1 << 26) -> list[dict]:
    """Top-1 / top-5 accuracy for each k (capped at the training set size), one dict per k; top-5
    counts only classes that received votes. Features are L2-normalised here. `chunk_elements`
    bounds the similarities held at once (test rows x train rows)."""
    chunk = max(1, min(1024, chunk_elements // max(1, train_feats.shape[0])))
    num_classes = num_classes or int(train_labels.max()) + 1
    train_feats, test_feats = F.normalize(train_feats.float(), dim=-1), F.normalize(test_feats.float(), dim=-1)
    ks = [min(k, train_feats.shape[0]) for k in ks]
    correct = torch.zeros(len(ks), 2, dtype=torch.long)
    for start in range(0, test_feats.shape[0], chunk):
        sims = test_feats[start:start + chunk] @ train_feats.T
        top_sims, top_idx = sims.topk(max(ks), dim=1)  # sorted, most similar first
        weights, neighbours = (top_sims / temperature).exp(), train_labels[top_idx]
        truth = test_labels[start:start + chunk, None]
        for j, k in enumerate(ks):
            votes = sims.new_zeros(top_idx.shape[0], num_classes)
            votes.scatter_add_(1, neighbours[:, :k], weights[:, :k])
            top_votes, pred = votes.topk(min(5, num_classes), dim=1)
            hit = (pred == truth) & (top_votes > 0)  # a class no neighbour voted for is not a prediction
            correct[j, 0] += hit[:, 0].sum().item()
            correct[j, 1] += hit.any(dim=1).sum().item()
    n = test_feats.shape[0]
    return [{"k": k, "top1": correct[j, 0].item() / n, "top5": correct[j, 1].item() / n} for j, k in enumerate(ks)]
