"""massl trains what the published code trains: recipes, position embeddings of other crop sizes,
initialisation, schedules and KoLeo, each against an independent reference written here from
docs/method.md and the published code's definitions."""
from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from massl.config import load_config
from massl.models import build_backbone
from massl.train import train
from tests.distributed import run_ranks
from tests.engines_common import read_metrics, write_images

ROOT = os.path.join(os.path.dirname(__file__), "..")

# Every number of the two published commands (method.md, "Published hyper-parameters"), under
# massl's key names, plus the values that both share with the published code's defaults.
SHARED = {
    "optim.name": "adamw", "optim.weight_decay": 0.04, "optim.weight_decay_end": 0.4, "optim.clip_grad": 3.0,
    "optim.clip_mode": "per_param", "model.drop_path": 0.1, "model.head_use_bn": False, "model.patch_size": 16,
    "model.head_hidden_dim": 2048, "model.head_bottleneck_dim": 256, "model.head_layers": 3, "model.pooling": "cls",
    "model.pos_embed_interp": "dino", "memory.size": 131072, "memory.partition_size": 16384,
    "loss.student_temp": 0.1, "loss.warmup_teacher_temp": 0.04, "loss.teacher_temp": 0.07,
    "loss.koleo_weight": 0.0, "loss.koleo_scope": "local", "data.local_crops_number": 10,
    "data.global_crop_size": 224, "data.local_crop_size": 96, "data.global_crops_scale": [0.32, 1.0],
    "data.local_crops_scale": [0.05, 0.32],
}
PUBLISHED = {
    "configs/vit_base.yaml": {**SHARED, "model.arch": "vit_base", "data.batch_size": 32, "optim.epochs": 400,
                              "optim.lr": 0.00075, "optim.min_lr": 2e-6, "optim.teacher_momentum": 0.996,
                              "loss.warmup_teacher_temp_epochs": 50, "optim.warmup_epochs": 10},
    "configs/vit_small.yaml": {**SHARED, "model.arch": "vit_small", "data.batch_size": 64, "optim.epochs": 800,
                               "optim.lr": 0.0005, "optim.min_lr": 1e-6, "optim.teacher_momentum": 0.992,
                               "loss.warmup_teacher_temp_epochs": 30, "optim.warmup_epochs": 0},
}


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("path", sorted(PUBLISHED))
def test_shipped_recipes_are_the_published_commands(path):
    cfg = load_config(os.path.join(ROOT, path), check_paths=False)
    wrong = {k: (_get(cfg, k), v) for k, v in PUBLISHED[path].items() if _get(cfg, k) != v}
    assert not wrong, f"{path}: key: (ours, published) {wrong}"


# ----------------------------------------------------------------------------- backbone


