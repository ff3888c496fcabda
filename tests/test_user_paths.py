"""What a user following README.md and docs/ runs into: each test is one path that failed as
documented (switching a config to shards by an override, the progress total under
run.max_steps, labels of shards indexed from another tool, an early class mismatch in
massl-eval, the file mode of teacher.safetensors, missing optional packages)."""
from __future__ import annotations

import io
import json
import os
import stat
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from massl.config import load_config
from massl.errors import UserError
from tests.conftest import tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_an_override_switches_a_folder_config_to_shards(tmp_path):
    """docs/data.md: `massl-train --config configs/quickstart.yaml data.source=webdataset data.urls=...`."""
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "shard-000000.tar").write_bytes(b"")
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"),
                      ["data.source=webdataset", f"data.urls={shards}/shard-000000.tar", "data.samples_per_epoch=64"])
    assert cfg.data.source == "webdataset" and cfg.data.path == ""
    # the same key set on the command line still has no effect, and is still refused
    with pytest.raises(UserError, match="data.path: is set"):
        load_config(os.path.join(ROOT, "configs", "quickstart.yaml"),
                    ["data.source=webdataset", f"data.urls={shards}/shard-000000.tar", "data.path=/x"])


def test_progress_and_eta_count_to_run_max_steps(digits_dir, tmp_path, capsys):
    from massl.train import train

    out = str(tmp_path / "run")
    train(load_config(None, tiny_overrides(os.path.join(digits_dir, "train"), out) + ["run.max_steps=3"]))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert records[-1]["step"] == 3 and records[-1]["eta_s"] == 0
    assert isinstance(records[-1]["skipped_images"], int)  # a count, not 0.0
    assert records[0]["eta_s"] == pytest.approx(2 * records[0]["sec_per_step"])


