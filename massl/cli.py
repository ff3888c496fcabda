"""Console entry points: massl-train, massl-eval, massl-export."""
from __future__ import annotations

import argparse
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
    p.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=1e-3")
    args = p.parse_args(argv)
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


def eval_main(argv=None) -> None:
    from .eval.cli import main

    main(argv)


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
