"""massl-report: the teacher's attention and patch-feature PCA against independent references,
the metrics reader, the page itself, and the page as a browser shows it (headless Chromium)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from massl.config import load_config
from massl.models import build_backbone
from massl.report.build import ReportOptions, write_report
from massl.report.cli import main as report_main
from massl.report.records import read_metrics
from massl.report.teacher import cls_attention, patch_tokens


def tiny_backbone():
    cfg = load_config(None, ["model.arch=custom", "model.embed_dim=32", "model.depth=2", "model.num_heads=4",
                             "model.patch_size=8", "data.global_crop_size=16"], check_paths=False)
    torch.manual_seed(0)
    return build_backbone(cfg.model, 16).eval()


def test_cls_attention_equals_timm_unfused_softmax():
    """Reference: timm's own non-fused attention path, whose softmax goes through attn_drop."""
    backbone = tiny_backbone()
    x = torch.randn(3, 3, 24, 32)  # not square, not the training size: a 3 x 4 grid
    ours = cls_attention(backbone, x)
    attn = backbone.blocks[-1].attn
    seen = []
    attn.fused_attn = False
    attn.attn_drop.register_forward_hook(lambda m, args, out: seen.append(out))
    with torch.no_grad():
        backbone(x)
    ref = seen[-1][:, :, 0, 1:].reshape(3, attn.num_heads, 3, 4)
    assert ours.shape == (3, 4, 3, 4)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.sum(dim=(2, 3)), torch.ones(3, 4) - seen[-1][:, :, 0, 0], rtol=1e-5, atol=1e-6)


def test_patch_pca_rgb_equals_float64_svd():
    from massl.report.figures import pca_rgb

    tokens = patch_tokens(tiny_backbone(), torch.randn(2, 3, 32, 32)).numpy()  # [2, 4, 4, 32]
    rgb = pca_rgb(tokens)
    flat = tokens.reshape(-1, 32).astype(np.float64)
    flat = flat - flat.mean(axis=0)
    proj = flat @ np.linalg.svd(flat, full_matrices=False)[2][:3].T
    ref = ((proj - proj.min(0)) / (proj.max(0) - proj.min(0))).reshape(rgb.shape)
    for c in range(3):  # a principal component's sign is arbitrary: the channel is ref or 1 - ref
        assert min(np.abs(rgb[..., c] - ref[..., c]).max(), np.abs(rgb[..., c] - (1 - ref[..., c])).max()) < 1e-6


def test_read_metrics_keeps_the_later_record_of_a_step_and_skips_a_torn_line(tmp_path):
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval/knn_top1": 0.5},
             {"step": 2, "loss": 1.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3, "lo')
    assert read_metrics(str(tmp_path)) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 1.5, "eval/knn_top1": 0.5}]


@pytest.fixture(scope="module")
def report(tiny_run, digits_dir, tmp_path_factory):
    """The report of the shared tiny run, with one massl-eval result beside it (a copy of the run)."""
    run = str(tmp_path_factory.mktemp("report") / "run")
    shutil.copytree(tiny_run, run)
    shutil.rmtree(os.path.join(run, "eval"), ignore_errors=True)  # results other tests wrote into the shared run
    os.makedirs(os.path.join(run, "eval"))
    with open(os.path.join(run, "eval", "knn-trained.json"), "w") as f:
        json.dump({"protocol": "knn", "weights": "teacher", "step": 2, "n_train": 10, "n_val": 5,
                   "results": [{"k": 20, "top1": 0.875, "top5": 1.0}]}, f)
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:  # as a run with periodic k-NN logs it
        f.write(json.dumps({"step": 2, "epoch": 0, "eval/knn_top1": 0.25, "eval/knn_top5": 0.75}) + "\n")
    path = write_report(run, ReportOptions(images=os.path.join(digits_dir, "val"), max_points=40))
    return path


def test_report_page_holds_every_section(report):
    assert report.endswith(os.path.join("report", "index.html"))
    page = open(report).read()
    srcs = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert [alt for alt, _ in srcs] == ["training curves", "attention maps", "patch feature PCA", "feature embedding"]
    assert "k=20: top-1 0.875" in page and "knn-trained.json" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from the network


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


CHECK = ('<script>window.addEventListener("load", () => document.body.setAttribute("data-widths", '
         'JSON.stringify([...document.images].map(i => i.complete ? i.naturalWidth : -1))));</script>')


@pytest.mark.skipif(_chromium() is None, reason="no Chromium (Debian package chromium; .ci/run installs it as root)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    """Every image decodes in a browser (naturalWidth > 0) and the page is not blank (a screenshot's
    pixels vary)."""
    from PIL import Image

    probe = tmp_path / "probe.html"  # the report plus a script that records each image's width
    probe.write_text(open(report).read().replace("</body>", CHECK + "</body>"))
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1300,2000"]
    dom = subprocess.run(browser + ["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=180).stdout
    widths = json.loads(re.search(r'data-widths="([^"]*)"', dom).group(1).replace("&quot;", '"'))
    assert len(widths) == 4 and all(w > 0 for w in widths), widths
    shot = tmp_path / "shot.png"
    subprocess.run(browser + [f"--screenshot={shot}", "file://" + report], capture_output=True, timeout=180)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # text and figures, not a white page


def test_report_reads_only_teacher_safetensors(tiny_run, tmp_path, capsys):
    """A checkpoint without teacher.safetensors (as an older massl wrote them): the report refuses
    (one error line, exit 2) instead of unpickling the engine's files."""
    run = str(tmp_path / "run")
    shutil.copytree(tiny_run, run)
    for root, _, files in os.walk(run):
        if "manifest.json" in files and "teacher" in os.listdir(root):
            shutil.rmtree(os.path.join(root, "teacher"))
            path = os.path.join(root, "manifest.json")
            manifest = json.load(open(path))
            manifest["parts"].remove("teacher")
            for key in ("files", "sha256"):
                del manifest[key]["teacher/teacher.safetensors"]
            json.dump(manifest, open(path, "w"))
    with pytest.raises(SystemExit) as e:
        report_main([run, "--images", "/nonexistent"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: RUN_DIR") and "teacher/teacher.safetensors" in err and "pickle" in err, err
    assert not os.path.exists(os.path.join(run, "report"))
