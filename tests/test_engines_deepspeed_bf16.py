"""The deepspeed engine in bf16: gradients averaged and clipped in fp32, against float64.

At W=2 (gloo, CPU) each ZeRO stage takes two SGD steps (no momentum), the first clipped per
parameter, the second globally. The reference is computed outside DeepSpeed from the same bf16
forward: a plain copy of the student holding the engine's bf16 weights (its fp32 master rounded,
as DeepSpeed's own are) runs each rank's batch (no BatchNorm in the head, whose statistics
would be synchronised across the ranks), and its per-rank bf16 gradients, upcast to
float64 and averaged over the ranks, are clipped in float64. The engine's gradient norm and its
update of the fp32 master must match them to 1e-6 and 1e-5 relative (fp32 gives ~1e-7);
gradients averaged, held or clipped in bf16 are off by ~5e-6 (norm) and ~4e-3 (update: bf16
keeps 8 significant bits).
A bf16 ZeRO-1 checkpoint (the stage whose optimizer the engine chooses itself) resumes at W=2 and
at W=1.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from massl.config import config_from_dict
from massl.dist import init_distributed
from massl.init_weights import initial_student_teacher
from massl.train import build_step, train
from tests.distributed import run_ranks
from tests.engines_common import losses, step_dir, tiny_config, write_images

pytest.importorskip("deepspeed")

STAGES = (1, 2, 3)
MODES = ("per_param", "global")  # step 1, step 2
LR = 64.0  # large enough that the update stands out of the fp32 master's rounding
# relative errors: gradients reduced, held and clipped in fp32 give ~1e-7 (norm and update);
# in bf16 the norm is off by ~5e-6 and the update by ~4e-3
NORM_TOL = 1e-6
UPDATE_TOL = 1e-5


def _reference_grads(model: torch.nn.Module, crops: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's bf16 gradients of `model` (in bf16) on its batch, averaged over the ranks in float64."""
    model.zero_grad(set_to_none=True)
    _loss(model([c.to(torch.bfloat16) for c in crops])).backward()
    grads = []
    for p in model.parameters():
        g = p.grad.double()
        dist.all_reduce(g)
        grads.append(g / dist.get_world_size())
    return grads


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.float().square().mean()


def _clipped(grads: list[torch.Tensor], max_norm: float, mode: str) -> list[torch.Tensor]:
    """massl's clipping (massl.optim.clip_grads_) in float64 on whole gradients."""
    norms = torch.stack([g.norm() for g in grads])
    bound = norms if mode == "per_param" else norms.norm().expand_as(norms)
    return [g * min(1.0, max_norm / (float(n) + 1e-6)) for g, n in zip(grads, bound)]


def _update_error(before: torch.Tensor, after: torch.Tensor, clipped: torch.Tensor) -> float:
    """How far the master's change is from -LR x the clipped reference gradient, relative to the
    update's largest element, beyond what the fp32 master's own rounding explains (one ulp of the
    parameter's largest weight)."""
    deviation = float(((before - after) - LR * clipped).abs().max())
    ulp = float(torch.finfo(torch.float32).eps * torch.maximum(before.abs().max(), after.abs().max()))
    return max(0.0, deviation - ulp) / float(LR * clipped.abs().max())


def _full_masters(engine) -> list[torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(p).double() for p in engine.student_module.parameters()]


