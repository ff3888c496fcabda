"""Weighted k-NN classification of frozen features (the DINO protocol: cosine similarity, k=20, T=0.07).

Each of the k nearest training features votes for its label with weight exp(similarity / T).
"""
from __future__ import annotations

import torch


@torch.no_grad()
def knn_classify(train_feats, train_labels, test_feats, test_labels, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, chunk: int = 1024) -> dict:
    """Top-1 / top-5 accuracy of weighted k-NN; features must be L2-normalised."""
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, train_feats.shape[0])
    correct1 = correct5 = 0
    for start in range(0, test_feats.shape[0], chunk):
        sims = test_feats[start:start + chunk] @ train_feats.T
        top_sims, top_idx = sims.topk(k, dim=1)
        votes = torch.zeros(top_idx.shape[0], num_classes, dtype=sims.dtype)
        votes.scatter_add_(1, train_labels[top_idx], (top_sims / temperature).exp())
        pred = votes.topk(min(5, num_classes), dim=1).indices
        truth = test_labels[start:start + chunk, None]
        correct1 += (pred[:, :1] == truth).sum().item()
        correct5 += (pred == truth).any(dim=1).sum().item()
    n = test_feats.shape[0]
    return {"top1": correct1 / n, "top5": correct5 / n, "k": k, "temperature": temperature,
            "n_train": train_feats.shape[0], "n_test": n}
