"""Model FLOPs of a step (massl/flops.py) against a count by hand, and MFU in the run's metrics."""
from __future__ import annotations

import json
import os

import torch

from massl.config import Config
from massl.flops import peak_flops, step_flops_per_image
from massl.train import train

# ViT: width d, depth L, patch p, MLP ratio 4; head H hidden, D out; the crops' token counts n
D_MODEL, DEPTH, PATCH, HIDDEN, OUT = 32, 2, 8, 64, 16
GLOBAL, LOCAL, N_LOCAL, BATCH, K, P = 32, 16, 2, 4, 256, 64


def small_vit_config() -> Config:
    cfg = Config()
    m, d = cfg.model, cfg.data
    m.arch, m.embed_dim, m.depth, m.num_heads, m.patch_size = "custom", D_MODEL, DEPTH, 2, PATCH
    m.head_hidden_dim, m.head_bottleneck_dim, m.head_layers = HIDDEN, OUT, 3
    d.global_crop_size, d.local_crop_size, d.local_crops_number, d.batch_size = GLOBAL, LOCAL, N_LOCAL, BATCH
    cfg.memory.size, cfg.memory.partition_size = K, P
    return cfg


def hand_count_per_image() -> float:
    """Multiply-adds x 2 of every matrix product of one step, per image."""
    d = D_MODEL

    def tokens(size):
        return (size // PATCH) ** 2 + 1  # patches + CLS

    def patch_embed(n):
        return 2 * (n - 1) * (3 * PATCH * PATCH) * d

    def forward(n):
        block = 2 * n * (3 * d * d + d * d + 4 * d * d + 4 * d * d) + 2 * (2 * n * n * d)  # qkv, proj, MLP; QK^T, AV
        head = 2 * (d * HIDDEN + HIDDEN * HIDDEN + HIDDEN * OUT)  # on the CLS token only
        return patch_embed(n) + DEPTH * block + head

    views = [tokens(GLOBAL)] * 2 + [tokens(LOCAL)] * N_LOCAL
    student = sum(3 * forward(n) - patch_embed(n) for n in views)  # backward 2x, no gradient for the pixels
    teacher = sum(forward(n) for n in views[:2])
    v, parts = len(views), K // P
    loss = (2 * (v + 2) * OUT * K  # logits of the student's and teacher's rows against the memory
            + 2 * (v + 2) * K * parts  # per-partition sums
            + 2 * 2 * K * OUT  # teacher targets pulled back to embedding space
            + 2 * v * K * OUT)  # backward: the student rows' gradient
    return float(student + teacher + loss)


def test_step_flops_match_a_count_by_hand():
    counted, expected = step_flops_per_image(small_vit_config()), hand_count_per_image()
    assert abs(counted - expected) <= 0.05 * expected, (counted, expected)


def test_counting_leaves_the_run_untouched():
    """Counted on the meta device: no RNG draw, nothing of the run is built or changed."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    step_flops_per_image(small_vit_config())
    assert torch.equal(torch.get_rng_state(), before)
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), 2.5) == 2.5e12


def test_mfu_in_metrics_and_progress_line(tiny_config, capsys):
    cfg = tiny_config("run.max_steps=3", "run.peak_tflops=0.001")
    train(cfg)
    records = [json.loads(line) for line in open(os.path.join(cfg.run.output_dir, "metrics.jsonl"))]
    flops = step_flops_per_image(cfg)
    assert len(records) == 3
    for r in records:
        assert abs(r["mfu"] - flops * r["img_per_s"] / 1e9) <= 1e-9 * r["mfu"], r
    assert " mfu " in capsys.readouterr().out
