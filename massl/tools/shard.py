"""massl-shard: an image folder or a list of images -> WebDataset tar shards with a manifest.

    massl-shard data/digits/train --out data/digits_shards --maxcount 200
    massl-shard verify data/digits_shards
    massl-shard index --out shards/manifest.json 'shards/train-{000000..000099}.tar'

Writes <prefix>-000000.tar, ... and manifest.json (docs/data.md lists every flag and field).
Each shard is written under a .partial name and renamed when complete; a journal records the
completed shards, so an interrupted run, started again with the same arguments, checks their
sha256 and continues after them. Existing output is never replaced without --overwrite.

One file for the three subcommands and their command line, which share the manifest, the
journal and the checks of the output folder (the inputs' walk is shard_inputs.py).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import random
import sys
import tarfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Optional

from massl.data.shards import (MANIFEST_NAME, expand_shard_urls, iter_samples, open_tar, read_shard_manifest,
                               shard_manifest)
from massl.errors import UserError, fail
from massl.fileio import sha256_file, write_json_atomic
from massl.logging import log, setup_logging
from massl.progress import Progress

from .shard_inputs import class_map, exit_with_parent, list_inputs, load_checked, load_chunk


JOURNAL_NAME = ".massl-shard-journal.json"
BLOCK, RECORD = 512, 10240  # tar block and record sizes: a tar file is a whole number of records


def tar_size(members: int) -> int:
    """File size of a tar whose members take `members` bytes (headers + padded data)."""
    return -(-(members + 2 * BLOCK) // RECORD) * RECORD


def member_size(nbytes: int) -> int:
    return BLOCK + -(-nbytes // BLOCK) * BLOCK


def parse_size(text: str) -> int:
    """'1e9', '500M', '2G' -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = str(text).strip().upper().rstrip("B")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(float(t))


