"""massl-shard: manifest vs shard contents, skipped files, determinism, overwrite refusal, resume, verify, index."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from massl.tools import shard as shard_tool
from massl.tools.shard import main, verify, write_shards
from massl.errors import UserError


def make_folder(root: str, n_per_class: int = 9, size=(40, 30)) -> dict:
    """Two classes of distinct JPEG/PNG images, plus a truncated JPEG and a non-image '.jpg'."""
    rng = np.random.RandomState(0)
    files = {}
    for c in ("cat", "dog"):
        os.makedirs(os.path.join(root, c))
        for i in range(n_per_class):
            arr = rng.randint(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            ext = "png" if i % 3 == 0 else "jpg"
            path = os.path.join(root, c, f"{i:02d}.{ext}")
            Image.fromarray(arr).save(path)
            files[path] = c
    good = open(next(p for p in files if p.endswith(".jpg")), "rb").read()
    with open(os.path.join(root, "cat", "truncated.jpg"), "wb") as f:
        f.write(good[: len(good) // 2])
    with open(os.path.join(root, "dog", "not_an_image.jpg"), "wb") as f:
        f.write(b"this is not a JPEG")
    return files


def read_tar_independently(path: str) -> dict:
    """key -> {ext: bytes}, with plain tarfile (not the code under test)."""
    out = {}
    with tarfile.open(path) as t:
        for m in t.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = t.extractfile(m).read()
    return out


@pytest.fixture
def folder(tmp_path):
    root = str(tmp_path / "images")
    return root, make_folder(root)


def test_shards_hold_every_readable_image_as_the_manifest_says(folder, tmp_path):
    root, files = folder
    out = str(tmp_path / "shards")
    m = write_shards(root, out, prefix="train", maxcount=5, progress=False)
    assert [s["name"] for s in m["shards"]] == [f"train-{i:06d}.tar" for i in range(4)]
    assert m["classes"] == {"cat": 0, "dog": 1}
    assert sorted(os.path.basename(s["path"]) for s in m["skipped"]) == ["not_an_image.jpg", "truncated.jpg"]
    seen = {}
    for s in m["shards"]:
        path = os.path.join(out, s["name"])
        assert os.path.getsize(path) == s["bytes"]
        assert hashlib.sha256(open(path, "rb").read()).hexdigest() == s["sha256"]
        samples = read_tar_independently(path)
        assert len(samples) == s["samples"] <= 5
        for key, parts in samples.items():
            meta = json.loads(parts["json"])
            image = parts.get("jpg", parts.get("png"))
            assert image == open(meta["path"], "rb").read()  # original bytes
            assert int(parts["cls"]) == m["classes"][files[meta["path"]]]
            assert (meta["width"], meta["height"]) == (40, 30)
            seen[meta["path"]] = key
    assert sorted(seen) == sorted(files)  # every readable image exactly once
    assert m["total_samples"] == len(files) == sum(s["samples"] for s in m["shards"])
    assert verify(out) == []
    with open(os.path.join(out, "train-000001.tar"), "r+b") as f:  # flip one byte of image data
        f.seek(700)
        b = f.read(1)
        f.seek(700)
        f.write(bytes([b[0] ^ 0xFF]))
    problems = verify(out)
    assert problems and all("train-000001.tar" in p for p in problems) and any("sha256" in p for p in problems)
    assert main(["verify", out]) == 1


def test_maxsize_and_determinism(folder, tmp_path):
    root, files = folder
    a, b, c = (str(tmp_path / x) for x in "abc")
    ma = write_shards(root, a, maxsize=12 * 1024, progress=False)
    assert all(os.path.getsize(os.path.join(a, s["name"])) <= 12 * 1024 for s in ma["shards"])
    assert len(ma["shards"]) > 1
    mb = write_shards(root, b, maxsize=12 * 1024, workers=2, progress=False)  # a process pool gives the same bytes
    assert [s["sha256"] for s in mb["shards"]] == [s["sha256"] for s in ma["shards"]]
    mc = write_shards(root, c, maxsize=12 * 1024, seed=1, progress=False)
    order = lambda d, m: [json.loads(p["json"])["path"] for s in m["shards"]  # noqa: E731
                          for p in read_tar_independently(os.path.join(d, s["name"])).values()]
    assert sorted(order(a, ma)) == sorted(order(c, mc)) and order(a, ma) != order(c, mc)


def test_refuses_to_overwrite(folder, tmp_path):
    root, _ = folder
    out = str(tmp_path / "shards")
    write_shards(root, out, maxcount=8, progress=False)
    with pytest.raises(UserError, match="--overwrite"):
        write_shards(root, out, maxcount=8, progress=False)
    with pytest.raises(SystemExit) as exited:
        main([root, "--out", out, "--quiet"])
    assert exited.value.code == 2
    os.remove(os.path.join(out, "manifest.json"))  # stray shards without a journal are protected too
    with pytest.raises(UserError, match="--overwrite"):
        write_shards(root, out, maxcount=8, progress=False)
    m = write_shards(root, out, maxcount=4, overwrite=True, progress=False)
    assert sorted(f for f in os.listdir(out) if f.endswith(".tar")) == [s["name"] for s in m["shards"]]


def test_interrupted_run_resumes_without_redoing_verified_shards(folder, tmp_path, monkeypatch):
    root, _ = folder
    ref = write_shards(root, str(tmp_path / "ref"), maxcount=3, progress=False)
    out = str(tmp_path / "out")
    finish, calls = shard_tool.ShardWriter.finish, []

    def interrupted_finish(self):
        calls.append(self.name)
        if len(calls) == 4:
            self.tar.fileobj.write(b"half a shard")
            raise KeyboardInterrupt  # the 4th shard never completes
        return finish(self)

    monkeypatch.setattr(shard_tool.ShardWriter, "finish", interrupted_finish)
    with pytest.raises(KeyboardInterrupt):
        write_shards(root, out, maxcount=3, progress=False)
    monkeypatch.setattr(shard_tool.ShardWriter, "finish", finish)
    names = sorted(os.listdir(out))
    assert "manifest.json" not in names and "shard-000003.tar" not in names and "shard-000003.tar.partial" in names
    with pytest.raises(ValueError, match="same arguments"):  # other options cannot continue this run
        write_shards(root, out, maxcount=4, progress=False)

    stats = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in ("shard-000000.tar", "shard-000001.tar")}
    with open(os.path.join(out, "shard-000002.tar"), "ab") as f:  # damage the last completed shard
        f.write(b"x")
    m = write_shards(root, out, maxcount=3, progress=False)
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in ref["shards"]]
    assert m["skipped"] == ref["skipped"] and m["total_samples"] == ref["total_samples"]
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in stats} == stats  # not rewritten
    assert not [n for n in os.listdir(out) if n.endswith(".partial") or n.startswith(".massl")]
    assert verify(out) == []


def test_list_inputs_and_reencoding(tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.random.RandomState(1).randint(0, 256, (300, 200, 3), dtype=np.uint8)).save(big)
    small = tmp_path / "sub" / "small.jpg"
    small.parent.mkdir()
    Image.new("RGB", (20, 10), (200, 10, 10)).save(small)
    (tmp_path / "list.csv").write_text("path,label\nbig.png,zebra\nsub/small.jpg,ant\n")
    m = write_shards(str(tmp_path / "list.csv"), str(tmp_path / "s1"), max_side=100, progress=False)
    assert m["classes"] == {"ant": 0, "zebra": 1}
    samples = {json.loads(p["json"])["path"]: p for p in read_tar_independently(str(tmp_path / "s1" / "shard-000000.tar")).values()}
    b = samples[str(big)]
    assert json.loads(b["json"])["width"] == 200 and int(b["cls"]) == 1
    assert Image.open(io.BytesIO(b["jpg"])).size == (67, 100)  # re-encoded: longer side 100
    assert samples[str(small)]["jpg"] == small.read_bytes()  # small enough: original bytes
    (tmp_path / "list.txt").write_text(f"# comment\n{big}\t7\nsub/small.jpg\n")
    m = write_shards(str(tmp_path / "list.txt"), str(tmp_path / "s2"), shuffle=False, progress=False)
    parts = list(read_tar_independently(str(tmp_path / "s2" / "shard-000000.tar")).values())
    assert m["classes"] == {"7": 7} and int(parts[0]["cls"]) == 7 and "cls" not in parts[1]


def test_index_recounts_existing_shards(folder, tmp_path):
    root, _ = folder
    out = str(tmp_path / "shards")
    m = write_shards(root, out, maxcount=5, progress=False)
    idx = os.path.join(out, "index.json")
    assert main(["index", "--out", idx, os.path.join(out, "shard-{000000..000003}.tar")]) == 0
    got = json.load(open(idx))
    assert got["shards"] == m["shards"] and got["total_samples"] == m["total_samples"]


def test_killed_before_the_first_shard_resumes(folder, tmp_path, monkeypatch):
    """A run killed while writing its first shard is continued by a rerun (it was refused: a
    .partial shard without a journal looked like someone else's files)."""
    root, _ = folder
    ref = write_shards(root, str(tmp_path / "ref"), maxcount=3, progress=False)
    out = str(tmp_path / "out")
    finish = shard_tool.ShardWriter.finish

    def killed(self):
        self.tar.fileobj.write(b"half a shard")
        raise KeyboardInterrupt

    monkeypatch.setattr(shard_tool.ShardWriter, "finish", killed)
    with pytest.raises(KeyboardInterrupt):
        write_shards(root, out, maxcount=3, progress=False)
    monkeypatch.setattr(shard_tool.ShardWriter, "finish", finish)
    assert "shard-000000.tar.partial" in os.listdir(out)
    m = write_shards(root, out, maxcount=3, progress=False)
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in ref["shards"]]
    assert verify(out) == []