def test_index_of_shards_from_another_tool_keeps_their_labels(tmp_path):
    """Shards written with plain tarfile (not massl-shard), each sample with a .cls member."""
    from massl.tools.shard import main
    from massl.eval.inputs import open_input

    folder = tmp_path / "shards"
    folder.mkdir()
    labels = {}
    for s in range(2):
        with tarfile.open(folder / f"other-{s}.tar", "w") as tar:
            for i in range(3):
                key, cls = f"s{s}_{i}", (3, 5, 3)[i] + s
                buf = io.BytesIO()
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("cls", str(cls).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                labels[key] = cls
    out = str(folder / "manifest.json")
    assert main(["index", "--out", out, str(folder / "other-0.tar"), str(folder / "other-1.tar")]) == 0
    assert json.load(open(out))["classes"] == {"3": 3, "4": 4, "5": 5, "6": 6}
    data = open_input(str(folder))  # massl-eval's input: refused "no labels" before
    got = [data.classes[s.label] for s in data.read(0, len(data))]
    assert got == [str(labels[k]) for k in sorted(labels)]


def test_eval_refuses_a_val_class_before_extracting(tiny_run, tmp_path, capsys, monkeypatch):
    from massl.eval import run as eval_run
    from massl.eval.cli import main

    for split, classes in (("train", "ab"), ("val", "abz")):
        for c in classes:
            os.makedirs(tmp_path / split / c)
            Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / split / c / "0.png")

    def extracted(*a, **k):
        raise AssertionError("features were extracted before the classes were compared")

    monkeypatch.setattr(eval_run, "extract_features", extracted)
    with pytest.raises(SystemExit) as e:
        main(["knn", "--checkpoint", tiny_run, "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "'z'" in err and len(err.strip().splitlines()) == 1, err


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_teacher_safetensors_is_as_readable_as_the_files_beside_it(tiny_run, tmp_path):
    from massl.export import export_teacher

    ckpt = os.path.join(tiny_run, "checkpoints", open(os.path.join(tiny_run, "checkpoints", "latest")).read().strip())
    assert _mode(os.path.join(ckpt, "teacher", "teacher.safetensors")) == _mode(os.path.join(ckpt, "engine", "state.pt"))
    out = str(tmp_path / "t.safetensors")
    export_teacher(tiny_run, out)
    with open(tmp_path / "plain", "w"):  # a file created as open() does: 0666 less the umask
        pass
    assert _mode(out) == _mode(out + ".json") == _mode(str(tmp_path / "plain"))


def test_missing_optional_packages_are_one_error_line(monkeypatch, tmp_path, capsys):
    from massl.tools import digits
    from massl.data.webdataset import require_webdataset

    monkeypatch.setitem(sys.modules, "webdataset", None)  # import webdataset raises ImportError
    with pytest.raises(UserError, match="webdataset.*pip install"):
        require_webdataset()
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(SystemExit) as e:
        digits.main(["--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "scikit-learn" in err
    assert len(err.strip().splitlines()) == 1, err


def test_digits_default_size_is_the_quickstarts(tmp_path):
    from massl.tools import digits

    digits.main(["--out", str(tmp_path / "d")])
    first = next((tmp_path / "d" / "val" / "0").iterdir())
    assert Image.open(first).size == (32, 32)
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "`.[quickstart]`" in readme  # the extra that the digits tool needs (scikit-learn)


def test_missing_shards_name_data_urls(digits_dir, tmp_path):
    from massl.data import build_data

    base = [o for o in tiny_overrides(os.path.join(digits_dir, "train"), str(tmp_path / "run"))
            if not o.startswith("data.path=")]
    cfg = load_config(None, base + ["data.source=webdataset", "data.urls=/x/nope/shard-{000000..000001}.tar"])
    with pytest.raises(UserError, match=r"^data.urls: .*no such shard"):
        build_data(cfg, 0, 1, "cpu")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_eval_device_error_names_the_flag(tiny_run, digits_dir, capsys):
    from massl.eval.cli import main

    with pytest.raises(SystemExit) as e:
        main(["knn", "--checkpoint", tiny_run, "--train", os.path.join(digits_dir, "train"),
              "--val", os.path.join(digits_dir, "val"), "--device", "cuda"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --device: cuda"), err


def test_every_massl_eval_flag_is_in_docs_eval_md():
    from massl.eval.cli import build_parser

    doc = open(os.path.join(ROOT, "docs", "eval.md")).read()
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict)).choices
    flags = {s for sub in subparsers.values() for a in sub._actions for s in a.option_strings if s.startswith("--")}
    missing = sorted(f for f in flags - {"--help"} if f"`{f}`" not in doc)
    assert not missing, f"docs/eval.md does not document {missing}"


@pytest.fixture
def small_folders(tmp_path):
    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(tmp_path / split / c)
            for i in range(10):
                Image.fromarray(rng.randint(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    return str(tmp_path / "train"), str(tmp_path / "val")


def test_training_says_when_it_evaluates_checkpoints_and_ends(digits_dir, small_folders, tmp_path, capsys):
    from massl.train import train

    train_dir, val_dir = small_folders
    out = str(tmp_path / "run")
    train(load_config(None, tiny_overrides(os.path.join(digits_dir, "train"), out) + [
        "run.max_steps=2", "eval.every_steps=2", f"eval.train={train_dir}", f"eval.val={val_dir}",
        "eval.num_workers=0"]))
    lines = capsys.readouterr().out.splitlines()

    def first(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)

    assert first("eval: k-NN of the teacher, features of eval.train (20 images) and eval.val (20 images)") < \
        first("eval step 2:")
    assert "checkpoints/step_000000002 (" in lines[first("massl: checkpoint of step 2 written to")]
    assert first("massl: run finished at step 2 of 2") == len(lines) - 1


def test_eval_progress_names_the_input_with_a_clock_eta(tiny_run, small_folders, capsys):
    from massl.eval.cli import main

    train_dir, val_dir = small_folders
    main(["knn", "--checkpoint", tiny_run, "--train", train_dir, "--val", val_dir, "--batch-size", "1",
          "--workers", "0", "--k", "1", "--out", os.path.join(os.path.dirname(train_dir), "knn.json")])
    lines = [line for line in capsys.readouterr().out.splitlines() if "features" in line]
    assert [line.split(":")[0].strip() for line in lines] == ["features (train)", "features (val)"], lines
    assert all(line.rstrip().endswith("eta 0:00)") for line in lines), lines


def test_massl_shard_one_set_per_folder_quiet_and_bad_values(tmp_path, capsys):
    from massl.tools.shard import main
    from tests.test_shard import make_folder

    root, out = str(tmp_path / "images"), str(tmp_path / "shards")
    make_folder(root, n_per_class=3)
    assert main([root, "--out", out, "--prefix", "first", "--workers", "1", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "massl-shard: 6 images in 1 shard(s)" in captured.out  # the summary, even with --quiet
    assert "skipped" in captured.err and "truncated.jpg" in captured.err  # and the warnings
    with pytest.raises(SystemExit):
        main([root, "--out", out, "--prefix", "second", "--workers", "1"])
    assert "another --out" in capsys.readouterr().err
    assert main([root, "--out", out, "--prefix", "second", "--workers", "1", "--overwrite", "--quiet"]) == 0
    assert sorted(f for f in os.listdir(out) if f.endswith(".tar")) == ["second-000000.tar"]  # no orphan
    capsys.readouterr()
    for flag, value in (("--quality", "500"), ("--max-side", "-5")):
        with pytest.raises(SystemExit) as e:
            main([root, "--out", str(tmp_path / "x"), flag, value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {flag} {value}:"), err
