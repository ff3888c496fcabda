"""data.source=webdataset: per-rank/worker split, epochs, resume, resampling, damaged shards, pipe: URLs."""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
import tarfile

import pytest
import torch
import torch.distributed as dist
from PIL import Image

from massl.tools.shard import ShardWriter, main as shard_main
from massl.config import load_config
from massl.data import build_data
from massl.data.epoch_plan import epoch_pieces, worker_span
from massl.errors import UserError
from massl.train import train
from tests.distributed import run_ranks

TINY = ["data.source=webdataset", "data.global_crop_size=16", "data.local_crop_size=8", "data.local_crops_number=1",
        "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8", "model.arch=custom",
        "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.patch_size=8"]


def wds_config(urls: str, *extra: str, output_dir: str = "runs/unused"):
    return load_config(None, TINY + [f"data.urls={urls}", f"run.output_dir={output_dir}"] + list(extra))


def epoch_batches(src, epoch: int, start: int = 0) -> list:
    return [(b.keys, [c.clone() for c in b.crops], b.skipped) for b in src.epoch(epoch, start)]


@pytest.fixture(scope="module")
def shards(digit_shards):
    with open(os.path.join(digit_shards, "manifest.json")) as f:
        assert [s["samples"] for s in json.load(f)["shards"]] == [20, 20, 20]
    return digit_shards


def _two_epochs_on_rank(rank: int, world: int, urls: str):
    torch.multiprocessing.set_start_method("fork", force=True)  # as under torchrun; spawn is slower to start
    src = build_data(wds_config(urls, "data.num_workers=2"), rank, world)
    epochs = []
    for e in (0, 1):
        keys = []
        for b in src.epoch(e):
            dist.all_reduce(torch.ones(1))  # one collective per batch, as in the loop: a rank that ran dry would hang
            assert len(b.keys) == 4 and b.crops[0].shape == (4, 3, 16, 16)
            keys.append(b.keys)
        epochs.append(keys)
    return src.iters_per_epoch, epochs


def test_two_ranks_two_workers_three_shards(shards):
    (ipe0, r0), (ipe1, r1) = run_ranks(_two_epochs_on_rank, 2, shards, timeout=240)
    assert ipe0 == ipe1 == 60 // 8
    all_keys = set(_manifest_keys(shards))
    for e in (0, 1):
        assert len(r0[e]) == len(r1[e]) == ipe0
        flat = [k for batch in r0[e] + r1[e] for k in batch]
        assert len(flat) == len(set(flat)) == 56 and set(flat) <= all_keys  # no duplicate within an epoch
    order = lambda e: [k for batch in r0[e] + r1[e] for k in batch]  # noqa: E731
    assert order(0) != order(1)


def _manifest_keys(folder: str) -> list[str]:
    keys = []
    for name in sorted(f for f in os.listdir(folder) if f.endswith(".tar")):
        with tarfile.open(os.path.join(folder, name)) as t:
            keys += sorted({m.name.split(".", 1)[0] for m in t.getmembers()})
    return keys


def test_resume_mid_epoch_is_exact_and_deterministic(shards):
    src = build_data(wds_config(shards, "data.num_workers=2"), 0, 1)
    full = epoch_batches(src, 1)
    resumed = epoch_batches(src, 1, start=5)
    assert len(full) == 15 and len(resumed) == 10
    for (k1, c1, _), (k2, c2, _) in zip(full[5:], resumed):
        assert k1 == k2 and all(torch.equal(a, b) for a, b in zip(c1, c2))
    in_process = epoch_batches(build_data(wds_config(shards, "data.num_workers=1"), 0, 1), 1)
    assert [b[0] for b in in_process] != [b[0] for b in full]  # 1 worker reads the rank's span in another order
    no_workers = epoch_batches(build_data(wds_config(shards, "data.num_workers=0"), 0, 1), 1)
    assert all(a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1], b[1])) for a, b in zip(in_process, no_workers))
    other_seed = epoch_batches(build_data(wds_config(shards, "run.seed=1"), 0, 1), 1)
    assert [b[0] for b in other_seed] != [b[0] for b in no_workers]


def test_samples_per_epoch_redraws_or_subsets(shards):
    twice = build_data(wds_config(shards, "data.samples_per_epoch=120"), 0, 1)
    keys = [k for b in twice.epoch(0) for k in b.keys]
    assert twice.iters_per_epoch == 30 and sorted(keys) == sorted(_manifest_keys(shards) * 2)
    part = build_data(wds_config(shards, "data.samples_per_epoch=20"), 0, 1)
    e0, e1 = ([k for b in part.epoch(e) for k in b.keys] for e in (0, 1))
    assert part.iters_per_epoch == 5 and len(set(e0)) == 20 and set(e0) != set(e1)


