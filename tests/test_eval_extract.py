"""Feature extraction: W=2 ranks (gloo) equal one process on an odd-sized input, image folders
and massl-shard shards give the same features, unreadable images are skipped and named, and the
feature cache is keyed by what the features depend on."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from massl.config import ModelConfig
from massl.eval.cache import cache_key, load_cached, weights_digest
from massl.eval.extract import eval_transform, extract_features
from massl.eval.inputs import ImageFolderInput, ShardInput, open_input
from massl.models import build_backbone
from tests.distributed import run_ranks

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
SIZE = 16


def write_folder(root: str, counts=(4, 4, 3), bad: str = "b/bad.png", seed: int = 0) -> str:
    """Classes a, b, c of random 20x24 RGB images (`counts` per class) plus one unreadable file."""
    rng = np.random.default_rng(seed)
    for c, n in zip("abc", counts):
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(os.path.join(root, c, f"{i}.png"))
    if bad:
        with open(os.path.join(root, bad), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def tiny_backbone():
    torch.manual_seed(3)
    m = ModelConfig(arch="custom", embed_dim=32, depth=2, num_heads=2, patch_size=8)
    return build_backbone(m, SIZE).eval()


class CountingBackbone(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def extract(path: str, group=None, workers: int = 0, batch_size: int = 5):
    backbone = CountingBackbone(tiny_backbone())
    tf = eval_transform(MEAN, STD, SIZE, crop_ratio=0.8)
    f = extract_features(backbone, open_input(path), tf, SIZE, batch_size, workers, "cpu", group, progress=False)
    return f, backbone.calls


def knn_cli(run: str, folder: str, out: str, *extra: str) -> None:
    from massl.eval.cli import main

    main(["knn", "--checkpoint", run, "--train", folder, "--val", folder, "--k", "1", "3", "--workers", "0",
          "--batch-size", "5", "--out", out, *extra])


def _two_ranks(rank, world, folder, shards, run, out):
    import torch.distributed as dist

    group = dist.group.WORLD
    knn_cli(run, folder, out)  # massl-eval under a launcher: every rank extracts, rank 0 writes
    return {"folder": extract(folder, group), "shards": extract(shards, group)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from massl.tools.shard import write_shards

    root = str(tmp_path_factory.mktemp("eval_inputs"))
    folder = write_folder(os.path.join(root, "folder"), counts=(4, 5, 3))  # 13 files, one unreadable
    shards = os.path.join(root, "shards")
    write_shards(folder, shards, maxcount=4, shuffle=False, progress=False)  # 12 images in 3 shards
    return folder, shards


def test_two_ranks_equal_one_process(inputs, tiny_run, tmp_path):
    import json

    folder, shards = inputs
    one, calls = extract(folder, workers=2)  # two loader workers interleave their batches
    assert len(ImageFolderInput(folder)) == 13 and len(one.labels) == 12  # one unreadable
    assert one.skipped[0][1].endswith("bad.png") and "UnidentifiedImageError" in one.skipped[0][2]
    assert one.index.tolist() == [i for i in range(13) if i != one.skipped[0][0]]
    ranks = run_ranks(_two_ranks, 2, folder, shards, tiny_run, str(tmp_path / "knn2.json"))
    knn_cli(tiny_run, folder, str(tmp_path / "knn1.json"))
    knn1, knn2 = (json.load(open(tmp_path / f"knn{w}.json")) for w in (1, 2))
    assert knn2["world_size"] == 2 and knn1["world_size"] == 1 and knn2["skipped_val"] == 1
    assert knn2["results"] == knn1["results"] and knn1["n_train"] == 12
    two, calls2 = ranks[0]["folder"]
    assert ranks[1]["folder"][0] is None and ranks[1]["shards"][0] is None  # results live on rank 0
    # 13 samples in batches of 5: rank 0 has two batches, rank 1 one plus a blank forward pass
    assert calls == 3 and calls2 == 2 and ranks[1]["folder"][1] == 2
    assert torch.equal(two.index, one.index) and torch.equal(two.labels, one.labels)
    assert two.feats.shape == one.feats.shape == (12, 32)
    assert torch.allclose(two.feats, one.feats, atol=1e-5)
    assert two.skipped == one.skipped and two.classes == one.classes == ["a", "b", "c"]
    # the shards hold the same 12 images (massl-shard dropped the unreadable one), in the same order
    sh, _ = ranks[0]["shards"]
    assert len(ShardInput(shards)) == 12 and sh.index.tolist() == list(range(12)) and sh.skipped == []
    assert sh.classes == ["a", "b", "c"] and torch.equal(sh.labels, one.labels)
    assert torch.allclose(sh.feats, one.feats, atol=1e-5)
    assert len({tuple(r.tolist()) for r in one.feats}) == 12  # distinct rows: a duplicate could not hide


def test_damaged_shard_samples_are_skipped_and_named(inputs, tmp_path):
    import shutil

    _, shards = inputs
    copy = str(tmp_path / "shards")
    shutil.copytree(shards, copy)
    last = sorted(n for n in os.listdir(copy) if n.endswith(".tar"))[-1]
    with open(os.path.join(copy, last), "r+b") as f:
        f.truncate(1024)  # the last shard (4 samples) keeps only its first member header
    f, _ = extract(copy)
    assert len(f.labels) == 8 and [s[0] for s in f.skipped] == [8, 9, 10, 11]
    assert all(last in name for _, name, _ in f.skipped)


def test_feature_cache_key_and_unreadable_entry(inputs, tmp_path):
    folder, shards = inputs
    settings = {"image_size": SIZE, "crop_ratio": 0.875}
    a = tiny_backbone()
    b = tiny_backbone()
    assert weights_digest(a) == weights_digest(b)
    with torch.no_grad():
        b.blocks[0].attn.qkv.weight[0, 0] += 1e-3
    base = cache_key(weights_digest(a), open_input(folder).identity(), settings)
    assert cache_key(weights_digest(b), open_input(folder).identity(), settings) != base
    assert cache_key(weights_digest(a), open_input(shards).identity(), settings) != base
    assert cache_key(weights_digest(a), open_input(folder).identity(), {**settings, "crop_ratio": 1.0}) != base
    os.utime(os.path.join(folder, "a", "0.png"), ns=(1, 1))
    assert cache_key(weights_digest(a), open_input(folder).identity(), settings) != base
    garbage = tmp_path / "features-x.pt"
    garbage.write_bytes(b"not a torch file")
    assert load_cached(str(garbage)) is None and load_cached(str(tmp_path / "absent.pt")) is None
