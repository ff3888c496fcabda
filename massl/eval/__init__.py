"""Evaluation of frozen teacher features (docs/eval.md): inputs (labelled folders, shards),
extraction over ranks, the feature cache, k-NN, linear probes, low-shot, retrieval, massl-eval
(cli.py, run.py) and the k-NN during training (periodic.py)."""
