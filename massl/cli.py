"""Console entry points: massl-train, massl-eval, massl-export."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .config import ConfigError, load_config


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def train_main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="massl-train", description="MaSSL pretraining. Settings: YAML (--config) then dotted key=value overrides.",
        epilog="example: massl-train --config configs/quickstart.yaml optim.lr=1e-3 data.batch_size=32")
    p.add_argument("--config", help="YAML config file (defaults: the published ViT-B/16 recipe)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="this process's rank on its node, as the deepspeed launcher passes it (LOCAL_RANK is read first)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=1e-3")
    args = p.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = load_config(args.config, args.overrides, check_paths=not args.print_config)
    except ConfigError as e:
        _fail(str(e))
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return
    from .train import train

    try:
        train(cfg)
    except ConfigError as e:
        _fail(str(e))


def _default_eval_out(checkpoint_dir: str, name: str) -> str:
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_dir)))
    return os.path.join(run_dir, "eval", f"{name}-{os.path.basename(checkpoint_dir)}.json")


def _evaluate(args) -> dict:
    import torch

    from .checkpoint.reader import load_teacher_backbone, resolve_checkpoint
    from .dist import resolve_device
    from .eval.features import eval_transform, extract_features
    from .eval.knn import knn_classify
    from .eval.linear import linear_probe_accuracy

    for key in ("train", "val"):
        if not os.path.isdir(getattr(args, key)):
            _fail(f"--{key}: directory {getattr(args, key)!r} does not exist")
    ckpt_dir = resolve_checkpoint(args.checkpoint)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, key="--device")
    backbone, cfg = load_teacher_backbone(ckpt_dir, random_init=args.random_init, seed=args.seed)
    tf = eval_transform(cfg, args.image_size, args.crop_ratio)
    train_f, train_y, classes = extract_features(backbone, args.train, tf, args.batch_size, args.workers, device)
    val_f, val_y, val_classes = extract_features(backbone, args.val, tf, args.batch_size, args.workers, device)
    if val_classes != classes:
        _fail(f"--train and --val have different class folders ({len(classes)} vs {len(val_classes)})")
    if args.cmd == "knn":
        result = knn_classify(train_f, train_y, val_f, val_y, k=args.k, temperature=args.temperature,
                              num_classes=len(classes))
    else:
        result = linear_probe_accuracy(train_f, train_y, val_f, val_y, len(classes), args.weight_decay)
    result.update(checkpoint=ckpt_dir, weights="random-init" if args.random_init else "teacher")
    return result


def eval_main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="massl-eval", description="Evaluate a trained teacher backbone.")
    sub = p.add_subparsers(dest="cmd", required=True)
    knn = sub.add_parser("knn", help="weighted k-NN on labelled image folders (DINO protocol)")
    knn.add_argument("--k", type=int, default=20)
    knn.add_argument("--temperature", type=float, default=0.07)
    lin = sub.add_parser("linear", help="linear probe on frozen features (L-BFGS, L2 penalty)")
    lin.add_argument("--weight-decay", type=float, default=1e-4, help="L2 penalty on the probe's weights")
    for k in (knn, lin):
        _common_eval_args(k)
    args = p.parse_args(argv)
    try:
        result = _evaluate(args)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    name = args.cmd + ("-random" if args.random_init else "")
    out = args.out or _default_eval_out(result["checkpoint"], name)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    detail = f", k={result['k']}, T={result['temperature']}" if args.cmd == "knn" else ""
    print(f"{args.cmd} ({result['weights']}{detail}): top-1 {result['top1']:.4f} "
          f"top-5 {result['top5']:.4f} on {result['n_test']} images -> {out}")


def _common_eval_args(k: argparse.ArgumentParser) -> None:
    k.add_argument("--checkpoint", required=True, help="run directory (newest complete checkpoint) or checkpoint directory")
    k.add_argument("--train", required=True, help="labelled image folder (class sub-folders): k-NN memory / probe training set")
    k.add_argument("--val", required=True, help="labelled image folder to classify")
    k.add_argument("--image-size", type=int, default=0, help="input size (default: the run's data.global_crop_size)")
    k.add_argument("--crop-ratio", type=float, default=0.875, help="resize to size/ratio then center-crop (1.0: whole image)")
    k.add_argument("--batch-size", type=int, default=256)
    k.add_argument("--workers", type=int, default=2)
    k.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    k.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    k.add_argument("--random-init", action="store_true", help="evaluate the same architecture at random initialisation")
    k.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    k.add_argument("--out", default="", help="JSON result file (default: <run>/eval/<cmd>[-random]-<checkpoint>.json)")


def export_main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="massl-export", description="Write the teacher backbone as a timm state dict.")
    p.add_argument("--checkpoint", required=True, help="run directory (newest complete checkpoint) or checkpoint directory")
    p.add_argument("--out", required=True, help="output file: .safetensors, .pth or .pt (timm spec in <out>.json)")
    args = p.parse_args(argv)
    from .export import export_teacher

    try:
        spec = export_teacher(args.checkpoint, args.out)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    kw = ", ".join(f"{k}={v!r}" for k, v in spec["kwargs"].items())
    print(f"wrote {args.out}; load with timm.create_model({spec['model_name']!r}, {kw}) "
          f"and load_state_dict(..., strict=True)")


if __name__ == "__main__":
    train_main()