def _published_pos_encoding(pos_embed, grid_h, grid_w):
    """The published ViT's interpolate_pos_encoding, for an input of grid_h x grid_w patches."""
    n = pos_embed.shape[1] - 1
    if grid_h * grid_w == n and grid_h == grid_w:
        return pos_embed
    dim = pos_embed.shape[-1]
    h0, w0 = grid_h + 0.1, grid_w + 0.1
    patch = F.interpolate(pos_embed[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
                          scale_factor=(h0 / math.sqrt(n), w0 / math.sqrt(n)), mode="bicubic")
    assert (int(h0), int(w0)) == patch.shape[-2:]
    return torch.cat((pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


def _published_forward(vit, x):
    """Patch embedding, CLS token, position encoding resized as published, blocks, norm, CLS output."""
    tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat((vit.cls_token.expand(len(x), -1, -1), tokens), dim=1)
    patch = vit.patch_embed.patch_size[0]
    tokens = tokens + _published_pos_encoding(vit.pos_embed, x.shape[-2] // patch, x.shape[-1] // patch)
    for block in vit.blocks:
        tokens = block(tokens)
    return vit.norm(tokens)[:, 0]


def test_backbone_resizes_position_embedding_as_published(tmp_path):
    cfg = load_config(None, [f"data.path={tmp_path}", "model.arch=custom", "model.embed_dim=48", "model.depth=2",
                             "model.num_heads=3", "model.drop_path=0"])
    torch.manual_seed(0)
    vit = build_backbone(cfg.model, 224).double().eval()
    with torch.no_grad():  # a smooth, trained-like embedding (the random init hides resampling differences)
        grid = torch.linspace(-1, 1, 14, dtype=torch.float64)
        waves = torch.stack([torch.sin(3 * grid[:, None] * (k + 1) + grid[None, :] * k) for k in range(48)], -1)
        vit.pos_embed[0, 1:] = waves.reshape(196, 48)
    g = torch.Generator().manual_seed(1)
    for size in (96, 224, 160):
        x = torch.randn(3, 3, size, size, generator=g, dtype=torch.float64)
        with torch.no_grad():
            assert torch.allclose(vit(x), _published_forward(vit, x), rtol=0, atol=1e-10), size
    # timm's own resampling is a different function of the same weights (what pos_embed_interp=timm gives)
    cfg.model.pos_embed_interp = "timm"
    timm_vit = build_backbone(cfg.model, 224).double().eval()
    timm_vit.load_state_dict(vit.state_dict())
    with torch.no_grad():
        assert (timm_vit(x[:, :, :96, :96]) - vit(x[:, :, :96, :96])).abs().max() > 1e-3


def test_cls_token_and_position_embedding_start_trunc_normal_0_02(tmp_path):
    cfg = load_config(None, [f"data.path={tmp_path}", "model.arch=vit_small"])
    torch.manual_seed(0)
    vit = build_backbone(cfg.model, 224)
    for name in ("cls_token", "pos_embed"):
        std = getattr(vit, name).detach().double().std().item()
        assert 0.017 < std < 0.023, (name, std)  # 384 draws (cls): the estimate is within 15% of 0.02


# ----------------------------------------------------------------------------- schedules


def _cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """The published utils.cosine_scheduler, from its definition."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, schedule))


def test_schedules_follow_the_published_formulas_at_every_step(tmp_path):
    """A whole short run (4 epochs of 3 steps, lr warm-up 2 epochs, teacher temperature warm-up 3):
    the lr, weight decay, teacher momentum and temperature it logged at each step."""
    data = write_images(str(tmp_path / "images"), n=24, size=24)
    out = str(tmp_path / "run")
    epochs, ipe, batch = 4, 3, 8
    cfg = load_config(None, [
        f"data.path={data}", f"run.output_dir={out}", "run.device=cpu", "run.tensorboard=false", "run.log_every=1",
        "run.threads=1", "model.arch=custom", "model.embed_dim=16", "model.depth=1", "model.num_heads=2",
        "model.patch_size=8", "model.head_hidden_dim=32", "model.head_bottleneck_dim=8", "data.global_crop_size=16",
        "data.local_crops_number=0", f"data.batch_size={batch}", "data.num_workers=0", "memory.size=32",
        "memory.partition_size=8", f"optim.epochs={epochs}", "optim.warmup_epochs=2", "optim.lr=0.1",
        "optim.min_lr=0.001", "optim.teacher_momentum=0.9", "loss.warmup_teacher_temp_epochs=3"])
    train(cfg)
    expected = {
        "lr": _cosine_scheduler(0.1 * batch / 256, 0.001, epochs, ipe, warmup_epochs=2),
        "wd": _cosine_scheduler(0.04, 0.4, epochs, ipe),
        "teacher_momentum": _cosine_scheduler(0.9, 1, epochs, ipe),
        "teacher_temp": np.concatenate((np.linspace(0.04, 0.07, 3 * ipe), np.ones((epochs - 3) * ipe) * 0.07)),
    }
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, epochs * ipe + 1))
    for r in records:  # the record of step s + 1 holds the values used by step s
        for key, values in expected.items():
            assert r[key] == pytest.approx(values[r["step"] - 1], rel=1e-12, abs=1e-15), (key, r["step"])


# ----------------------------------------------------------------------------- KoLeo


def _koleo_reference(x):
    """Published KoLeoLoss on one rank's rows, in float64: nearest neighbour by inner product."""
    x = x.double()
    dots = x @ x.T
    dots.fill_diagonal_(-1)
    nearest = dots.argmax(dim=1)
    return -torch.log((x - x[nearest] + 1e-8).norm(dim=1) + 1e-8).mean()


def _koleo_step(rank, world, data, sharded):
    """One training step of a ddp engine with KoLeo at the default scope, beside the published
    step written out here: each rank's loss over its own batch (MaSSL + KoLeo in float64 on its
    embeddings), gradients averaged over the ranks, plain SGD. Returns this rank's KoLeo value,
    its embeddings, and the weight changes of both."""
    from massl.dist import init_distributed
    from massl.engines import build_engine
    from massl.loss import massl_loss, random_partition_perm
    from massl.memory import MemoryBank
    from massl.models import build_student_teacher
    from massl.objective import MaSSLObjective
    from massl.schedules import Hyper
    from massl.train import train_step

    cfg = load_config(None, [
        f"data.path={data}", "run.device=cpu", "model.arch=custom", "model.embed_dim=16", "model.depth=1",
        "model.num_heads=2", "model.patch_size=8", "model.drop_path=0", "model.head_hidden_dim=32",
        "model.head_bottleneck_dim=8", "data.global_crop_size=16", "data.local_crop_size=8", "data.batch_size=4",
        "data.local_crops_number=1", "memory.size=32", "memory.partition_size=8", f"memory.sharded={str(sharded).lower()}",
        "loss.koleo_weight=0.5", "optim.name=sgd", "optim.clip_grad=0", "engine.name=ddp"])
    env = init_distributed("cpu")
    torch.manual_seed(0)
    student, teacher = build_student_teacher(cfg)
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    engine = build_engine(cfg, env, student, teacher)
    initial = [p.detach().clone() for p in ref_student.parameters()]
    objective = MaSSLObjective.from_config(cfg, env)
    assert objective.sharded == sharded
    full_memory = MemoryBank(8, 32, seed=0).bank.clone()
    captured = []
    engine.student.register_forward_hook(lambda module, args, out: captured.append(out.detach().clone()))
    g = torch.Generator().manual_seed(rank)
    colours = 3 * torch.randn(4, 3, 1, 1, generator=g)  # a colour per image: no near-tie of nearest neighbours
    crops = [colours + torch.randn(4, 3, size, size, generator=g) for size in (16, 16, 8)]
    h = Hyper(lr=0.05, wd=0.0, teacher_momentum=0.9, teacher_temp=0.05)
    koleo = train_step(engine, objective, crops, 0, h, monitor=True)["koleo"]

    zs = ref_student(crops)
    with torch.no_grad():
        zt = ref_teacher(crops[:2])
    perm = random_partition_perm(32, 0, 0, torch.device("cpu"))
    loss = massl_loss(zs, zt, full_memory, perm, 8, 0.1, 0.05) + 0.5 * 0.5 * (
        _koleo_reference(zs[0]) + _koleo_reference(zs[1]))
    loss.backward()
    ref_change = []
    for p in ref_student.parameters():
        torch.distributed.all_reduce(p.grad)
        ref_change.append(-0.05 * p.grad / world)
    change = [p.detach() - p0 for p, p0 in zip(engine.student.parameters(), initial)]
    return koleo, captured[0], change, ref_change


def test_koleo_default_scope_is_the_published_per_rank_term_for_either_memory_layout(tmp_path):
    for sharded in (True, False):
        for koleo, zs, change, ref_change in run_ranks(_koleo_step, 2, str(tmp_path), sharded):
            expected = 0.5 * (_koleo_reference(zs[0]) + _koleo_reference(zs[1]))
            assert abs(koleo.double() - expected) < 1e-5 * abs(expected), (sharded, koleo, expected)
            # the step's weight change is the published one, to float32 rounding (a factor W on
            # either term, or KoLeo over the global batch, changes it by a sizeable fraction)
            scale = max(d.abs().max().item() for d in ref_change)
            assert max((a - b).abs().max().item() for a, b in zip(change, ref_change)) <= 1e-3 * scale, sharded
