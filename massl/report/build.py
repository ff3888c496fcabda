"""Write a run's report: RUN_DIR/report/index.html (docs/report.md).

The teacher is read from the newest complete checkpoint's teacher/teacher.safetensors (tensors
only, checked against its recorded sha256): never from the engine's pickled files."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..checkpoint.manager import read_checkpoint_manifest
from ..checkpoint.reader import load_teacher_backbone, resolve_checkpoint
from ..errors import UserError
from ..eval.extract import eval_transform
from ..fileio import write_text_atomic
from . import figures, page
from .images import as_display, pick_for_maps, read_images
from .records import eval_rows, read_metrics
from .teacher import cls_attention, image_features, patch_tokens


@dataclass
class ReportOptions:
    images: str = ""  # validation images ("": the run's eval.val)
    num_images: int = 4  # images of the attention and PCA figures
    max_points: int = 1000  # images of the 2-D embedding
    embedding: str = "tsne"  # tsne | pca
    image_size: int = 0  # 0: the run's data.global_crop_size
    crop_ratio: float = 0.0  # 0: the run's eval.crop_ratio
    out: str = ""  # "": RUN_DIR/report
    seed: int = 0


def teacher_sections(backbone, cfg, opts: ReportOptions, images_path: str) -> list[tuple[str, str]]:
    """The attention, PCA and embedding sections over the images of `images_path`."""
    size = opts.image_size or cfg.data.global_crop_size
    if size % cfg.model.patch_size:
        raise UserError(f"--image-size: {size} is not a multiple of the model's patch size {cfg.model.patch_size}")
    crop = opts.crop_ratio or cfg.eval.crop_ratio
    data = read_images(images_path, max(opts.max_points, opts.num_images))
    if not data.images:
        return [("Teacher", page.note(f"no readable image in {images_path}"))]
    tf = eval_transform(cfg.data.aug.mean, cfg.data.aug.std, size, crop)
    x = torch.stack([tf(im) for im in data.images])
    shown = pick_for_maps(data.labels, opts.num_images)
    display = [as_display(data.images[i], size, crop) for i in shown]
    titles = [data.classes[data.labels[i]] if data.labels[i] >= 0 else os.path.basename(data.names[i]) for i in shown]
    maps = cls_attention(backbone, x[shown]).numpy()
    rgb = figures.pca_rgb(patch_tokens(backbone, x[shown]).numpy())
    points = figures.embed_2d(image_features(backbone, x).numpy(), opts.embedding, opts.seed)
    source = page.note(f"{len(data.images)} images of {images_path}, {size} px (crop ratio {crop}).")
    return [
        ("Attention of the teacher's last block (CLS token to each patch, per head)",
         source + page.image_tag(figures.attention_png(display, maps, titles), "attention maps")),
        ("PCA of the teacher's patch features (first three components as RGB)",
         page.image_tag(figures.pca_png(display, rgb, titles), "patch feature PCA")),
        ("Teacher features of the validation images in 2-D, coloured by class",
         page.image_tag(figures.embedding_png(points, data.labels, data.classes, opts.embedding), "feature embedding")),
    ]


def write_report(run_dir: str, opts: ReportOptions = ReportOptions()) -> str:
    """Write the report of `run_dir`; returns the path of index.html."""
    if opts.embedding not in ("tsne", "pca"):
        raise UserError(f"--embedding: must be tsne or pca, got {opts.embedding!r}")
    if opts.num_images < 1 or opts.max_points < 1:
        raise UserError("--num-images and --max-points: must be >= 1")
    try:
        ckpt = resolve_checkpoint(run_dir)
        backbone, cfg = load_teacher_backbone(ckpt)
    except (OSError, ValueError) as e:  # UserError is a ValueError
        raise UserError(f"RUN_DIR {run_dir}: {e}") from None
    step = read_checkpoint_manifest(ckpt).get("step")
    records = read_metrics(run_dir)
    curves = figures.curves_png(records)
    rows = eval_rows(run_dir)
    sections = [
        ("Training curves", page.image_tag(curves, "training curves") if curves else page.note("no metrics.jsonl records")),
        ("Evaluation (eval/*.json)", page.table(["file", "protocol", "weights", "step", "train", "val", "results"],
                                                [list(r.values()) for r in rows]) if rows else
         page.note("no evaluation results in eval/ (massl-eval --out RUN_DIR/eval/NAME.json writes them)")),
    ]
    images_path = opts.images or cfg.eval.val
    if not images_path:
        sections.append(("Teacher", page.note("no validation images: pass --images DIR (or set eval.val in the run)")))
    else:
        sections += teacher_sections(backbone, cfg, opts, images_path)
    m = cfg.model
    arch = m.arch if m.arch != "custom" else f"custom (dim {m.embed_dim}, depth {m.depth}, {m.num_heads} heads)"
    summary = [("run", os.path.abspath(run_dir)), ("checkpoint", f"{ckpt} (step {step})"),
               ("model", f"{arch}, patch {m.patch_size}"), ("last logged step", str(records[-1]["step"]) if records else "-")]
    out = opts.out or os.path.join(run_dir, "report")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "index.html")
    write_text_atomic(path, page.render(f"massl report: {os.path.basename(os.path.abspath(run_dir))}", summary, sections))
    return path
