"""massl-eval end to end on a tiny checkpoint: the four commands, a table and a JSON each, an
unreadable image skipped, counted and named, the feature cache, and one-line refusals (exit 2)
of meaningless values."""
import json
import os
import subprocess
import sys

import pytest

from massl.eval.cli import main
from tests.test_eval_extract import write_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("eval_cli"))
    train = write_folder(os.path.join(root, "train"), counts=(6, 6, 6), bad="", seed=1)
    val = write_folder(os.path.join(root, "val"), counts=(3, 3, 3), bad="c/broken.jpg", seed=2)
    return train, val


def run_eval(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("cmd,extra", [
    ("knn", ["--k", "1", "5"]),
    ("linear", ["--solver", "sgd", "--lrs", "0.01", "1", "--epochs", "3", "--n-last-blocks", "2", "--avgpool"]),
    ("linear", ["--solver", "lbfgs"]),
    ("lowshot", ["--shots", "1", "2", "--draws", "2"]),
    ("retrieval", ["--recall-k", "1", "3"]),
])
def test_commands_print_a_table_write_json_and_skip_unreadable_images(capsys, tiny_run, folders, tmp_path, cmd, extra):
    train, val = folders
    out = str(tmp_path / f"{cmd}.json")
    common = ["--checkpoint", tiny_run, "--train", train, "--val", val, "--workers", "0", "--cache", str(tmp_path / "c")]
    code, stdout, stderr = run_eval(capsys, cmd, *common, *extra, "--out", out)
    assert code == 0, stderr
    assert "broken.jpg" in stderr  # named on stderr ...
    r = json.load(open(out))
    assert r["skipped_val"] == 1 and r["skipped_images"][0]["name"].endswith("broken.jpg")  # ... and in the JSON
    assert r["n_train"] == 18 and r["n_val"] == 9 and r["protocol"] == cmd and r["step"] == 2
    assert "1 unreadable skipped" in stdout and "---" in stdout  # the summary line and the table
    if cmd == "knn":
        assert [x["k"] for x in r["results"]] == [1, 5]
    elif cmd == "linear" and "sgd" in extra:
        assert r["feature_dim"] == 3 * 32 and len(r["results"]["heldout_top1"]) == 2
    elif cmd == "lowshot":
        assert [x["shots"] for x in r["results"]] == [1, 2] and len(r["results"][0]["logreg"]["top1"]) == 2
    elif cmd == "retrieval":
        assert [x["k"] for x in r["results"]["recall"]] == [1, 3] and 0 < r["results"]["mAP"] <= 1
    # the same command again reads the cached features: same result, no image opened
    code, _, stderr = run_eval(capsys, cmd, *common, *extra, "--out", out + ".again")
    assert code == 0 and "broken.jpg" not in stderr
    again = json.load(open(out + ".again"))
    assert again["results"] == r["results"] and again["skipped_images"] == r["skipped_images"]


@pytest.mark.parametrize("argv,message", [
    (["knn", "--k", "0"], "error: --k: must be integers >= 1, got [0]"),
    (["knn", "--k", "20", "-3"], "error: --k: must be integers >= 1"),
    (["knn", "--temperature", "0"], "error: --temperature: must be > 0, got 0.0"),
    (["knn", "--temperature", "nan"], "error: --temperature: must be > 0"),
    (["knn", "--crop-ratio", "0"], "error: --crop-ratio: must be in (0, 1]"),
    (["retrieval", "--batch-size", "0"], "error: --batch-size: must be >= 1"),
    (["retrieval", "--recall-k", "0"], "error: --recall-k: must be integers >= 1"),
    (["lowshot", "--shots", "0"], "error: --shots: must be integers >= 1"),
    (["lowshot", "--draws", "0"], "error: --draws: must be >= 1"),
    (["linear", "--holdout", "1"], "error: --holdout: must be in (0, 1)"),
    (["linear", "--lrs", "0.1", "0"], "error: --lrs: must be numbers > 0"),
    (["linear", "--epochs", "0"], "error: --epochs: must be >= 1"),
    (["linear", "--n-last-blocks", "3"], "error: --n-last-blocks: 3 exceeds the model's 2 blocks"),
    (["knn", "--image-size", "12"], "error: --image-size: 12 is not a multiple of the model's patch size 8"),
])
def test_meaningless_values_are_refused_in_one_line(capsys, tiny_run, folders, argv, message):
    train, val = folders
    code, _, stderr = run_eval(capsys, *argv, "--checkpoint", tiny_run, "--train", train, "--val", val)
    assert code == 2 and stderr.startswith(message) and stderr.count("\n") == 1, stderr


def test_missing_input_and_unknown_val_class_are_refused(capsys, tiny_run, folders, tmp_path):
    train, val = folders
    code, _, stderr = run_eval(capsys, "knn", "--checkpoint", tiny_run, "--train", str(tmp_path / "nope"), "--val", val)
    assert code == 2 and stderr.startswith("error: --train:") and stderr.count("\n") == 1
    other = write_folder(str(tmp_path / "other"), counts=(1, 1, 1), bad="", seed=3)
    os.rename(os.path.join(other, "c"), os.path.join(other, "z"))
    code, _, stderr = run_eval(capsys, "knn", "--checkpoint", tiny_run, "--train", train, "--val", other,
                               "--workers", "0")
    assert code == 2 and "error: --val has 1 class(es) that --train lacks, e.g. 'z'" in stderr


def test_console_command_exits_2_with_one_line(tiny_run, folders):
    train, val = folders
    proc = subprocess.run([sys.executable, "-c", "from massl.cli import eval_main; eval_main()", "knn", "--k", "0",
                           "--checkpoint", tiny_run, "--train", train, "--val", val], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --k:") and proc.stderr.count("\n") == 1, proc.stderr


def test_pixels_weights_are_the_raw_pixel_baseline(capsys, tiny_run, digits_dir, tmp_path):
    """--weights pixels: k-NN on the images' own pixels at the run's size (16 px here) equals
    scikit-learn's cosine k-NN with the same exp(similarity / T) vote on PIL-resized pixels."""
    import numpy as np
    from PIL import Image
    from sklearn.neighbors import KNeighborsClassifier

    def pixels(split):
        root = os.path.join(digits_dir, split)
        rows = [(np.asarray(Image.open(os.path.join(root, c, f)).convert("RGB").resize((16, 16), Image.BICUBIC),
                            np.float64).ravel() / 255, int(c))
                for c in sorted(os.listdir(root)) for f in sorted(os.listdir(os.path.join(root, c)))]
        return np.stack([r[0] for r in rows]), np.array([r[1] for r in rows])

    out = str(tmp_path / "knn-pixels.json")
    code, _, err = run_eval(capsys, "knn", "--checkpoint", tiny_run, "--train", os.path.join(digits_dir, "train"),
                            "--val", os.path.join(digits_dir, "val"), "--crop-ratio", "1.0", "--workers", "0",
                            "--k", "10", "20", "--weights", "pixels", "--out", out)
    assert code == 0, err
    result = json.load(open(out))
    assert result["weights"] == "pixels" and result["feature_dim"] == 3 * 16 * 16
    (x, y), (vx, vy) = pixels("train"), pixels("val")
    for r in result["results"]:
        ref = KNeighborsClassifier(r["k"], metric="cosine", algorithm="brute",
                                   weights=lambda d: np.exp((1 - d) / 0.07)).fit(x, y)
        assert abs(r["top1"] - (ref.predict(vx) == vy).mean()) <= 1 / len(vy), r  # a tie may fall either way
    code, _, err = run_eval(capsys, "knn", "--checkpoint", tiny_run, "--train", os.path.join(digits_dir, "train"),
                            "--val", os.path.join(digits_dir, "val"), "--weights", "pixels", "--random-init")
    assert code == 2 and err.strip().startswith("error: --random-init")