def member_ends(path: str) -> list[int]:
    """Byte offset after each member's padded data, read with plain tarfile."""
    with tarfile.open(path) as t:
        return [m.offset_data + -(-m.size // 512) * 512 for m in t.getmembers()]


@pytest.mark.parametrize("cut", ["after_a_member", "inside_a_header", "before_the_end_marker"])
def test_index_refuses_a_truncated_shard(folder, tmp_path, cut):
    root, _ = folder
    out = str(tmp_path / "shards")
    write_shards(root, out, maxcount=5, progress=False)
    path = os.path.join(out, "shard-000001.tar")
    ends = member_ends(path)
    size = {"after_a_member": ends[-4], "inside_a_header": ends[-4] + 100, "before_the_end_marker": ends[-1]}[cut]
    with open(path, "r+b") as f:
        f.truncate(size)
    with pytest.raises(ValueError, match="shard-000001.tar: is damaged .*truncated"):
        shard_tool.index([os.path.join(out, "shard-{000000..000003}.tar")], os.path.join(out, "index.json"))
    assert not os.path.exists(os.path.join(out, "index.json"))


def descendants(pid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is `pid`, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> str:
    """The process's command line; empty once it has gone (it may, between the listing and here)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def test_kill_9_leaves_no_worker_behind(tmp_path):
    """massl-shard --workers 2 killed with SIGKILL: its pool workers end too (they waited on their
    task queue forever)."""
    import signal
    import subprocess
    import sys
    import time

    big = tmp_path / "big.png"
    Image.fromarray(np.random.RandomState(2).randint(0, 256, (600, 600, 3), dtype=np.uint8)).save(big)
    (tmp_path / "list.txt").write_text(f"{big}\n" * 4000)  # minutes of work: still running when killed
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "massl.tools.shard", str(tmp_path / "list.txt"), "--out",
                             str(tmp_path / "out"), "--workers", "2", "--quiet"], env={**os.environ, "PYTHONPATH": root},
                            start_new_session=True)
    workers = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            workers = [p for p in descendants(proc.pid) if "spawn_main" in cmdline(p)]
        assert len(workers) == 2 and proc.poll() is None
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 15
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in workers if alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in workers:
            if alive(p):
                os.kill(p, signal.SIGKILL)
