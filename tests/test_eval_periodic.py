"""k-NN during training: the run trains exactly as without it (same losses), and the logged
numbers equal `massl-eval knn` on the checkpoints of those steps, in one process and on two
FSDP ranks (each extracting a disjoint part with its sharded teacher)."""
import json
import os

import torch

from massl.config import config_from_dict
from massl.eval.cli import main as eval_main
from tests.distributed import run_ranks

K, STEPS = [5, 20], 4


def eval_overrides(digits_dir: str, workers: int) -> list[str]:
    return ["eval.every_steps=2", f"eval.train={os.path.join(digits_dir, 'train')}",
            f"eval.val={os.path.join(digits_dir, 'val')}", f"eval.k={K}", "eval.crop_ratio=1.0",
            "eval.batch_size=200", f"eval.num_workers={workers}"]


def records(run: str) -> tuple[list, dict]:
    """(training losses by step, eval records by step) from metrics.jsonl."""
    losses, evals = [], {}
    for line in open(os.path.join(run, "metrics.jsonl")):
        r = json.loads(line)
        if "eval/knn_top1" in r:
            evals[r["step"]] = r
        else:
            losses.append((r["step"], r["loss"]))
    return losses, evals


def assert_equals_massl_eval(run: str, evals: dict, digits_dir: str, tmp_path, capsys) -> None:
    for step, logged in evals.items():
        out = str(tmp_path / f"knn-{step}.json")
        eval_main(["knn", "--checkpoint", os.path.join(run, "checkpoints", f"step_{step:09d}"),
                   "--train", os.path.join(digits_dir, "train"), "--val", os.path.join(digits_dir, "val"),
                   "--k", *map(str, K), "--crop-ratio", "1.0", "--batch-size", "200", "--workers", "0",
                   "--threads", "1", "--out", out])
        capsys.readouterr()
        ref = json.load(open(out))["results"]
        assert logged["eval/knn_top1"] == ref[0]["top1"] and logged["eval/knn_top5"] == ref[0]["top5"]
        assert logged[f"eval/knn_top1_k{K[1]}"] == ref[1]["top1"]
        assert logged["eval/knn_skipped_images"] == 0


def test_periodic_knn_keeps_the_trajectory_and_equals_massl_eval(tiny_config, digits_dir, tmp_path, capsys):
    from massl.train import train

    # drop path draws from the global RNG at every step: a draw by the evaluation would show in the losses
    base = [f"run.max_steps={STEPS}", "run.checkpoint_every=2", "run.keep_last=5", "model.drop_path=0.2"]
    train(tiny_config(*base, output_dir=str(tmp_path / "plain")))
    train(tiny_config(*base, *eval_overrides(digits_dir, 2), output_dir=str(tmp_path / "eval")))
    plain, _ = records(str(tmp_path / "plain"))
    with_eval, evals = records(str(tmp_path / "eval"))
    assert with_eval == plain and len(plain) == STEPS  # bitwise the same losses at every step
    rng = [torch.load(os.path.join(tmp_path, name, "checkpoints", f"step_{STEPS:09d}", "trainer", "state.pt"),
                      weights_only=True)["rng"][0]["cpu"] for name in ("plain", "eval")]
    assert torch.equal(*rng)  # and the same RNG state after an evaluation (step 2)
    assert sorted(evals) == [2, 4] and evals[4]["eval/knn_top1"] > 0.2  # 10 classes: better than chance
    assert_equals_massl_eval(str(tmp_path / "eval"), evals, digits_dir, tmp_path, capsys)


def _train(rank, world, cfg_dict):
    from massl.train import train

    train(config_from_dict(cfg_dict))


def test_periodic_knn_on_two_fsdp_ranks_equals_massl_eval(tiny_config, digits_dir, tmp_path, capsys):
    run = str(tmp_path / "fsdp")
    # no loader workers here: forked from these spawned ranks, they took 20 s to start (not so under torchrun)
    cfg = tiny_config("engine.name=fsdp", "run.max_steps=2", "run.checkpoint_every=2", *eval_overrides(digits_dir, 0),
                      output_dir=run)
    run_ranks(_train, 2, cfg.to_dict())
    _, evals = records(run)
    assert sorted(evals) == [2]
    assert_equals_massl_eval(run, evals, digits_dir, tmp_path, capsys)
