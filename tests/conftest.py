"""Shared fixtures: a small real image folder (the sklearn digits) and a tiny CPU training config."""
from __future__ import annotations

import os

import pytest

from massl.config import load_config


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    from massl.tools.digits import write_digits

    root = tmp_path_factory.mktemp("digits")
    write_digits(str(root), size=32)  # as the quickstart writes them
    return str(root)


@pytest.fixture(scope="session")
def images():
    """Four fixed random images for comparing teacher features across engines and world sizes."""
    import torch

    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(123))


@pytest.fixture(scope="session")
def digit_shards(digits_dir, tmp_path_factory):
    """60 digits in 3 WebDataset shards of 20 (a list file keeps them independent of the folder's size)."""
    from massl.tools.shard import write_shards

    root = tmp_path_factory.mktemp("wds")
    train = os.path.join(digits_dir, "train")
    paths = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(train) for f in fs)[:60]
    (root / "list.txt").write_text("".join(f"{p}\n" for p in paths))
    out = str(root / "shards")
    write_shards(str(root / "list.txt"), out, maxcount=20, progress=False)
    return out


# The suite's tiny ViT (about 0.1 s per step at 16 px), for the overrides below and the engine
# tests' config (tests/engines_common.py).
TINY_MODEL = {"arch": "custom", "embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "drop_path": 0.0,
              "head_hidden_dim": 64, "head_bottleneck_dim": 16}


def tiny_overrides(data_path: str, output_dir: str) -> list[str]:
    """A run of the tiny ViT small enough for multi-step CPU tests."""
    return [
        f"data.path={data_path}", f"run.output_dir={output_dir}", "run.device=cpu", "run.tensorboard=false",
        "run.log_every=1", "run.threads=1",
        *(f"model.{key}={value}" for key, value in TINY_MODEL.items()),
        "data.global_crop_size=16", "data.local_crop_size=8", "data.local_crops_number=2", "data.batch_size=8",
        "data.num_workers=0", "memory.size=64", "memory.partition_size=16",
        "optim.epochs=2", "optim.warmup_epochs=1", "loss.warmup_teacher_temp_epochs=1",
    ]


@pytest.fixture
def tiny_config(digits_dir, tmp_path):
    def make(*extra: str, output_dir: str | None = None):
        out = output_dir or os.path.join(str(tmp_path), "run")
        return load_config(None, tiny_overrides(os.path.join(digits_dir, "train"), out) + list(extra))

    return make


@pytest.fixture(scope="session")
def tiny_run(digits_dir, tmp_path_factory):
    """A run directory with one checkpoint (2 steps of the tiny config), for evaluation tests."""
    from massl.train import train

    out = str(tmp_path_factory.mktemp("tiny_run"))
    train(load_config(None, tiny_overrides(os.path.join(digits_dir, "train"), out) + ["run.max_steps=2"]))
    return out


# Files whose tests start several processes, a launcher, Slurm or a training of hundreds of steps:
# `pytest -m "not slow"` leaves them out (the inner loop's fast subset; README, "Development").
SLOW_FILES = {
    "test_checkpoint_compat.py", "test_deepspeed_setup.py", "test_digits_learning.py", "test_engines_bench.py",
    "test_engines_deepspeed.py", "test_engines_distributed.py", "test_engines_resume.py", "test_eval_periodic.py",
    "test_fsdp_reshard.py", "test_history.py", "test_host_sync.py", "test_multinode.py", "test_no_hang.py",
    "test_resume.py", "test_scaling.py", "test_sharded_memory.py", "test_slurm.py",
}


# Files that start a cluster of their own (a private Slurm, the two-node namespaces): with
# pytest-xdist (`-n 2 --dist loadgroup`, as scripts/run_tests.sh runs the suite) they run one after
# the other in one worker, never beside each other.
CLUSTER_FILES = {"test_slurm.py", "test_multinode.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
        if item.path.name in CLUSTER_FILES:
            item.add_marker(pytest.mark.xdist_group("cluster"))