def _bf16_steps(rank, world, cfg_dicts: list) -> list:
    """For each config: per step, (clip mode, relative error of the norm, of the update)."""
    results = []
    for cfg_dict in cfg_dicts:
        cfg = config_from_dict(cfg_dict)
        env = init_distributed(cfg.run.device)
        engine, _ = build_step(cfg, env)
        reference = initial_student_teacher(cfg)[0].to(torch.bfloat16).train()
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own batch: the ranks' gradients differ
        errors = []
        for mode in MODES:
            crops = [torch.randn(cfg.data.batch_size, 3, s, s, generator=g) for s in (32, 32, 16, 16)]
            before = _full_masters(engine)
            with torch.no_grad():  # the weights the engine computes with: its fp32 master in bf16
                for p, m in zip(reference.parameters(), before):
                    p.copy_(m.to(torch.bfloat16))
            grads = _reference_grads(reference, crops)
            norms = torch.stack([g.norm() for g in grads])
            max_norm = float(norms.median() if mode == "per_param" else norms.norm() / 2)  # clips about half / all
            expected = _clipped(grads, max_norm, mode)
            cfg.optim.clip_mode, cfg.optim.clip_grad = mode, max_norm
            engine.backward(_loss(engine.student(crops)))
            norm = float(engine.step(LR, 0.0)["grad_norm"])
            assert engine.step_applied()
            update_error = max(_update_error(b, a, e) for b, a, e in zip(before, _full_masters(engine), expected))
            errors.append((mode, abs(norm / float(norms.norm()) - 1), update_error))
        results.append(errors)
    return results


@pytest.mark.slow
def test_bf16_gradients_are_reduced_and_clipped_in_fp32(tmp_path):
    """ZeRO 1, 2 and 3 in bf16: the gradient norm and the clipped SGD update of the fp32 master
    match the float64 average of the ranks' bf16 gradients, clipped in float64, per parameter and
    globally."""
    cfgs = [tiny_config(str(tmp_path), str(tmp_path / f"zero{stage}"), "deepspeed", 2,
                        run={"precision": "bf16"}, optim={"momentum": 0.0}, engine={"zero_stage": stage},
                        model={"head_use_bn": False})
            for stage in STAGES]
    got = run_ranks(_bf16_steps, 2, cfgs, timeout=900)[0]
    for stage, errors in zip(STAGES, got):
        for mode, norm_error, update_error in errors:
            assert norm_error < NORM_TOL and update_error < UPDATE_TOL, (f"ZeRO-{stage}", mode, norm_error, update_error)


def _train_each(rank, world, cfg_dicts: list) -> None:
    for cfg_dict in cfg_dicts:
        train(config_from_dict(cfg_dict))


@pytest.mark.slow
def test_bf16_zero1_checkpoints_resume(tmp_path):
    """bf16 ZeRO-1 (DeepSpeed's ZeRO optimizer kept, not its BF16_Optimizer: ZeRO-2 and 3 run as
    DeepSpeed configures them) with AdamW, checkpointed at step 2 of 4 at W=2: resumed at W=2 the steps after it repeat the uninterrupted
    run's losses; at W=1 (DeepSpeed's universal conversion) they come within bf16's rounding of
    them (the ranks' bf16 backward differs from one rank's)."""
    data = write_images(str(tmp_path / "images"))

    def config(stage: int, world: int, name: str, **run) -> dict:
        return tiny_config(data, str(tmp_path / name), "deepspeed", world, optim={"name": "adamw", "lr": 0.05},
                           run={"precision": "bf16", "max_steps": 4, "checkpoint_every": 2, **run},
                           engine={"zero_stage": stage})

    full = {stage: config(stage, 2, f"zero{stage}") for stage in (1,)}
    run_ranks(_train_each, 2, list(full.values()), timeout=900)
    for world in (2, 1):
        resumed = {stage: config(stage, world, f"zero{stage}_w{world}",
                                 resume=step_dir(cfg["run"]["output_dir"], 2)) for stage, cfg in full.items()}
        run_ranks(_train_each, world, list(resumed.values()), timeout=900)
        for stage, cfg in resumed.items():
            got, ref = losses(cfg["run"]["output_dir"]), losses(full[stage]["run"]["output_dir"])
            assert sorted(got) == [3, 4], (stage, world, got)
            rtol = 1e-6 if world == 2 else 1e-2
            np.testing.assert_allclose([got[s] for s in (3, 4)], [ref[s] for s in (3, 4)], rtol=rtol,
                                       err_msg=f"bf16 ZeRO-{stage} W=2 -> {world}")
