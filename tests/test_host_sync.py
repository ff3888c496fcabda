"""No host synchronisation inside a non-logging training step, for every engine.

On a GPU, a value read back to the host (`.item()`, `bool(t)`, `.cpu()`, an output whose size
depends on tensor values) stalls the CPU until the device has caught up, so the next kernels are
launched late. The test counts, with `massl.testing.opcount.OpCounter` (a TorchDispatchMode), what one
step of the training loop asks of the dispatcher (`train_step` without the monitor, then the
loop's per-step bookkeeping `StepWindow.add`) on gloo CPU processes, and requires zero
host-scalar reads (`aten._local_scalar_dense`, device-to-host copies, `.cpu()` / `.tolist()` /
`.numpy()`), zero ops with data-dependent output shapes and no `torch.cuda.synchronize` /
`empty_cache`. The first step (lazy optimiser state) is not counted.

The optimiser is configured as on the GPU: massl builds AdamW fused on every device
(`massl.optim.build_optimizer`), which keeps its step counters on the device. torch's foreach or
single-tensor AdamW reads two step counters per parameter and step instead (312 reads for a
ViT-S/16 step; `test_counter_sees_host_reads` shows the counter reporting them).

Engines: single (W=1), ddp, fsdp and deepspeed ZeRO 1, 2, 3 (W=2). ZeRO-3 is the one exception,
pinned here: DeepSpeed's own stage-3 `step` reads its gradient-norm overflow flag once per step,
and during its first steps (while it records the parameter-fetch trace) its coordinator checks
that every rank agrees, with hundreds of reads; the counted step comes after that. The DeepSpeed
step also counts DeepSpeed's calls of its accelerator's `synchronize` (a full device sync on a GPU,
a no-op on the CPU, so the op counter cannot see them): none, at every stage (its throughput
timer, which made two per step, is off in massl's config).
The same check runs on CUDA in tests/test_gpu.py.
"""
from __future__ import annotations

import os

import pytest
import torch

from massl.config import Config, load_config
from massl.dist import DistEnv
from massl.models import build_student_teacher
from massl.testing.opcount import OpCounter
from massl.optim import build_optimizer, param_groups
from massl.schedules import Hyper
from massl.train import StepWindow, build_step, train_step
from tests.conftest import tiny_overrides
from tests.distributed import run_ranks

HPARAMS = Hyper(lr=1e-3, wd=0.04, teacher_momentum=0.99, teacher_temp=0.05)

# Every path a step can take: sharded and replicated memory, both clipping modes, KoLeo over the
# global and the local batch, a synchronised BatchNorm head, activation checkpointing.
VARIANTS = [
    {"memory.sharded": "true", "optim.clip_mode": "per_param", "loss.koleo_weight": 0.1, "loss.koleo_scope": "global",
     "model.head_use_bn": True},
    {"memory.sharded": "false", "optim.clip_mode": "global", "loss.koleo_weight": 0.1, "loss.koleo_scope": "local",
     "engine.activation_checkpointing": "full"},
]


def tiny_config(engine: str, device: str = "cpu", precision: str = "fp32", **overrides) -> Config:
    """The suite's tiny ViT (tests/conftest.py), 4 images per rank, with drop-path on (a path a step takes)."""
    values = {"run.device": device, "run.precision": precision, "engine.name": engine, "data.batch_size": 4,
              "model.drop_path": 0.1, **overrides}
    text = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]
    return load_config(None, tiny_overrides("unused", "unused") + text, check_paths=False)


def count_loop_step(cfg: Config, env: DistEnv, setup=None, extra=None, steps: int = 2) -> dict:
    """Build the run's engine and objective, take `steps` steps and count the last one. `setup(engine)`
    runs after building, `extra(out)` inside the counted step after train_step (to plant host reads)."""
    engine, objective = build_step(cfg, env)
    if setup is not None:
        setup(engine)
    g = torch.Generator().manual_seed(env.rank)
    sizes = [cfg.data.global_crop_size] * 2 + [cfg.data.local_crop_size] * cfg.data.local_crops_number
    crops = [torch.randn(cfg.data.batch_size, 3, s, s, generator=g).to(env.device) for s in sizes]
    window = StepWindow(env.device)
    for step in range(steps):
        with OpCounter() as counter:
            out = train_step(engine, objective, crops, step, HPARAMS)
            window.add(step, out, 0)
            if extra is not None:
                extra(out)
    return {"loss": float(out["loss"]), **counter.summary()}


