"""Image retrieval by label: each query (val) image ranks the whole database (train) by cosine
similarity; the database images of the query's class are the relevant ones.

- AP of a query: the mean, over its relevant images, of the precision at the rank of each;
  mAP: the mean AP over the queries that have at least one relevant image.
- recall@k: the fraction of those queries with a relevant image among their k most similar.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError

DEFAULT_RECALL_KS = (1, 5, 10)


@torch.no_grad()
def retrieval_metrics(db_feats, db_labels, query_feats, query_labels, recall_ks=DEFAULT_RECALL_KS,
                      chunk_elements: int = 1 << 25) -> dict:
    """`chunk_elements` bounds (queries x database) per chunk: about 20 bytes each are live at once."""
    chunk = max(1, chunk_elements // max(1, db_feats.shape[0]))
    db, queries = F.normalize(db_feats.float(), dim=-1), F.normalize(query_feats.float(), dim=-1)
    ap_sum, hits, counted = 0.0, torch.zeros(len(recall_ks), dtype=torch.long), 0
    ranks = torch.arange(1, db.shape[0] + 1, dtype=torch.float64, device=db.device)
    for start in range(0, queries.shape[0], chunk):
        order = (queries[start:start + chunk] @ db.T).argsort(dim=1, descending=True, stable=True)
        relevant = db_labels[order] == query_labels[start:start + chunk, None]  # [q, N] in ranked order
        n_rel = relevant.sum(dim=1)
        keep = n_rel > 0
        relevant, n_rel = relevant[keep], n_rel[keep]
        precision_at_hits = relevant.double().cumsum(dim=1) / ranks * relevant
        ap_sum += (precision_at_hits.sum(dim=1) / n_rel).sum().item()
        for j, k in enumerate(recall_ks):
            hits[j] += relevant[:, :k].any(dim=1).sum().item()
        counted += int(keep.sum())
    if counted == 0:
        raise UserError("retrieval: no query has a database image of its class")
    return {"mAP": ap_sum / counted, "recall": [{"k": k, "recall": hits[j].item() / counted}
                                                for j, k in enumerate(recall_ks)],
            "n_queries": counted, "n_queries_without_match": query_feats.shape[0] - counted}
