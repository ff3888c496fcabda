"""An evaluation that cannot give a number never stops training and never logs a fake one; the
standalone massl-eval refuses empty or class-mismatched sets before extracting anything."""
import json
import logging
import os

import pytest

from massl.eval.cli import main as eval_main
from tests.test_eval_extract import write_folder


def unreadable_folder(root: str, classes: str = "abc", per_class: int = 2) -> str:
    """Image names, no image: every file fails to decode (a set deleted or damaged mid-run)."""
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            with open(os.path.join(root, c, f"{i}.png"), "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def eval_records(run: str) -> list:
    return [r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if any(k.startswith("eval/") for k in r)]


def sets_with_one_unusable(tmp_path, names: tuple, broken: str) -> dict:
    """A readable folder for each of `names`, except `broken`: a folder none of whose images reads."""
    good = write_folder(str(tmp_path / "good"), counts=(2, 2, 2), bad="")
    return {**dict.fromkeys(names, good), broken: unreadable_folder(str(tmp_path / "bad"))}


@pytest.mark.parametrize("broken", ["val", "train"])
def test_an_evaluation_with_no_usable_image_warns_and_training_goes_on(tiny_config, tmp_path, caplog, broken):
    from massl.train import train

    sets = sets_with_one_unusable(tmp_path, ("train", "val"), broken)
    run = str(tmp_path / "run")
    cfg = tiny_config("run.max_steps=3", "run.checkpoint_every=3", "eval.every_steps=1", f"eval.train={sets['train']}",
                      f"eval.val={sets['val']}", "eval.k=[2]", "eval.num_workers=0", output_dir=run)
    with caplog.at_level(logging.WARNING, logger="massl"):
        summary = train(cfg)  # before: ZeroDivisionError (val) or eval/knn_top1 0.0 logged (train)
    assert summary["final_step"] == 3
    assert eval_records(run) == []  # no metric for an evaluation that gave none
    warnings = [r.getMessage() for r in caplog.records if "no k-NN result" in r.getMessage()]
    assert len(warnings) == 3, warnings  # one per evaluation (steps 1, 2, 3)
    assert f"eval.{broken}" in warnings[0] and sets[broken] in warnings[0] and "none of its 6 image(s)" in warnings[0]
    assert all("\n" not in w for w in warnings)


def run_eval(capsys, *argv):
    try:
        eval_main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, *capsys.readouterr()


@pytest.mark.parametrize("broken", ["--train", "--val"])
def test_massl_eval_refuses_a_set_with_no_usable_image(capsys, tiny_run, tmp_path, broken):
    sets = sets_with_one_unusable(tmp_path, ("--train", "--val"), broken)
    out = str(tmp_path / "r.json")
    code, stdout, stderr = run_eval(capsys, "knn", "--checkpoint", tiny_run, "--train", sets["--train"], "--val",
                                    sets["--val"], "--workers", "0", "--k", "2", "--out", out)
    # before: ZeroDivisionError traceback (--val) or "k=0 ... 0.0000" printed as a result (--train)
    assert code == 2 and stderr.splitlines()[-1].startswith(f"error: {broken} {sets[broken]!r}: none of its 6 image(s)"), stderr
    assert not os.path.exists(out) and "0.0000" not in stdout


def test_massl_eval_refuses_empty_shards_and_class_mismatch_before_extraction(capsys, tiny_run, tmp_path, monkeypatch):
    import massl.eval.run as run_mod

    def no_extraction(*a, **k):
        raise AssertionError("features extracted before the inputs were checked")

    monkeypatch.setattr(run_mod, "extract_features", no_extraction)
    good = write_folder(str(tmp_path / "good"), counts=(1, 1, 1), bad="")
    other = write_folder(str(tmp_path / "other"), counts=(1, 1, 1), bad="")
    os.rename(os.path.join(other, "c"), os.path.join(other, "z"))
    code, _, stderr = run_eval(capsys, "knn", "--checkpoint", tiny_run, "--train", good, "--val", other, "--workers", "0")
    assert code == 2 and stderr == "error: --val has 1 class(es) that --train lacks, e.g. 'z'\n", stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"format": "massl-shards", "shards": [], "classes": {"a": 0}}))
    for flag, argv in (("--val", ["--train", good, "--val", str(empty)]), ("--train", ["--train", str(empty), "--val", good])):
        code, _, stderr = run_eval(capsys, "knn", "--checkpoint", tiny_run, *argv, "--workers", "0")
        assert code == 2 and stderr.startswith(f"error: {flag}: {str(empty)!r} holds no samples"), stderr