def test_plan_partitions_every_epoch_slot():
    counts = [7, 0, 13, 5]
    for world, workers, ipe, batch in ((2, 3, 4, 3), (3, 2, 5, 1)):
        spans = sorted(worker_span(r, w, ipe, workers, batch) for r in range(world) for w in range(workers))
        assert spans[0][0] == 0 and spans[-1][1] == world * ipe * batch
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    pieces = epoch_pieces(counts, seed=0, epoch=3, lo=0, hi=50)  # two passes, the second in a new order
    assert sum(p.stop - p.start for p in pieces) == 50 and [p.position for p in pieces][0] == 0
    assert all(a.position + a.stop - a.start == b.position for a, b in zip(pieces, pieces[1:]))
    assert sorted(p.shard for p in pieces[:3]) == sorted(p.shard for p in pieces[3:6]) == [0, 2, 3]
    orders = {tuple(p.shard for p in epoch_pieces(counts, 0, e, 0, 25)) for e in range(6)}
    assert len(orders) > 1  # the shard order changes with the epoch


def test_pipe_urls_read_the_same_samples(shards):
    local = epoch_batches(build_data(wds_config(shards), 0, 1), 0)
    pattern = os.path.join(shards, "shard-{000000..000002}.tar")
    piped = epoch_batches(build_data(wds_config(f"pipe:cat {pattern}", f"data.manifest={shards}/manifest.json"), 0, 1), 0)
    assert [b[0] for b in piped] == [b[0] for b in local]
    assert all(torch.equal(x, y) for a, b in zip(piped, local) for x, y in zip(a[1], b[1]))


@pytest.fixture
def damaged_shards(shards, tmp_path):
    """Copies of the shards: one sample of shard 0 holds a truncated JPEG, shard 2 is cut short
    after indexing. Returns (folder, number of samples that cannot be used)."""
    out = str(tmp_path / "damaged")
    os.makedirs(out)
    with tarfile.open(os.path.join(shards, "shard-000000.tar")) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
    jpeg = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 30, 200)).save(jpeg, "JPEG")
    samples: dict = {}
    for name, data in members:
        key, ext = name.split(".", 1)
        samples.setdefault(key, []).append((ext, data))
    w = ShardWriter(out, "shard-000000.tar")
    for i, (key, files) in enumerate(samples.items()):
        if i == 3:  # a JPEG cut short, in place of this sample's image
            files = [("jpg", jpeg.getvalue()[:-200])] + [f for f in files if f[0] == "json"]
        w.add(key, files)
    w.finish()
    for n in ("shard-000001.tar", "shard-000002.tar"):
        shutil.copy(os.path.join(shards, n), out)
    assert shard_main(["index", "--out", os.path.join(out, "manifest.json"), os.path.join(out, "shard-{000000..000002}.tar")]) == 0
    cut_path = os.path.join(out, "shard-000002.tar")
    cut = os.path.getsize(cut_path) * 2 // 5
    with tarfile.open(cut_path) as t:  # samples whose image data lies wholly before the cut stay readable
        readable = sum(1 for m in t.getmembers() if m.name.endswith(".png") and m.offset_data + m.size <= cut)
    with open(cut_path, "r+b") as f:
        f.truncate(cut)
    return out, 1 + (20 - readable)


def test_damaged_shards_are_skipped_and_counted(damaged_shards, capfd):
    folder, unusable = damaged_shards
    src = build_data(wds_config(folder, "data.batch_size=5", "data.num_workers=2"), 0, 1)
    batches = epoch_batches(src, 0)
    assert len(batches) == src.iters_per_epoch == 12  # every slot of the epoch is used: 60 / 5
    assert unusable > 5 and sum(b[2] for b in batches) == unusable
    err = capfd.readouterr().err
    assert "shard-000002.tar" in err and "skipping sample" in err


def test_training_runs_on_damaged_shards(damaged_shards, tmp_path):
    folder, unusable = damaged_shards
    cfg = wds_config(folder, "data.batch_size=6", "run.device=cpu", "run.tensorboard=false", "run.log_every=1",
                     "run.threads=1", "model.drop_path=0.0", "model.head_hidden_dim=32",
                     "model.head_bottleneck_dim=16", "memory.size=24", "memory.partition_size=12",
                     "optim.epochs=1", "optim.warmup_epochs=0", "loss.warmup_teacher_temp_epochs=0",
                     output_dir=str(tmp_path / "run"))
    summary = train(cfg)  # one epoch: 10 steps over all 60 slots
    assert summary["step"] == 10 and math.isfinite(summary["loss"])
    assert summary["skipped_images"] == unusable  # the loop's running count of replaced samples


def test_clear_errors(shards, tmp_path, monkeypatch):
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(os.path.join(shards, "shard-000000.tar"), lonely)
    with pytest.raises(ValueError, match="data.manifest"):
        build_data(wds_config(str(lonely / "shard-000000.tar")), 0, 1)
    with pytest.raises(ValueError, match="data.samples_per_epoch"):
        build_data(wds_config(shards, "data.batch_size=40"), 0, 2)
    monkeypatch.setitem(sys.modules, "webdataset", None)
    with pytest.raises(UserError, match=r"pip install 'massl\[webdataset\]'"):  # one error line, exit 2
        build_data(wds_config(shards), 0, 1)
