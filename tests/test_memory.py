"""The memory ring on its own (FIFO order, state) and inside the loop (what is enqueued, and when)."""
import json
import os

import torch
import torch.nn.functional as F

from massl.data import build_data
from massl.loss import random_partition_perm
from massl.memory import MemoryBank
from massl.models import build_student_teacher
from massl.train import train
from tests.reference import FifoReference, massl_loss_reference


def test_fifo_order_and_wraparound():
    bank = MemoryBank(dim=4, size=12, seed=1)
    ref = FifoReference(bank.bank)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # 5 x 4 keys: wraps around the 12 slots
        keys = F.normalize(torch.randn(4, 4, generator=g), dim=-1)
        bank.enqueue(keys)
        ref.enqueue(keys)
        assert torch.equal(bank.bank, ref.memory)
        assert bank.ptr == ref.ptr


def test_initial_memory_is_unit_norm_and_seeded():
    a, b = MemoryBank(8, 32, seed=3), MemoryBank(8, 32, seed=3)
    assert torch.equal(a.bank, b.bank)
    assert torch.allclose(a.bank.norm(dim=0), torch.ones(32))


def test_state_roundtrip():
    bank = MemoryBank(4, 8, seed=0)
    bank.enqueue(torch.ones(4, 4))
    other = MemoryBank(4, 8, seed=9)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.bank, bank.bank) and other.ptr == 4


def test_loop_enqueues_teacher_view1_after_the_loss(tiny_config):
    """One real training step: the logged loss uses the memory *before* the update, and the update
    writes the initial teacher's embeddings of global view 1 (not view 0) into slots [0, G)."""
    cfg = tiny_config("run.max_steps=1", "run.checkpoint_every=1")
    train(cfg)
    logged = json.loads(open(os.path.join(cfg.run.output_dir, "metrics.jsonl")).readline())["loss"]

    # Rebuild the step's inputs independently: same seed -> same initial weights, memory and crops.
    torch.manual_seed(cfg.run.seed)
    student, teacher = build_student_teacher(cfg)
    memory0 = MemoryBank(cfg.model.head_bottleneck_dim, cfg.memory.size, seed=cfg.run.seed).bank
    data = build_data(cfg, 0, 1)  # crops leave the loader as uint8; prepare() normalises them
    crops = data.prepare(next(iter(data.epoch(0))), torch.device("cpu"))
    with torch.no_grad():
        zs, zt = student(crops), teacher(crops[:2])
    perm = random_partition_perm(cfg.memory.size, cfg.run.seed, 0, torch.device("cpu"))
    temp = cfg.loss.warmup_teacher_temp
    before = massl_loss_reference(zs.double(), zt.double(), memory0.double(), perm, cfg.memory.partition_size,
                                  cfg.loss.student_temp, temp)
    assert abs(logged - before.item()) < 1e-5 * before.item()

    memory_dir = os.path.join(cfg.run.output_dir, "checkpoints", "step_000000001", "memory")
    (slots_file,) = os.listdir(memory_dir)  # one process: one file with all the slots
    state = torch.load(os.path.join(memory_dir, slots_file), weights_only=True)
    G = cfg.data.batch_size
    assert state["ptr"] == G
    assert torch.allclose(state["bank"][:, :G], zt[1].T, atol=1e-5)  # computed here with other thread counts
    assert not torch.allclose(state["bank"][:, :G], zt[0].T, atol=1e-3)
    assert torch.equal(state["bank"][:, G:], memory0[:, G:])
    after = massl_loss_reference(zs.double(), zt.double(), state["bank"].double(), perm,
                                 cfg.memory.partition_size, cfg.loss.student_temp, temp)
    assert abs(logged - after.item()) > 1e-3  # the updated memory would give another loss
