"""What a run directory holds for the report: metrics.jsonl and eval/*.json, read as plain data.
No torch, no matplotlib."""
from __future__ import annotations

import glob
import json
import os

from ..logging import log

# metrics.jsonl key -> (panel title, the keys drawn in that panel)
CURVES = [
    ("loss", ("loss",)),
    ("learning rate", ("lr",)),
    ("weight decay", ("wd",)),
    ("teacher temperature", ("teacher_temp",)),
    ("teacher momentum", ("teacher_momentum",)),
    ("agreement (student vs teacher, top-1 / top-5)", ("agree_top1", "agree_top5")),
    ("images/s", ("img_per_s",)),
    ("k-NN during training (top-1 / top-5)", ("eval/knn_top1", "eval/knn_top5")),
]


def read_metrics(run_dir: str) -> list[dict]:
    """The records of metrics.jsonl in step order; where a resumed run logged a step twice, the
    later record wins (per key, so that a step's training and evaluation records both count).
    A line that is not JSON (a run killed while writing it) is skipped with a warning."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                step = int(rec["step"])
            except (ValueError, KeyError, TypeError):
                log.warning(f"warning: {path}:{n}: not a metrics record; skipped")
                continue
            by_step.setdefault(step, {}).update(rec)
    return [by_step[s] for s in sorted(by_step)]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that have `key`."""
    pts = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def headline(protocol: str, results) -> str:
    """The main numbers of one massl-eval result (docs/eval.md's JSON), as a short text."""
    try:
        if protocol == "knn":
            return ", ".join(f"k={r['k']}: top-1 {r['top1']:.3f}, top-5 {r['top5']:.3f}" for r in results)
        if protocol == "linear":
            return f"top-1 {results['top1']:.3f}, top-5 {results['top5']:.3f} ({results.get('solver', '?')})"
        if protocol == "lowshot":
            return ", ".join(f"{r['shots']}-shot {r['logreg']['top1_mean']:.3f} (NCM {r['ncm']['top1_mean']:.3f})"
                             for r in results)
        if protocol == "retrieval":
            return f"mAP {results['mAP']:.3f}, " + ", ".join(f"R@{r['k']} {r['recall']:.3f}" for r in results["recall"])
    except (KeyError, TypeError, ValueError):
        pass
    text = json.dumps(results)
    return text if len(text) <= 200 else text[:197] + "..."


def eval_rows(run_dir: str) -> list[dict]:
    """One row per RUN_DIR/eval/*.json that massl-eval wrote (other JSON files are skipped)."""
    rows = []
    for path in sorted(glob.glob(os.path.join(run_dir, "eval", "*.json"))):
        try:
            with open(path) as f:
                r = json.load(f)
            protocol = r["protocol"]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning(f"warning: {path}: not a massl-eval result; left out of the report")
            continue
        rows.append({"file": os.path.basename(path), "protocol": protocol, "weights": r.get("weights", ""),
                     "step": r.get("step", ""), "n_train": r.get("n_train", ""), "n_val": r.get("n_val", ""),
                     "results": headline(protocol, r.get("results"))})
    return rows
