"""massl-export loads the teacher strictly into the model before writing; a malformed
safetensors file is one line in massl-export and massl-eval; massl-eval handles a non-UTF-8 file
name with --cache and checks the default --out before any work."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from massl.checkpoint.teacher import TEACHER_PATH
from massl.cli import export_main
from massl.eval.cli import main as eval_main
from massl.fileio import sha256_file
from tests.test_eval_extract import write_folder


def tampered(tiny_run: str, tmp_path, write) -> str:
    """A copy of the tiny run's checkpoint whose teacher file `write(path)` replaced, with a
    manifest that agrees (as a tool other than massl would leave it)."""
    root = os.path.join(tiny_run, "checkpoints")
    src = [os.path.join(root, d) for d in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, d, "manifest.json"))][-1]
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(src, ckpt)
    path = os.path.join(ckpt, TEACHER_PATH)
    write(path)
    manifest_path = os.path.join(ckpt, "manifest.json")
    m = json.load(open(manifest_path))
    m.setdefault("files", {})[TEACHER_PATH] = os.path.getsize(path)
    m.setdefault("sha256", {})[TEACHER_PATH] = sha256_file(path)[0]
    json.dump(m, open(manifest_path, "w"))
    return ckpt


def run_cli(main, capsys, *argv):
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def wrong_shapes(path):
    state = {k: torch.zeros(3) if k == "backbone.cls_token" else v for k, v in
             __import__("safetensors.torch", fromlist=["load_file"]).load_file(path).items()}
    save_file(state, path)


@pytest.mark.parametrize("write,message", [
    (wrong_shapes, "the teacher does not fit the model of the run's config: tensors 1 of another shape, e.g. cls_token (3,)"),
    (lambda p: save_file({"head.w": torch.zeros(2)}, p), "the teacher holds no backbone tensors"),
    (lambda p: open(p, "wb").write(b"\xff" * 8 + b"{not json"), "teacher.safetensors: not a readable safetensors file"),
])
def test_export_refuses_a_teacher_that_cannot_load_before_writing(tiny_run, tmp_path, capsys, write, message):
    ckpt = tampered(tiny_run, tmp_path, write)
    out = str(tmp_path / "t.safetensors")
    code, err = run_cli(export_main, capsys, "--checkpoint", ckpt, "--out", out)
    assert code == 2 and message in err and err.count("\n") == 1, err  # before: exit 0 (shapes, empty) or a traceback
    assert not os.path.exists(out) and not os.path.exists(out + ".json")


def test_massl_eval_reports_a_malformed_teacher_in_one_line(tiny_run, tmp_path, capsys):
    ckpt = tampered(tiny_run, tmp_path, lambda p: open(p, "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}   "))
    folder = write_folder(str(tmp_path / "f"), counts=(1, 1, 1), bad="")
    code, err = run_cli(eval_main, capsys, "knn", "--checkpoint", ckpt, "--train", folder, "--val", folder,
                        "--workers", "0", "--out", str(tmp_path / "r.json"))
    assert code == 2 and err.startswith("error: --checkpoint") and "not a readable safetensors file" in err, err
    assert err.count("\n") == 1


def test_massl_eval_cache_with_a_non_utf8_file_name(tiny_run, tmp_path, capsys):
    folder = write_folder(str(tmp_path / "f"), counts=(2, 2, 2), bad="")
    os.rename(os.path.join(folder, "a", "0.png"), os.path.join(folder.encode(), b"a", b"caf\xe9.png"))
    out = str(tmp_path / "r.json")
    code, err = run_cli(eval_main, capsys, "knn", "--checkpoint", tiny_run, "--train", folder, "--val", folder,
                        "--workers", "0", "--k", "2", "--cache", str(tmp_path / "cache"), "--out", out)
    assert code == 0, err  # before: error: 'utf-8' codec can't encode character '\udce9' ...
    assert json.load(open(out))["n_train"] == 6


def test_massl_eval_checks_the_default_out_before_the_work(tiny_run, tmp_path, capsys, monkeypatch):
    import massl.eval.run as run_mod

    run = str(tmp_path / "run")
    shutil.copytree(tiny_run, run)
    shutil.rmtree(os.path.join(run, "eval"), ignore_errors=True)  # other tests' results
    with open(os.path.join(run, "eval"), "w") as f:  # the default --out's folder cannot be made
        f.write("in the way")
    monkeypatch.setattr(run_mod, "extract_features", lambda *a, **k: pytest.fail("extracted before --out was checked"))
    folder = write_folder(str(tmp_path / "f"), counts=(1, 1, 1), bad="")
    code, err = run_cli(eval_main, capsys, "knn", "--checkpoint", run, "--train", folder, "--val", folder, "--workers", "0")
    assert code == 2 and err.startswith("error: --out (default): cannot create the folder of"), err
