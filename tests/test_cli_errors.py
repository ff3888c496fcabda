"""Every user error is one line `error: <what>: <why, what to do>` and exit status 2, on
massl-train, massl-export and massl-shard. Before, each case below printed a
traceback (exit 1), or in massl-shard's case another format."""
from __future__ import annotations

import json
import os

import pytest
import torch

from massl.tools.shard import main as shard_main
from massl.cli import export_main, train_main
from tests.conftest import tiny_overrides


def one_line_error(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def train_args(digits_dir, tmp_path):
    return tiny_overrides(os.path.join(digits_dir, "train"), str(tmp_path / "run"))


def test_yaml_syntax_error(tmp_path, train_args, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 0.1\n  epochs: [1, 2\n")
    err = one_line_error(capsys, train_main, ["--config", str(bad)] + train_args)
    assert f"--config {bad}: not valid YAML (line " in err


def test_non_numeric_list_entries(train_args, capsys):
    err = one_line_error(capsys, train_main, train_args + ["data.aug.mean=[a,b,c]"])
    assert err.startswith("error: data.aug.mean: must be 3 numbers")


def test_empty_folder(tmp_path, train_args, capsys):
    os.makedirs(tmp_path / "empty")
    err = one_line_error(capsys, train_main, train_args + [f"data.path={tmp_path / 'empty'}"])
    assert "holds no images" in err


def test_fewer_images_than_one_batch(tmp_path, digits_dir, train_args, capsys):
    few = tmp_path / "few"
    os.makedirs(few)
    for name in sorted(os.listdir(os.path.join(digits_dir, "train", "0")))[:5]:  # batch: 8
        os.symlink(os.path.join(digits_dir, "train", "0", name), few / name)
    err = one_line_error(capsys, train_main, train_args + [f"data.path={few}"])
    assert err.startswith("error: data.path:") and "fewer than one global batch" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine(train_args, capsys):
    err = one_line_error(capsys, train_main, train_args + ["run.device=cuda"])
    assert err.startswith("error: run.device: cuda was requested")


def test_fp16_on_a_cpu(train_args, capsys):
    err = one_line_error(capsys, train_main, train_args + ["run.precision=fp16"])
    assert err.startswith("error: run.precision: fp16 needs a CUDA device")


def test_webdataset_folder_without_a_manifest(tmp_path, train_args, capsys):
    os.makedirs(tmp_path / "shards")
    err = one_line_error(capsys, train_main, train_args + ["data.path=", "data.source=webdataset", f"data.urls={tmp_path / 'shards'}"])
    assert err.startswith(f"error: data.urls: {tmp_path / 'shards' / 'manifest.json'}: does not exist")


def test_webdataset_manifest_that_is_not_json(tmp_path, train_args, capsys):
    os.makedirs(tmp_path / "shards")
    (tmp_path / "shards" / "x-000000.tar").write_bytes(b"")
    (tmp_path / "shards" / "manifest.json").write_text("{not json")
    err = one_line_error(capsys, train_main, train_args + [
        "data.path=", "data.source=webdataset", f"data.urls={tmp_path / 'shards' / 'x-000000.tar'}"])
    assert err.startswith("error: data.manifest: ") and "is not readable JSON" in err


def test_webdataset_urls_that_do_not_exist(tmp_path, train_args, capsys):
    err = one_line_error(capsys, train_main, train_args + [
        "data.path=", "data.source=webdataset", f"data.urls={tmp_path}/nothing/x-{{000..003}}.tar"])
    # the key the user set, not the manifest path derived from it
    assert err.startswith(f"error: data.urls: '{tmp_path}/nothing/x-{{000..003}}.tar': no such shard or folder")


def test_resume_from_a_run_directory(tmp_path, train_args, capsys):
    run = tmp_path / "older"
    os.makedirs(run / "checkpoints" / "step_000000002")
    err = one_line_error(capsys, train_main, train_args + [f"run.resume={run}"])
    assert err.startswith(f"error: run.resume: '{run}' is a run directory")


def test_shard_verify_without_a_manifest(tmp_path, capsys):
    err = one_line_error(capsys, shard_main, ["verify", str(tmp_path)])
    assert err.startswith(f"error: {tmp_path / 'manifest.json'}: does not exist")


def test_shard_of_a_missing_source(tmp_path, capsys):
    err = one_line_error(capsys, shard_main, [str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    assert err.startswith("error: SOURCE ")


def test_export_of_a_missing_checkpoint(tmp_path, capsys):
    err = one_line_error(capsys, export_main, ["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "t.pth")])
    assert "neither a checkpoint directory nor a run directory" in err


def test_export_manifest_with_a_bad_config(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints" / "step_000000001"
    os.makedirs(ckpt)
    (ckpt / "manifest.json").write_text(json.dumps({"step": 1, "files": {}, "config": {"model": {"arch": "vit_huge"}}}))
    err = one_line_error(capsys, export_main, ["--checkpoint", str(ckpt), "--out", str(tmp_path / "t.pth")])
    assert "model.arch" in err


def test_export_into_an_existing_directory_leaves_nothing(digits_dir, tmp_path, capsys):
    from massl.config import load_config
    from massl.train import train

    run = str(tmp_path / "run")
    train(load_config(None, tiny_overrides(os.path.join(digits_dir, "train"), run) + ["run.max_steps=1"]))
    target = tmp_path / "teacher.pth"
    os.makedirs(target)
    err = one_line_error(capsys, export_main, ["--checkpoint", run, "--out", str(target)])
    assert err.startswith(f"error: --out '{target}': is a directory")
    assert sorted(os.listdir(tmp_path)) == ["run", "teacher.pth"] and os.listdir(target) == []


def test_changed_model_shape_on_resume(digits_dir, tmp_path, train_args, capsys):
    from massl.config import load_config
    from massl.train import train

    train(load_config(None, train_args + ["run.max_steps=1"]))
    err = one_line_error(capsys, train_main, train_args + ["run.max_steps=2", "model.depth=3"])
    assert err.startswith("error: run.resume: checkpoint ") and "model.depth 2 -> 3" in err
