"""The training loop: the same for every engine and data source (architecture.md's data flow)."""
from __future__ import annotations

import hashlib
import json
import os

import torch

from .checkpoint import CheckpointManager
from .config import Config, validate
from .data import build_data
from .dist import DistEnv, all_reduce_, init_distributed, world_of
from .engines import build_engine
from .logging import MetricsLogger, peak_memory_gib
from .loss import koleo_loss, massl_loss, partition_agreement, random_partition_perm
from .memory import MemoryBank
from .models import build_student_teacher
from .schedules import Schedules
from .signals import StopOnSignal

STOP_POLL_STEPS = 10  # steps between checks for a stop signal (each is a tiny all-reduce)


class NonFiniteLossError(RuntimeError):
    pass


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _rng_states(env: DistEnv) -> list[dict]:
    """Every rank's RNG state, in rank order (collective), so that the main rank can save them all."""
    local = _rng_state(env.device)
    if env.world_size == 1:
        return [local]
    states: list = [None] * env.world_size
    torch.distributed.all_gather_object(states, local, group=env.group)
    return states


def _restore_rng(states: list[dict], env: DistEnv, seed: int, step: int) -> None:
    """This rank's saved state; from a run of another world size, a state derived from (seed, step, rank)."""
    if len(states) != env.world_size:
        torch.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}-{step}-{env.rank}".encode()).digest()[:8], "little"))
        return
    state = states[env.rank]
    torch.set_rng_state(state["cpu"].cpu())
    if env.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), env.device)


def train_step(engine, memory: MemoryBank, crops: list, cfg: Config, step: int, h: dict,
               group=None, monitor: bool = False) -> dict:
    """One MaSSL step (method.md steps 1-9): student on all crops, teacher on the global ones, the
    loss against the memory *before* this step's update, backward, clip + optimiser + teacher EMA
    (the engine), then the enqueue of teacher view 1. `h`: the schedules' values at `step`;
    `group`: the data-parallel group (None in one process).
    Returns device scalars (no host sync): loss (with KoLeo; this rank's value), grad_norm, and
    with `monitor` the agreement of method.md and the KoLeo term."""
    # Sharded memory: the loss spans the global batch. Replicated (published layout): each rank's
    # loss sees its own batch, the memory still stores every rank's keys.
    loss_group = group if cfg.memory.sharded else None
    with engine.autocast():
        zs = engine.student(crops)
        with torch.no_grad():
            zt = engine.teacher(crops[:2])
    perm = random_partition_perm(cfg.memory.size, cfg.run.seed, step, zs.device)
    loss = massl_loss(zs, zt, memory.bank, perm, cfg.memory.partition_size, cfg.loss.student_temp,
                      h["teacher_temp"], group=loss_group, chunk_rows=cfg.memory.chunk_rows)
    objective = loss * global_term_scale(loss_group)
    out = {}
    if cfg.loss.koleo_weight > 0:  # no work at all at weight 0
        koleo_group = group if cfg.loss.koleo_scope == "global" else None  # local: each rank's batch (published)
        out["koleo"] = 0.5 * (koleo_loss(zs[0], koleo_group) + koleo_loss(zs[1], koleo_group))
        loss = loss + cfg.loss.koleo_weight * out["koleo"]
        objective = objective + cfg.loss.koleo_weight * out["koleo"] * global_term_scale(koleo_group)
    engine.backward(objective)
    out["grad_norm"] = engine.step(h["lr"], h["wd"], h["momentum"])
    out["loss"] = loss.detach()
    if monitor:
        out["agree_top1"], out["agree_top5"] = partition_agreement(
            zs[0].detach(), zt[1], memory.bank, perm, cfg.memory.partition_size, loss_group)
    memory.enqueue(zt[1])
    return {k: v.detach() for k, v in out.items()}


def global_term_scale(group) -> float:
    """Engines average gradients over ranks. A term over the global batch (computed with `group`)
    gives each rank only its slice of the term's gradient, so it is scaled by the world size
    for the average to be that gradient; a term over the local batch (None) is averaged as is."""
    return float(world_of(group)[1])


def _resume_dir(cfg: Config, ckpt: CheckpointManager):
    if cfg.run.resume == "never":
        return None
    if cfg.run.resume == "auto":
        return ckpt.latest_complete()
    return cfg.run.resume


