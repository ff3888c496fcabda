"""massl-export and massl-eval never unpickle a checkpoint: they read the
manifest (JSON) and teacher/teacher.safetensors only. A hostile checkpoint directory whose DCP
`.metadata` (a pickle) creates a file when unpickled must not create it; the same directory read
with --trust-checkpoint does (the control: the payload is live, so the test can fail)."""
from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from massl.checkpoint import MANIFEST
from massl.cli import eval_main, export_main
from massl.fileio import write_json_atomic
from tests.conftest import tiny_overrides


class Payload:
    """Unpickling this calls open(path, "w"): the file's existence shows that code ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def checkpoint(digits_dir, tmp_path_factory):
    from massl.config import load_config
    from massl.train import train

    out = str(tmp_path_factory.mktemp("run"))
    train(load_config(None, tiny_overrides(os.path.join(digits_dir, "train"), out) + ["run.max_steps=2"]))
    return os.path.join(out, "checkpoints", "step_000000002")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.RandomState(0)
    for c in ("a", "b"):
        os.makedirs(root / c)
        for i in range(4):
            Image.fromarray(rng.randint(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return str(root)


def plant(directory: str, relative: str, payload: Payload) -> None:
    """Write the payload pickle as `relative` and re-seal the manifest (sizes), as an attacker would."""
    with open(os.path.join(directory, relative), "wb") as f:
        pickle.dump(payload, f)
    manifest = json.load(open(os.path.join(directory, MANIFEST)))
    manifest["files"] = {rel: os.path.getsize(os.path.join(directory, rel)) for rel in manifest["files"]
                         if os.path.exists(os.path.join(directory, rel))}
    manifest["files"][relative] = os.path.getsize(os.path.join(directory, relative))
    manifest.pop("sha256", None)
    write_json_atomic(os.path.join(directory, MANIFEST), manifest)


def commands(ckpt: str, labelled: str, tmp_path) -> dict:
    return {"massl-export": (export_main, ["--checkpoint", ckpt, "--out", str(tmp_path / "t.safetensors")]),
            "massl-eval": (eval_main, ["knn", "--checkpoint", ckpt, "--train", labelled, "--val", labelled,
                                       "--workers", "0", "--k", "2", "--out", str(tmp_path / "knn.json")])}


@pytest.mark.parametrize("tool", ["massl-export", "massl-eval"])
def test_a_hostile_dcp_metadata_is_never_unpickled(checkpoint, labelled, tmp_path, capsys, tool):
    hostile = shutil.copytree(checkpoint, str(tmp_path / "step_000000002"))
    marker = str(tmp_path / "code_ran")
    shutil.rmtree(os.path.join(hostile, "teacher"), ignore_errors=True)  # an older massl wrote none
    os.remove(os.path.join(hostile, "engine", "state.pt"))
    manifest = json.load(open(os.path.join(hostile, MANIFEST)))
    write_json_atomic(os.path.join(hostile, MANIFEST), {**manifest, "format": "dcp", "engine": "fsdp"})
    plant(hostile, os.path.join("engine", ".metadata"), Payload(marker))

    main, argv = commands(hostile, labelled, tmp_path)[tool]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and "--trust-checkpoint" in err, err
    assert not os.path.exists(marker)

    with pytest.raises(BaseException):  # told to trust it, the tool unpickles: the payload is live
        main(argv + ["--trust-checkpoint"])
    assert os.path.exists(marker)


@pytest.mark.parametrize("tool", ["massl-export", "massl-eval"])
def test_the_tools_read_only_the_safetensors_teacher(checkpoint, labelled, tmp_path, tool):
    """A current checkpoint whose engine pickle is hostile: the tools work from teacher.safetensors."""
    ckpt = shutil.copytree(checkpoint, str(tmp_path / "step_000000002"))
    marker = str(tmp_path / "code_ran")
    plant(ckpt, os.path.join("engine", "state.pt"), Payload(marker))
    main, argv = commands(ckpt, labelled, tmp_path)[tool]
    main(argv)
    assert not os.path.exists(marker)
    assert os.path.exists(str(tmp_path / ("t.safetensors" if tool == "massl-export" else "knn.json")))