class _HashingFile:
    """Write-through wrapper that hashes and counts what tarfile writes."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.size


class ShardWriter:
    """One shard at a time, written as <name>.partial and renamed into place by `finish()`.
    Member headers are fixed (mtime 0, owner 0, mode 0444), so equal inputs give equal bytes."""

    def __init__(self, out: str, name: str):
        self.name, self.path = name, os.path.join(out, name)
        self.raw = open(self.path + ".partial", "wb")
        self.file = _HashingFile(self.raw)
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)  # type: ignore[call-overload]  # a write-only file object
        self.samples, self.members = 0, 0

    def add(self, key: str, files: list[tuple[str, bytes]]) -> None:
        for ext, data in files:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self.tar.addfile(info, io.BytesIO(data))
            self.members += member_size(len(data))
        self.samples += 1

    def finish(self) -> dict:
        self.tar.close()
        self.raw.flush()
        os.fsync(self.raw.fileno())
        self.raw.close()
        os.replace(self.path + ".partial", self.path)
        return {"name": self.name, "samples": self.samples, "bytes": self.file.size, "sha256": self.file.sha.hexdigest()}


def sample_files(key: str, item, result: dict, classes: dict) -> list[tuple[str, bytes]]:
    meta = {"path": item.path, "width": result["width"], "height": result["height"], "bytes": result["bytes"]}
    files = [(result["ext"], result["data"])]
    if item.label is not None:
        meta["class"] = item.label
        files.append(("cls", str(classes[item.label]).encode()))
    files.append(("json", json.dumps(meta, sort_keys=True).encode()))
    return files


def checked_images(items, max_side: int, quality: int, workers: int, chunk: int = 16):
    """load_checked over `items`, in order, on `workers` processes with a bounded window."""
    if workers <= 1:
        yield from (load_checked(i.path, max_side, quality) for i in items)
        return
    chunks = (items[i:i + chunk] for i in range(0, len(items), chunk))
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=exit_with_parent,
                             initargs=(os.getpid(),)) as pool:
        window: deque = deque()
        for c in chunks:
            window.append(pool.submit(load_chunk, [i.path for i in c], max_side, quality))
            if len(window) >= 4 * workers:
                yield from window.popleft().result()
        while window:
            yield from window.popleft().result()


def own_files(out: str, prefix: str) -> list[str]:
    pattern = os.path.join(glob.escape(out), glob.escape(prefix))
    return sorted(glob.glob(pattern + "-*.tar") + glob.glob(pattern + "-*.tar.partial"))


def previous_set(out: str) -> list[str]:
    """The shard files of the set whose manifest.json (or interrupted run's journal) is in `out`."""
    names = []
    for name in (MANIFEST_NAME, JOURNAL_NAME):
        try:
            with open(os.path.join(out, name)) as f:
                names += [s["name"] for s in json.load(f)["shards"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return [os.path.join(out, os.path.basename(n)) for n in names]


def start_or_resume(out: str, prefix: str, fingerprint: str, overwrite: bool) -> dict:
    """The journal to continue from: fresh, or the verified completed shards of an interrupted run."""
    journal_path, manifest_path = os.path.join(out, JOURNAL_NAME), os.path.join(out, MANIFEST_NAME)
    fresh = {"fingerprint": fingerprint, "shards": [], "next_input": 0, "skipped": []}
    if overwrite:  # the previous set whatever its prefix: its tars would be orphans beside the new manifest
        for p in own_files(out, prefix) + previous_set(out) + [journal_path, manifest_path]:
            if os.path.exists(p):
                os.remove(p)
        return fresh
    if os.path.exists(manifest_path):
        raise UserError(f"--out {out}: already holds a finished set of shards ({MANIFEST_NAME}); a folder holds "
                        f"one set: write this one to another --out, or pass --overwrite to replace that set")
    if not os.path.exists(journal_path):
        if own_files(out, prefix):
            raise UserError(f"--out {out}: already holds {prefix}-*.tar files; pass --overwrite to replace them")
        return fresh
    with open(journal_path) as f:
        journal = json.load(f)
    if journal.get("fingerprint") != fingerprint:
        raise UserError(f"--out {out}: holds an interrupted run with other inputs or options; rerun it with the same "
                         f"arguments to resume, or pass --overwrite to start again")
    kept = []
    for s in journal["shards"]:  # keep the prefix of completed shards whose bytes still match
        path = os.path.join(out, s["name"])
        if not os.path.exists(path) or sha256_file(path) != (s["sha256"], s["bytes"]):
            log.warning(f"massl-shard: {s['name']} is missing or does not match its checksum; rewriting from there")
            break
        kept.append(s)
    names = {s["name"] for s in kept}
    for p in own_files(out, prefix):
        if os.path.basename(p) not in names:
            os.remove(p)
    if len(kept) < len(journal["shards"]):
        end = journal["shards"][len(kept)]["first_input"]
        return {"fingerprint": fingerprint, "shards": kept, "next_input": end,
                "skipped": [s for s in journal["skipped"] if s["input"] < end]}
    log.info(f"massl-shard: resuming after {len(kept)} verified shard(s)")
    return journal


def write_shards(source: str, out: str, prefix: str = "shard", maxcount: int = 10000, maxsize: int = 1 << 30,
                 seed: int = 0, shuffle: bool = True, workers: int = 1, max_side: int = 0, quality: int = 90,
                 overwrite: bool = False, progress: bool = True) -> dict:
    """Write the shards and manifest.json of `source` into `out`; returns the manifest."""
    if maxcount < 1 or maxsize < RECORD:
        raise UserError(f"--maxcount {maxcount}, --maxsize {maxsize}: need --maxcount >= 1 and --maxsize >= {RECORD} bytes")
    if max_side < 0:
        raise UserError(f"--max-side {max_side}: must be >= 0 (0: never re-encode)")
    if not 1 <= quality <= 100:
        raise UserError(f"--quality {quality}: a JPEG quality is in 1..100 (default 90)")
    items = list_inputs(source)
    classes = class_map(items)
    if shuffle:
        random.Random(seed).shuffle(items)
    options = {"prefix": prefix, "maxcount": maxcount, "maxsize": maxsize, "seed": seed, "shuffle": shuffle,
               "max_side": max_side, "quality": quality}
    fingerprint = hashlib.sha256(json.dumps([[i.path, i.label] for i in items] + [options]).encode()).hexdigest()
    os.makedirs(out, exist_ok=True)
    journal = start_or_resume(out, prefix, fingerprint, overwrite)
    journal_path = os.path.join(out, JOURNAL_NAME)
    write_json_atomic(journal_path, journal)  # before the first shard: a run killed at once resumes too
    bar = Progress(len(items), journal["next_input"], enabled=progress)
    writer: Optional[ShardWriter] = None
    first_input: int = journal["next_input"]
    skipped_here: list[dict] = []

    def close_shard(next_input: int) -> None:
        nonlocal writer, skipped_here
        assert writer is not None  # called with a shard open
        record = writer.finish()
        record["first_input"] = first_input
        journal["shards"].append(record)
        journal["skipped"] += skipped_here
        journal["next_input"], writer, skipped_here = next_input, None, []
        write_json_atomic(journal_path, journal)

    start = journal["next_input"]
    for pos, result in enumerate(checked_images(items[start:], max_side, quality, workers), start):
        item = items[pos]
        if "error" in result:
            skipped_here.append({"input": pos, "path": item.path, "error": result["error"]})
        else:
            files = sample_files(f"{pos:09d}", item, result, classes)
            size = sum(member_size(len(d)) for _, d in files)
            if writer is not None and tar_size(writer.members + size) > maxsize:
                close_shard(pos)
            if writer is None:
                writer, first_input = ShardWriter(out, f"{prefix}-{len(journal['shards']):06d}.tar"), pos
            writer.add(f"{pos:09d}", files)
            if writer.samples >= maxcount:
                close_shard(pos + 1)
        bar.update(1, f"| shards {len(journal['shards'])} | skipped {len(journal['skipped']) + len(skipped_here)}")
    if writer is not None:
        close_shard(len(items))
    bar.extra = f"| shards {len(journal['shards'])} | skipped {len(journal['skipped']) + len(skipped_here)}"
    bar.close()
    journal["skipped"] += skipped_here
    manifest = shard_manifest(journal["shards"], os.path.abspath(source), options, classes,
                              [{"path": s["path"], "error": s["error"]} for s in journal["skipped"]])
    write_json_atomic(os.path.join(out, MANIFEST_NAME), manifest)
    os.remove(journal_path)
    for s in manifest["skipped"]:  # printed even without the progress bar (--quiet)
        log.warning(f"massl-shard: skipped {s['path']}: {s['error']}")
    log.info(f"massl-shard: {manifest['total_samples']} images in {manifest['num_shards']} shard(s) under {out}, "
             f"{len(manifest['skipped'])} skipped")
    return manifest


def scan_shard(path: str, labels: Optional[set] = None) -> dict:
    """Recount a shard: samples, bytes, sha256, and the read error if it is damaged; `labels`
    collects the integer classes of the samples' `cls` members.

    tarfile reads a tar cut at (or inside) a member header as a shorter complete one, so the
    end-of-archive marker (two zero blocks) that every tar writer puts after the last member
    is checked too."""
    digest, size = sha256_file(path)
    record: dict = {"name": os.path.basename(path), "samples": 0, "bytes": size, "sha256": digest}
    try:
        with open(path, "rb") as f:
            tar = open_tar(f)
            for _, files in iter_samples(tar):
                record["samples"] += 1
                if labels is not None and "cls" in files:
                    labels.add(int(files["cls"].decode()))
            f.seek(tar.offset)
            if f.read(2 * BLOCK) != bytes(2 * BLOCK):
                raise tarfile.ReadError(f"truncated: no end-of-archive marker after the member ending at byte {tar.offset}")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:  # ValueError: a cls that is not an integer
        record["error"] = f"{type(e).__name__}: {e}"
    return record


def verify(folder: str) -> list[str]:
    """Problems found re-checking every shard of folder/manifest.json against it (empty: all good)."""
    manifest = read_shard_manifest(os.path.join(folder, MANIFEST_NAME))
    problems = []
    for s in manifest["shards"]:
        path = os.path.join(folder, s["name"])
        if not os.path.exists(path):
            problems.append(f"{s['name']}: missing")
            continue
        got = scan_shard(path)
        for field in ("bytes", "sha256", "samples"):
            if got[field] != s[field]:
                problems.append(f"{s['name']}: {field} {got[field]} != manifest {s[field]}")
        if "error" in got:
            problems.append(f"{s['name']}: unreadable: {got['error']}")
    if sum(s["samples"] for s in manifest["shards"]) != manifest.get("total_samples"):
        problems.append("total_samples does not equal the sum of the shard counts")
    return problems


def index(urls: list[str], out: str) -> dict:
    """A manifest for existing local shards (e.g. written by another tool), counted by reading them."""
    paths = [p for u in urls for p in expand_shard_urls(u)]
    folders = {os.path.dirname(os.path.abspath(p)) for p in paths}
    if len(folders) != 1 or os.path.dirname(os.path.abspath(out)) not in folders:
        raise UserError(f"index --out {out}: the shards must share one folder, and --out must be a file in it")
    shards: list[dict] = []
    labels: set[int] = set()
    for p in paths:
        s = scan_shard(p, labels)
        if "error" in s:
            raise UserError(f"index: {p}: is damaged ({s['error']}); rewrite or leave out this shard")
        shards.append(s)
    # massl-eval names classes by the manifest; shards from another tool carry bare integers
    manifest = shard_manifest(shards, "index", {}, {str(c): c for c in sorted(labels)}, [])
    write_json_atomic(out, manifest)
    return manifest


INTERRUPTED_EXIT = 130  # the shell's status for a command ended by SIGINT


def main(argv=None) -> int:
    """Exit status: 0 done (verify: all good), 1 verify found problems, 2 a user error (one line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    setup_logging()  # --quiet hides the progress bar only: warnings and the summary still print
    try:
        return run(argv)
    except UserError as e:
        fail(e)
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback
        print("error: interrupted (Ctrl-C); run the same command again to continue (finished shards are kept)",
              file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT


def run(argv: list[str]) -> int:
    if argv[:1] == ["verify"]:
        p = argparse.ArgumentParser(prog="massl-shard verify", description="Re-check shards against manifest.json")
        p.add_argument("folder")
        a = p.parse_args(argv[1:])
        problems = verify(a.folder)
        for line in problems:
            print(line)
        print(f"massl-shard verify {a.folder}: " + (f"{len(problems)} problem(s)" if problems else "ok"))
        return 1 if problems else 0
    if argv[:1] == ["index"]:
        p = argparse.ArgumentParser(prog="massl-shard index", description="Write a manifest for existing shards")
        p.add_argument("urls", nargs="+", help="local shard paths or brace patterns")
        p.add_argument("--out", required=True, help="manifest path, in the shards' folder")
        a = p.parse_args(argv[1:])
        m = index(a.urls, a.out)
        print(f"massl-shard index: {m['total_samples']} samples in {m['num_shards']} shard(s) -> {a.out}")
        return 0
    p = argparse.ArgumentParser(prog="massl-shard", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="image folder (class sub-folders = labels) or a .txt/.csv list of paths[,label]")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--prefix", default="shard",
                   help="shard names: PREFIX-000000.tar (default: shard); one set of shards per --out folder")
    p.add_argument("--maxcount", type=int, default=10000, help="images per shard at most (default: 10000)")
    p.add_argument("--maxsize", type=parse_size, default=1 << 30, help="bytes per shard at most, e.g. 500M, 1G (default: 1G)")
    p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (default: 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the input order")
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)),
                   help="processes reading and checking images (default: CPUs - 1, at most 8)")
    p.add_argument("--max-side", type=int, default=0, help="re-encode images whose longer side exceeds this as JPEG (0: never)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default: 90)")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards and manifest in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar (warnings and the summary still print)")
    a = p.parse_args(argv)
    write_shards(a.source, a.out, a.prefix, a.maxcount, a.maxsize, a.seed, not a.no_shuffle, a.workers,
                 a.max_side, a.quality, a.overwrite, progress=not a.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
