"""massl-eval: k-NN, linear probe, low-shot and retrieval on frozen teacher features (docs/eval.md).

Under torchrun or srun every rank extracts a disjoint part of each input; rank 0 runs the
protocol, prints a table and writes the JSON result.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch.distributed as dist

from ..trust import TRUST_HELP
from ..errors import UserError
from ..errors import fail as _fail
from .knn import DEFAULT_KS
from .linear import DINOV2_LRS
from .lowshot import DEFAULT_SHOTS
from .retrieval import DEFAULT_RECALL_KS
from .run import SGD_ABOVE, evaluate, weights_name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="massl-eval", description="Evaluate a trained teacher backbone on frozen features.")
    sub = p.add_subparsers(dest="cmd", required=True)
    knn = sub.add_parser("knn", help="weighted k-NN (DINO protocol), several k at once")
    knn.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_KS), help="neighbour counts (10 20 100 200)")
    knn.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(similarity / T)")
    lin = sub.add_parser("linear", help="linear probe: SGD over several learning rates (DINOv2) or L-BFGS")
    lin.add_argument("--solver", default="auto", choices=["auto", "sgd", "lbfgs"],
                     help=f"auto: sgd above {SGD_ABOVE} training images, lbfgs up to it")
    lin.add_argument("--lrs", type=float, nargs="+", default=list(DINOV2_LRS), help="sgd: learning rates per 256 images")
    lin.add_argument("--epochs", type=int, default=10, help="sgd: passes over the training features")
    lin.add_argument("--probe-batch-size", type=int, default=1024, help="sgd: features per step")
    lin.add_argument("--holdout", type=float, default=0.1, help="sgd: part of train held out to choose the lr")
    lin.add_argument("--weight-decay", type=float, default=1e-4, help="lbfgs: L2 penalty on the weights")
    lin.add_argument("--n-last-blocks", type=int, default=1, help="CLS tokens of the last n blocks, concatenated")
    lin.add_argument("--avgpool", action="store_true", help="append the average of the last block's patch tokens")
    low = sub.add_parser("lowshot", help="N images per class: logistic regression and nearest class mean")
    low.add_argument("--shots", type=int, nargs="+", default=list(DEFAULT_SHOTS), help="images per class (1 2 5 13)")
    low.add_argument("--draws", type=int, default=5, help="random draws per shot count")
    low.add_argument("--weight-decay", type=float, default=1e-4, help="logistic regression L2 penalty (as linear --weight-decay)")
    ret = sub.add_parser("retrieval", help="each val image queries train; mAP and recall@k by label")
    ret.add_argument("--recall-k", type=int, nargs="+", default=list(DEFAULT_RECALL_KS), help="k of recall@k (1 5 10)")
    for s in (knn, lin, low, ret):
        s.add_argument("--checkpoint", required=True, help="run directory (newest complete checkpoint) or checkpoint directory")
        s.add_argument("--train", required=True, help="labelled image folder or massl-shard shards: the reference set")
        s.add_argument("--val", required=True, help="labelled image folder or massl-shard shards: the evaluated set")
        s.add_argument("--image-size", type=int, default=0, help="input size (default: the run's data.global_crop_size)")
        s.add_argument("--crop-ratio", type=float, default=0.875, help="resize to size/ratio, centre crop (1: whole image)")
        s.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
        s.add_argument("--workers", type=int, default=2, help="image loading processes per rank")
        s.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
        s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        s.add_argument("--random-init", action="store_true", help="the same architecture at random initialisation")
        s.add_argument("--weights", default="teacher", choices=["teacher", "random-init", "pixels"],
                       help="features of the trained teacher, of the same architecture at random init (= --random-init), "
                            "or the images' own pixels at the run's image size, flattened (the raw-pixel baseline)")
        s.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
        s.add_argument("--seed", type=int, default=0, help="random init, low-shot draws, SGD probe order and init")
        s.add_argument("--cache", default="", help="feature cache directory (off when empty)")
        s.add_argument("--out", default="", help="JSON result (default: <run>/eval/<cmd>[-random|-pixels]-<checkpoint>.json)")
    return p


def check_args(a: argparse.Namespace) -> None:
    """Refuse values that would give meaningless numbers, before any work (one line, exit 2)."""
    rules = [("--image-size", a.image_size, a.image_size >= 0, ">= 0"),
             ("--crop-ratio", a.crop_ratio, 0 < a.crop_ratio <= 1, "in (0, 1]"),
             ("--batch-size", a.batch_size, a.batch_size >= 1, ">= 1"),
             ("--workers", a.workers, a.workers >= 0, ">= 0"), ("--threads", a.threads, a.threads >= 0, ">= 0")]
    if a.cmd == "knn":
        rules += [("--k", a.k, min(a.k) >= 1, "integers >= 1"),
                  ("--temperature", a.temperature, math.isfinite(a.temperature) and a.temperature > 0, "> 0")]
    elif a.cmd == "linear":
        rules += [("--lrs", a.lrs, all(math.isfinite(v) and v > 0 for v in a.lrs), "numbers > 0"),
                  ("--epochs", a.epochs, a.epochs >= 1, ">= 1"),
                  ("--probe-batch-size", a.probe_batch_size, a.probe_batch_size >= 1, ">= 1"),
                  ("--holdout", a.holdout, 0 < a.holdout < 1, "in (0, 1)"),
                  ("--weight-decay", a.weight_decay, a.weight_decay >= 0, ">= 0"),
                  ("--n-last-blocks", a.n_last_blocks, a.n_last_blocks >= 1, ">= 1")]
    elif a.cmd == "lowshot":
        rules += [("--shots", a.shots, min(a.shots) >= 1, "integers >= 1"), ("--draws", a.draws, a.draws >= 1, ">= 1"),
                  ("--weight-decay", a.weight_decay, a.weight_decay >= 0, ">= 0")]
    else:
        rules += [("--recall-k", a.recall_k, min(a.recall_k) >= 1, "integers >= 1")]
    if a.weights == "pixels" and a.random_init:
        raise UserError("--random-init: not with --weights pixels; give one of them")
    a.random_init = a.random_init or a.weights == "random-init"
    for flag, value, ok, want in rules:
        if not ok:
            raise UserError(f"{flag}: must be {want}, got {value}")
    for flag, path in (("--train", a.train), ("--val", a.val)):
        if not os.path.exists(path):
            raise UserError(f"{flag}: {path!r} does not exist (a labelled image folder or massl-shard shards)")


def format_table(headers: list[str], rows: list[list]) -> str:
    """Text columns left-aligned, numbers right-aligned."""
    cells = [headers] + [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    left = [isinstance(rows[0][i], str) if rows else False for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if lf else c.rjust(w) for c, w, lf in zip(r, widths, left)).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def table(cmd: str, r: dict) -> str:
    res = r["results"]
    if cmd == "knn":
        return format_table(["k", "top-1", "top-5"], [[x["k"], x["top1"], x["top5"]] for x in res])
    if cmd == "lowshot":
        return format_table(["shots", "logreg top-1", "std", "ncm top-1", "std"],
                            [[x["shots"], x["logreg"]["top1_mean"], x["logreg"]["top1_std"], x["ncm"]["top1_mean"],
                              x["ncm"]["top1_std"]] for x in res])
    if cmd == "retrieval":
        return format_table(["mAP"] + [f"recall@{x['k']}" for x in res["recall"]],
                            [[res["mAP"]] + [x["recall"] for x in res["recall"]]])
    rows = [[f"sgd lr {x['lr']:g} (held-out)", x["top1"], ""] for x in res.get("heldout_top1", [])]
    chosen = f"sgd lr {res['best_lr']:g}" if res["solver"] == "sgd" else f"lbfgs wd {res['weight_decay']:g}"
    return format_table(["probe", "top-1", "top-5"], rows + [[chosen + " (val)", res["top1"], res["top5"]]])


def default_out(checkpoint_dir: str, name: str) -> str:
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_dir)))
    return os.path.join(run_dir, "eval", f"{name}-{os.path.basename(checkpoint_dir)}.json")


def checked_out(a: argparse.Namespace) -> str:
    """The JSON result's path (--out, or the default beside the run), its folder created and
    checked writable before any work: a result is never lost to a path found bad afterwards."""
    from ..checkpoint.reader import resolve_checkpoint

    suffix = {"random-init": "-random", "pixels": "-pixels"}.get(weights_name(a), "")
    out = a.out or default_out(os.path.abspath(resolve_checkpoint(a.checkpoint)), a.cmd + suffix)
    flag = "--out" if a.out else "--out (default)"
    folder = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag}: cannot create the folder of {out!r} ({e.strerror}); pass --out elsewhere") from None
    if os.path.isdir(out) or not os.access(folder, os.W_OK):
        raise UserError(f"{flag}: {out!r} cannot be written (a folder, or no write permission); pass --out elsewhere")
    return out


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    ours = not dist.is_initialized()  # a process group we start (torchrun, srun) we also end
    try:
        check_args(args)
        args.out = checked_out(args)
        result = evaluate(args)
    except UserError as e:
        _fail(str(e))
    finally:
        if ours and dist.is_initialized():
            dist.destroy_process_group()
    if result is None:  # not the main rank
        return
    out = args.out
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    skipped = result["skipped_train"] + result["skipped_val"]
    print(f"massl-eval {args.cmd} ({result['weights']}, {result['n_train']} train / {result['n_val']} val images"
          + (f", {skipped} unreadable skipped" if skipped else "") + f") -> {out}")
    print(table(args.cmd, result))


if __name__ == "__main__":  # torchrun -m massl.eval.cli ...
    main()
