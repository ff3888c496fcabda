"""How exact the memory-bank loss stays if its logits took bf16 operands (fp32 accumulation).

The loss computes z.m / t in fp32. bf16 operands with fp32 accumulation and fp32 output (what a
GPU's `torch.mm(a, b, out_dtype=torch.float32)` gives) are emulated exactly on the CPU by rounding
the operands to bf16 and multiplying in fp32. Compared, against a float64 loss and its gradient
with respect to the student embeddings:

- fp32: the current loss;
- bf16 embeddings: the student and teacher embeddings rounded to bf16, the memory in fp32 (what a
  bf16 projection head already gives the loss today);
- bf16 logit operands: embeddings and memory rounded to bf16.

Embeddings are unit vectors at cosine `c` from random memory columns (c = 0: random; 0.9: the
peaked targets of a trained model). Prints relative errors and writes JSON.

    python benchmarks/bench_logits_precision.py --out benchmarks/results/logits_precision_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from massl.loss import massl_loss, random_partition_perm  # noqa: E402


def near_columns(n: int, memory: torch.Tensor, cos: float, g: torch.Generator) -> torch.Tensor:
    """n unit vectors, each at cosine `cos` from a random column of `memory` [D, K]."""
    idx = torch.randint(0, memory.shape[1], (n,), generator=g)
    noise = F.normalize(torch.randn(n, memory.shape[0], generator=g, dtype=torch.float64), dim=-1)
    return F.normalize(cos * memory[:, idx].T + (1 - cos ** 2) ** 0.5 * noise, dim=-1)


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(x.dtype)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--views", type=int, default=12)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--size", type=int, default=32768)
    p.add_argument("--partition-size", type=int, default=4096)
    p.add_argument("--student-temp", type=float, default=0.1)
    p.add_argument("--teacher-temps", type=float, nargs="+", default=[0.04, 0.07])
    p.add_argument("--cosines", type=float, nargs="+", default=[0.0, 0.5, 0.9])
    p.add_argument("--out")
    a = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(a.dim, a.size, generator=g, dtype=torch.float64), dim=0)
    perm = random_partition_perm(a.size, 0, 0, torch.device("cpu"))
    rows = []
    print(f"V={a.views} B={a.batch} D={a.dim} K={a.size} P={a.partition_size} t_s={a.student_temp}")
    print("| teacher temp | cosine | variant | loss rel. error | gradient rel. error |\n| ---: | ---: | --- | ---: | ---: |")
    for t_temp in a.teacher_temps:
        for cos in a.cosines:
            zs = near_columns(a.views * a.batch, memory, cos, g).view(a.views, a.batch, a.dim)
            zt = near_columns(2 * a.batch, memory, cos, g).view(2, a.batch, a.dim)
            variants = {"float64": (zs, zt, memory, torch.float64), "fp32": (zs, zt, memory, torch.float32),
                        "bf16 embeddings": (bf16(zs), bf16(zt), memory, torch.float32),
                        "bf16 logit operands": (bf16(zs), bf16(zt), bf16(memory), torch.float32)}
            results = {}
            for name, (s, t, m, dtype) in variants.items():
                x = s.to(dtype).clone().requires_grad_()
                loss = massl_loss(x, t.to(dtype), m.to(dtype), perm, a.partition_size, a.student_temp, t_temp)
                loss.backward()
                results[name] = (loss.double(), x.grad.double())
            ref_loss, ref_grad = results.pop("float64")
            for name, (loss, grad) in results.items():
                row = {"teacher_temp": t_temp, "cosine": cos, "variant": name, "loss": loss.item(),
                       "loss_rel_error": abs(loss - ref_loss).item() / abs(ref_loss).item(),
                       "grad_rel_error": ((grad - ref_grad).norm() / ref_grad.norm()).item()}
                rows.append(row)
                print(f"| {t_temp} | {cos} | {name} | {row['loss_rel_error']:.1e} | {row['grad_rel_error']:.1e} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"settings": vars(a), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