def train(cfg: Config, env: DistEnv | None = None) -> dict:
    """Run (or resume) the training described by `cfg`. Returns a summary of the last step."""
    env = env or init_distributed(cfg.run.device)
    validate(cfg, env.world_size, device_type=env.device.type)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if env.device.type == "cpu":
        # Denormal floats (tiny probabilities, gradients) made CPU steps 3x slower as training went on.
        torch.set_flush_denormal(True)
    os.makedirs(cfg.run.output_dir, exist_ok=True)
    if env.is_main:
        with open(os.path.join(cfg.run.output_dir, "config.yaml"), "w") as f:
            f.write(cfg.to_yaml())

    data = build_data(cfg, env.rank, env.world_size, env.device.type)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    student, teacher = build_student_teacher(cfg)
    engine = build_engine(cfg, env, student, teacher)
    memory = MemoryBank(cfg.model.head_bottleneck_dim, cfg.memory.size, group=env.group,
                        sharded=cfg.memory.sharded, seed=cfg.run.seed, device=env.device)
    global_batch = cfg.data.batch_size * env.world_size
    ipe = data.iters_per_epoch
    sched = Schedules.from_config(cfg, ipe, global_batch)
    total_steps = cfg.optim.epochs * ipe
    stop = min(total_steps, cfg.run.max_steps) if cfg.run.max_steps else total_steps

    ckpt = CheckpointManager(cfg.run.output_dir, cfg.run.keep_last, env.is_main, env.group)
    step = 0
    resume_from = _resume_dir(cfg, ckpt)
    if resume_from:
        trainer_state = engine.load(resume_from, memory)
        step = int(trainer_state["step"])
        _restore_rng(trainer_state["rng"], env, cfg.run.seed, step)
    logger = MetricsLogger(cfg.run.output_dir, env.is_main, cfg.run.tensorboard, total_steps, step)
    logger.message(f"massl: engine {engine.name}, {env.world_size} rank(s) on {env.device.type}, precision "
                   f"{engine.precision}, global batch {global_batch}, {ipe} steps/epoch, steps {step} -> {stop}"
                   + (f", resumed from {resume_from}" if resume_from else ""))

    def save_checkpoint() -> None:
        check_finite()
        trainer_state = {"step": step, "rng": _rng_states(env)}
        ckpt.save(step, lambda d: engine.save(d, memory, trainer_state),
                  meta={"format": engine.checkpoint_format, "engine": engine.name, "world_size": env.world_size,
                        "epoch": step // ipe, "config": cfg.to_dict()})

    bad_step = torch.full((), -1, dtype=torch.long, device=env.device)  # first non-finite step, no sync

    def check_finite() -> None:
        first = all_reduce_(bad_step.clone(), env.group, op=torch.distributed.ReduceOp.MAX)
        if first.item() >= 0:
            raise NonFiniteLossError(
                f"the loss became non-finite at step {first.item()}; the last complete checkpoint in "
                f"{ckpt.root} is intact. Lower optim.lr, raise optim.warmup_epochs, or use run.precision=fp32")

    loss_sum, window = torch.zeros((), device=env.device), 0  # loss summed over the steps since the last log
    skipped = torch.zeros((), device=env.device)
    summary = {"step": step}
    stop_signal = StopOnSignal(env.device, env.group).install()
    try:
        while step < stop:
            epoch, start = divmod(step, ipe)
            for batch in data.epoch(epoch, start):
                crops = data.prepare(batch, env.device)
                h = sched.at(step)
                log_now = (step + 1) % cfg.run.log_every == 0 or step + 1 == stop
                out = train_step(engine, memory, crops, cfg, step, h, env.group, monitor=log_now)
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(out["loss"]), step, bad_step)
                loss_sum += out["loss"]
                window += 1
                skipped += batch.skipped
                step += 1
                if log_now:
                    check_finite()
                    # the loss of ranks that see only their own batch (replicated memory, local KoLeo)
                    # differs: report the mean over ranks; skipped images are summed
                    stats = all_reduce_(torch.stack([loss_sum / window / env.world_size, skipped]), env.group)
                    metrics = {"loss": stats[0].item(), "skipped_images": stats[1].item(), **h,
                               "peak_mem_gib": peak_memory_gib(env.device),
                               **{k: v.item() for k, v in out.items() if k != "loss"}}
                    logger.log(step, epoch, metrics, global_batch)
                    summary = {"step": step, **metrics}
                    loss_sum.zero_()
                    window = 0
                if (log_now or step % STOP_POLL_STEPS == 0) and step < stop and stop_signal.agreed():
                    logger.message(f"massl: stop signal received; checkpointing at step {step} and exiting")
                    stop = step
                    summary["stopped_by_signal"] = True
                if step % cfg.run.checkpoint_every == 0 or step == stop:  # always at the last step
                    save_checkpoint()
                if step >= stop:
                    break
    finally:
        stop_signal.uninstall()
        logger.close()
        data.close()
    summary["final_step"] = step
    if env.is_main:
        with open(os.path.join(cfg.run.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary
