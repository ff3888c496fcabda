"""massl-report RUN_DIR: the run's report page (docs/report.md)."""
from __future__ import annotations

import argparse

from ..errors import UserError, fail
from ..logging import setup_logging


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="massl-report", description="Write RUN_DIR/report/index.html: training curves, "
                                "evaluation results, the teacher's attention maps, patch-feature PCA, 2-D embedding.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (its newest complete checkpoint is shown)")
    p.add_argument("--images", default="", help="validation images: a labelled image folder or massl-shard shards "
                   "(default: the run's eval.val)")
    p.add_argument("--num-images", type=int, default=4, help="images in the attention and PCA figures (default 4)")
    p.add_argument("--max-points", type=int, default=1000, help="images in the 2-D embedding (default 1000)")
    p.add_argument("--embedding", default="tsne", choices=("tsne", "pca"), help="2-D embedding method (default tsne)")
    p.add_argument("--image-size", type=int, default=0, help="input size in pixels (default: the run's data.global_crop_size)")
    p.add_argument("--crop-ratio", type=float, default=0.0, help="resize to size/ratio, centre crop (default: the run's eval.crop_ratio)")
    p.add_argument("--out", default="", help="output folder (default RUN_DIR/report)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    a = p.parse_args(argv)
    setup_logging()
    import torch

    from .build import ReportOptions, write_report

    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        path = write_report(a.run_dir, ReportOptions(a.images, a.num_images, a.max_points, a.embedding,
                                                     a.image_size, a.crop_ratio, a.out))
    except UserError as e:
        fail(e)
    print(path)