PARALLEL_ENGINES = ("ddp", "fsdp")


def _ranks(rank, world):
    env = DistEnv(rank=rank, world_size=world, device=torch.device("cpu"), group=torch.distributed.group.WORLD)
    return {(engine, i): count_loop_step(tiny_config(engine, **variant), env)
            for engine in PARALLEL_ENGINES for i, variant in enumerate(VARIANTS)}


def assert_no_host_sync(result: dict, what: str) -> None:
    assert result["total_ops"] > 100, what  # the counter saw the step
    assert result["host_scalar_reads"] == 0, (what, result["host_reads_by_kind"])
    assert result["dynamic_shape_ops"] == 0, (what, result)


def test_single_engine_step_has_no_host_sync():
    for variant in VARIANTS:
        assert_no_host_sync(count_loop_step(tiny_config("single", **variant), DistEnv()), f"single {variant}")


def test_parallel_engines_step_has_no_host_sync():
    """ddp and fsdp at W=2 (one set of processes for both)."""
    for rank, results in enumerate(run_ranks(_ranks, 2)):
        assert sorted(results) == [(e, i) for e in PARALLEL_ENGINES for i in range(len(VARIANTS))]
        for (engine, i), result in results.items():
            assert_no_host_sync(result, f"{engine} rank {rank} {VARIANTS[i]}")


def _count_accelerator_syncs() -> list:
    """Count DeepSpeed's device synchronizations (`get_accelerator().synchronize()`: a no-op on the
    CPU, a full device sync on a GPU) by wrapping the accelerator's method; returns the call log."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    accelerator, calls = get_accelerator(), []
    synchronize = accelerator.synchronize

    def counted(*args, **kwargs):
        calls.append(1)
        return synchronize(*args, **kwargs)

    accelerator.synchronize = counted
    return calls


def _deepspeed_ranks(rank, world):
    env = DistEnv(rank=rank, world_size=world, device=torch.device("cpu"), group=torch.distributed.group.WORLD)
    settings = [(1, 0), (2, 0), (2, 1), (3, 0)]  # (ZeRO stage, variant)
    calls = _count_accelerator_syncs()
    results = {}
    for stage, i in settings:
        after_step = []  # the sync count at the end of each step
        results[(stage, i)] = count_loop_step(tiny_config("deepspeed", **VARIANTS[i], **{"engine.zero_stage": stage}),
                                              env, steps=5, extra=lambda out: after_step.append(len(calls)))
        results[(stage, i)]["accelerator_syncs"] = after_step[-1] - after_step[-2]
    return results


def test_deepspeed_step_has_no_host_sync_but_zero3s_own():
    pytest.importorskip("deepspeed")
    for rank, results in enumerate(run_ranks(_deepspeed_ranks, 2, timeout=900)):
        for (stage, i), result in results.items():
            what = f"deepspeed ZeRO-{stage} rank {rank} {VARIANTS[i]}"
            # no device synchronization of DeepSpeed's own (its throughput timer made two per step)
            assert result["accelerator_syncs"] == 0, (what, result)
            if stage < 3:
                assert_no_host_sync(result, what)
            else:
                assert result["host_reads_by_kind"] == {"aten._local_scalar_dense": 1}, (what, result)
                assert result["dynamic_shape_ops"] == 0, (what, result)


def test_counter_sees_host_reads():
    """The counter fails the step when a value is read back: an `.item()` of the gradient norm
    (what a progress line would do), or torch's foreach AdamW, which reads its step counters."""
    planted = count_loop_step(tiny_config("single"), DistEnv(), extra=lambda out: out["grad_norm"].item())
    assert planted["host_reads_by_kind"] == {"aten._local_scalar_dense": 1}

    cfg = tiny_config("single")

    def foreach_adamw(engine):
        engine.optimizer = build_optimizer(cfg.optim, param_groups(engine.student), fused=False)

    foreach = count_loop_step(cfg, DistEnv(), setup=foreach_adamw)
    n_params = sum(1 for _ in build_student_teacher(cfg)[0].parameters())
    assert foreach["host_reads_by_kind"] == {"aten._local_scalar_dense": 2 * n_params}
