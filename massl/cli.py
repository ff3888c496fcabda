"""Console entry points: massl-train, massl-eval, massl-export."""
from __future__ import annotations

import argparse
import os

from .config import load_config
from .errors import UserError
from .errors import fail as _fail
from .trust import TRUST_HELP


def train_main(argv=None) -> None:
    """Exit status: 0 trained to the end, 2 a user error, STOPPED_EXIT (75) stopped by SIGTERM or
    SIGUSR1 at a checkpoint (the same command continues the run), 1 anything else."""
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
    except UserError as e:
        _fail(e)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return
    from .signals import exit_stopped, stop_signals_recorded

    with stop_signals_recorded():  # from here on a stop signal is never lost
        if "LOCAL_RANK" in os.environ:  # a rank of a launcher (torchrun, deepspeed, srun): if it dies,
            import signal  # this rank stops at an agreed step and checkpoints, not trains on alone

            from .signals import die_with_parent

            die_with_parent(signal.SIGTERM)
        from .train import train

        try:
            summary = train(cfg)
        except UserError as e:
            _fail(e)
        if summary.get("stopped_by_signal"):
            exit_stopped()


def eval_main(argv=None) -> None:
    from .eval.cli import main

    main(argv)


def export_main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="massl-export", description="Write the teacher backbone as a timm state dict.")
    p.add_argument("--checkpoint", required=True, help="run directory (newest complete checkpoint) or checkpoint directory")
    p.add_argument("--out", required=True, help="output file: .safetensors, .pth or .pt (timm spec in <out>.json)")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    args = p.parse_args(argv)
    from .export import export_teacher

    try:
        spec = export_teacher(args.checkpoint, args.out, args.trust_checkpoint)
    except UserError as e:
        _fail(e)
    kw = ", ".join(f"{k}={v!r}" for k, v in spec["kwargs"].items())
    print(f"wrote {args.out}; load with timm.create_model({spec['model_name']!r}, {kw}) "
          f"and load_state_dict(..., strict=True) (the kwargs set the shape; the name only picks timm's "
          f"VisionTransformer; {args.out}.json holds both)")


if __name__ == "__main__":
    train_main()
