"""Per-rank cost of the memory-bank loss path from W = 8 to 4096 ranks, sharded vs replicated.

Not a measurement: the formulas of massl/scaling.py (checked against gloo runs at W = 1, 2, 4 by
tests/test_scaling.py) evaluated at the published shapes, printed as the table of docs/scaling.md.

    python benchmarks/scaling_model.py                      # ViT-B/16 recipe: 32 images per GPU
    python benchmarks/scaling_model.py --batch 64 --out scaling.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from massl.scaling import (LossShape, bytes_moved, choose_sharded, crossover_world, loss_flops,  # noqa: E402
                           memory_bytes)

MIB = 2**20


def rows(args) -> list[dict]:
    out = []
    world = args.min_world
    while world <= args.max_world:
        shape = LossShape(world, args.batch, 2 + args.local_crops, args.dim, args.size, args.partition_size)
        if args.size % shape.global_batch == 0:  # the ring needs K to be a multiple of G
            row = {"world": world, "global_batch": shape.global_batch, "auto": "sharded" if choose_sharded(shape) else "replicated"}
            for name, sharded in (("sharded", True), ("replicated", False)):
                mem = memory_bytes(shape, sharded)
                row[name] = {"moved_mib": bytes_moved(shape, sharded) / MIB, "memory_mib": mem["total"] / MIB,
                             "bank_mib": mem["bank"] / MIB, "gathered_mib": (mem["embeddings"] + mem["partition_sums"]) / MIB,
                             "loss_gflop": loss_flops(shape, sharded) / 1e9}
            out.append(row)
        world *= 2
    return out


def table(rs: list[dict]) -> str:
    lines = ["| W | G | moved MiB/rank sharded | replicated | memory MiB/rank sharded | replicated | "
             "of which bank, sharded | replicated | loss GFLOP/rank (both) | auto |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rs:
        s, p = r["sharded"], r["replicated"]
        lines.append(f"| {r['world']} | {r['global_batch']} | {s['moved_mib']:.1f} | {p['moved_mib']:.2f} | "
                     f"{s['memory_mib']:.0f} | {p['memory_mib']:.0f} | {s['bank_mib']:.2f} | {p['bank_mib']:.0f} | "
                     f"{s['loss_gflop']:.0f} | {r['auto']} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32, help="images per rank (published ViT-B/16: 32, ViT-S/16: 64)")
    p.add_argument("--local-crops", type=int, default=10)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--size", type=int, default=131072)
    p.add_argument("--partition-size", type=int, default=16384)
    p.add_argument("--min-world", type=int, default=8)
    p.add_argument("--max-world", type=int, default=4096)
    p.add_argument("--out", help="JSON of the rows")
    args = p.parse_args(argv)
    rs = rows(args)
    cross = crossover_world(args.batch, 2 + args.local_crops, args.dim, args.size, args.partition_size)
    print(f"B={args.batch}/rank, V={2 + args.local_crops}, D={args.dim}, K={args.size}, P={args.partition_size}: "
          f"memory crossover at W = {cross:.1f}")
    print(table(rs))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"settings": vars(args), "crossover_world": cross, "rows": rs}, f, indent=1)
    return rs


if __name__ == "__main__":
    main()
