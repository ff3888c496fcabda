"""The training loop: the same for every engine and data source (docs/architecture.md).

`train` builds the run's components (`build_run`), resumes them, then runs the loop; one step is
`train_step`. Logging and checkpoints are the named helpers below the loop (just over 300 lines:
the run lock, data timeouts and stop signals are handled here, where the loop can act on them).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any
from dataclasses import dataclass

import torch

from .checkpoint import CheckpointManager, read_checkpoint_manifest
from .checkpoint.resume import check_config, checkpoint_to_resume, deepspeed_options, start_history
from .checkpoint.teacher import TEACHER_PART, TeacherFile
from .config import Config, ConfigError, validate
from .data import DataSource, build_data
from .data.watch import DataTimeoutError, timeout_message
from .dist import DistEnv, all_reduce_, barrier, describe_hosts, init_distributed, rank_hosts
from .engines import Engine, build_engine_from, engine_class
from .errors import UserError
from .eval.periodic import PeriodicKNN
from .fileio import write_text_atomic
from .flops import peak_flops, step_flops_per_image
from .logging import MetricsLogger, log, peak_memory_gib, setup_logging
from .init_weights import initial_student_teacher
from .objective import MaSSLObjective
from .runlock import acquire_run_lock, release_run_lock
from .schedules import Hyper, Schedules
from .signals import StopOnSignal
from .trainer_state import TrainerState

STOP_POLL_STEPS = 10  # steps between checks for a stop signal (each is a tiny all-reduce)


class NonFiniteLossError(RuntimeError):
    pass


def train_step(engine: Engine, objective: MaSSLObjective, crops: list[torch.Tensor], step: int, hyper: Hyper,
               monitor: bool = False) -> dict[str, torch.Tensor]:
    """One MaSSL step (method.md steps 1-9): student on all crops, teacher on the global ones, the
    objective against the memory *before* this step's update, backward, clip + optimiser +
    teacher EMA (the engine), then the enqueue of teacher view 1.
    Returns device scalars (no host sync): loss (with KoLeo; this rank's value), grad_norm and the
    engine's other step values, koleo at a KoLeo weight > 0, and with `monitor` the agreement."""
    with engine.autocast():
        zs = engine.student(crops)
        with torch.no_grad():
            zt = engine.teacher(crops[:2])
    terms = objective(zs, zt, step, hyper, monitor)
    engine.backward(terms.objective)
    out = engine.step(hyper.lr, hyper.wd)
    if engine.step_applied():  # a step skipped on overflow moves neither the teacher nor the memory
        engine.update_teacher(hyper.teacher_momentum)
        objective.remember(zt[1])
    return {**{k: v.detach() for k, v in out.items()}, **terms.metrics()}


@dataclass
class Run:
    """The components of a run, built once by `build_run`."""

    cfg: Config
    env: DistEnv
    data: DataSource
    engine: Engine
    objective: MaSSLObjective
    state: TrainerState
    sched: Schedules
    ckpt: CheckpointManager
    global_batch: int
    stop_step: int  # run.max_steps, or the end of the schedules

    @property
    def parts(self) -> dict:
        """What a checkpoint holds, each part saved and loaded by its owner."""
        return {"engine": self.engine, "memory": self.objective.memory, "trainer": self.state}


def build_step(cfg: Config, env: DistEnv) -> tuple[Engine, MaSSLObjective]:
    """What `train_step` needs, as a run builds it: the engine over a student and teacher
    initialised from run.seed (identical on every rank), and the objective with its memory."""
    torch.manual_seed(cfg.run.seed)
    engine = build_engine_from(cfg, env, initial_student_teacher)
    return engine, MaSSLObjective.from_config(cfg, env)


def build_run(cfg: Config, env: DistEnv) -> Run:
    data = build_data(cfg, env.rank, env.world_size, env.device.type)
    engine, objective = build_step(cfg, env)
    global_batch = cfg.data.batch_size * env.world_size
    sched = Schedules.from_config(cfg, data.iters_per_epoch, global_batch)
    stop = min(sched.total_iters, cfg.run.max_steps) if cfg.run.max_steps else sched.total_iters
    ckpt = CheckpointManager(cfg.run.output_dir, cfg.run.keep_last, env.is_main, env.group)
    return Run(cfg, env, data, engine, objective, TrainerState(env, cfg.run.seed), sched, ckpt, global_batch, stop)


def resume(run: Run) -> str | None:
    """Load the checkpoint that run.resume names (auto: the newest verified one) after checking
    that this run may continue it, and keep one history in the run directory (checkpoint/resume.py);
    returns the checkpoint's path."""
    directory = checkpoint_to_resume(run.cfg, run.ckpt)
    if directory is not None:
        manifest = read_checkpoint_manifest(directory)
        fmt, engine = manifest.get("format", "torch"), run.engine
        if fmt != engine.checkpoint_format:
            raise ConfigError(
                f"run.resume: checkpoint {directory} was written by engine {manifest.get('engine', '?')!r} (format "
                f"{fmt!r}); engine.name={engine.name} reads format {engine.checkpoint_format!r}. Resume with the "
                f"engine that wrote it, or start fresh with run.resume=never or a new run.output_dir")
        check_config(directory, run.cfg, run.env.world_size)
    if run.env.is_main:
        start_history(run.cfg.run.output_dir, run.ckpt, directory)
    barrier(run.env.group)
    if directory is not None:
        run.ckpt.load(directory, run.parts)
    return directory


class StepWindow:
    """What the loop accumulates on the device (no host sync per step): the loss sum since the
    last log, the images skipped since the start (and those data.decode=device cut on the CPU
    instead), and the first step whose loss was not finite."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.skipped = torch.zeros((), device=device)
        self.fallback = torch.zeros((), device=device)
        self.steps = 0
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def add(self, step: int, out: dict, skipped: int, fallback: int = 0) -> None:
        self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(out["loss"]), step, self.bad_step)
        self.loss_sum += out["loss"]
        self.skipped += skipped
        self.fallback += fallback
        self.steps += 1

    def check_finite(self, run: Run) -> None:
        """Collective: raise if any rank saw a non-finite loss (before logging or checkpointing it)."""
        first = all_reduce_(self.bad_step.clone(), run.env.group, op=torch.distributed.ReduceOp.MAX).item()
        if first >= 0:
            raise NonFiniteLossError(
                f"the loss became non-finite at step {first}; the last complete checkpoint in {run.ckpt.root} "
                f"is intact. Lower optim.lr, raise optim.warmup_epochs, or use run.precision=fp32")

    def reduce(self, run: Run) -> dict:
        """Collective: the mean loss over the window and the ranks (ranks that see only their own
        batch have their own loss), the skipped and fallback images summed over the ranks; then
        start a new window."""
        world = run.env.world_size
        stats = all_reduce_(torch.stack([self.loss_sum / self.steps / world, self.skipped, self.fallback]),
                            run.env.group)
        self.loss_sum.zero_()
        self.steps = 0
        return {"loss": stats[0].item(), "skipped_images": int(stats[1].item()),  # counts: integers in the JSON
                "decode_fallback_images": int(stats[2].item())}


def log_metrics(run: Run, logger: MetricsLogger, window: StepWindow, step: int, hyper: Hyper,
                out: dict) -> dict:
    window.check_finite(run)
    metrics = {**window.reduce(run), **hyper.as_dict(), "peak_mem_gib": peak_memory_gib(run.env.device),
               **{k: v.item() for k, v in out.items() if k != "loss"}}
    logger.log(step, (step - 1) // run.data.iters_per_epoch, metrics, run.global_batch)
    return {"step": step, **metrics}


def save_checkpoint(run: Run, window: StepWindow, step: int) -> None:
    window.check_finite(run)  # never seal a checkpoint of a diverged run
    run.state.step = step
    parts = {**run.parts, TEACHER_PART: TeacherFile(run.engine, run.env.is_main)}  # the file the tools read
    start = time.perf_counter()
    path = run.ckpt.save(step, parts, meta={
        "format": run.engine.checkpoint_format, "engine": run.engine.name, "world_size": run.env.world_size,
        "epoch": step // run.data.iters_per_epoch, "config": run.cfg.to_dict(),
        **({"deepspeed_options": deepspeed_options(run.cfg.engine.deepspeed_config)}  # compared by content on resume
           if run.cfg.engine.deepspeed_config else {})})
    log.info(f"massl: checkpoint of step {step} written to {path} ({time.perf_counter() - start:.1f} s)")


def evaluate_knn(run: Run, knn: PeriodicKNN, logger: MetricsLogger, step: int) -> None:
    """Collective: the k-NN of the teacher after `step` (eval section of the config), logged."""
    start = time.perf_counter()
    with torch.no_grad(), run.engine.teacher_backbone() as backbone:
        metrics = knn(backbone, step)
    if metrics is None:  # no result (one warning said why): nothing logged, never a fake 0.0
        logger.t0 += time.perf_counter() - start  # nor counted in the training throughput
        return
    logger.log_eval(step, (step - 1) // run.data.iters_per_epoch, metrics, time.perf_counter() - start)


def model_flops(run: Run) -> tuple[float, float | None]:
    """FLOPs per image of one step and the peak FLOP/s of all the run's devices, for MFU (massl/flops.py)."""
    if not run.env.is_main:  # only the main rank logs metrics
        return 0.0, None
    cfg = run.cfg
    flops = step_flops_per_image(cfg)
    peak = peak_flops(run.env.device, cfg.run.peak_tflops)
    log.info(f"massl: {flops / 1e9:.4g} GFLOP per image and step (model FLOPs); " + (
        f"MFU against {peak / 1e12:.0f} TFLOP/s per device" if peak else
        "no MFU: the peak of this device is unknown (set run.peak_tflops)"))
    return flops, peak * run.env.world_size if peak else None


def prepare_process(cfg: Config, env: DistEnv) -> None:
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if env.device.type == "cpu":
        # Denormal floats (tiny probabilities, gradients) made CPU steps 3x slower as training went on.
        torch.set_flush_denormal(True)
    try:
        os.makedirs(cfg.run.output_dir, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file on the way (validate checks the path itself)
        raise ConfigError(f"run.output_dir: {cfg.run.output_dir!r} cannot be created: a part of it is a file; "
                          f"name a directory") from None


def lock_run_dir(cfg: Config, env: DistEnv) -> str:
    """The main rank locks the run directory for the run's life (massl/runlock.py); every rank
    learns whether it could (collective), so that a refused run ends on all ranks."""
    error = ""
    key = ""
    if env.is_main:
        try:
            key = acquire_run_lock(cfg.run.output_dir)
        except UserError as e:
            error = str(e)
    if env.world_size > 1:
        flag = all_reduce_(torch.tensor([1.0 if error else 0.0], device=env.device), env.group,
                           op=torch.distributed.ReduceOp.MAX)
        if flag.item() and not error:
            error = f"run.output_dir: {cfg.run.output_dir!r} is in use by another run (rank 0 says which)"
    if error:
        raise UserError(error)
    return key


def train(cfg: Config, env: DistEnv | None = None) -> dict:
    """Run (or resume) the training described by `cfg`. Returns a summary of the last step."""
    env = env or init_distributed(cfg.run.device)
    setup_logging(env.rank, cfg.run.log_all_ranks)
    validate(cfg, env.world_size, device_type=env.device.type)
    engine_class(cfg.engine.name).check_config(cfg, env)  # the engine's own settings (e.g. a ds_config file)
    prepare_process(cfg, env)
    lock = lock_run_dir(cfg, env)  # before anything in the directory changes (a resume's history moves)
    knn = PeriodicKNN(cfg, env)  # opens the evaluation inputs: a bad one fails before any work
    run = build_run(cfg, env)
    resumed_from = resume(run)
    if env.is_main:  # only once the run starts: a refused resume leaves the run's config.yaml alone
        write_text_atomic(os.path.join(cfg.run.output_dir, "config.yaml"), cfg.to_yaml())
    step, stop, ipe = run.state.step, run.stop_step, run.data.iters_per_epoch
    log.info(f"massl: engine {run.engine.name}, {env.world_size} rank(s) on {env.device.type}, precision "
             f"{run.engine.precision}, global batch {run.global_batch}, memory "
             f"{'sharded' if run.objective.sharded else 'replicated'} (memory.sharded={cfg.memory.sharded}), "
             f"{ipe} steps/epoch, steps {step} -> {stop}"
             + (f", resumed from {resumed_from}" if resumed_from else ""))
    if step >= stop:  # nothing to train: no new log or TensorBoard file
        log.info(f"massl: nothing to do: the run is at step {step}, run.max_steps={cfg.run.max_steps} stops at "
                 f"{stop}; raise run.max_steps (the schedules end at {run.sched.total_iters}) to continue")
        release_run_lock(lock)
        return {"step": step, "final_step": step}
    hosts = rank_hosts(env.group)  # where each rank runs, for the log and summary.json
    log.info(f"massl: ranks on {describe_hosts(hosts)}")
    logger = MetricsLogger(cfg.run.output_dir, env.is_main, cfg.run.tensorboard, stop, step,  # stop: run.max_steps too
                           *model_flops(run))
    window = StepWindow(env.device)
    summary: dict[str, Any] = {"step": step}
    stop_signal = StopOnSignal(env.device, env.group).install()
    try:
        while step < stop:
            epoch, start = divmod(step, ipe)
            for batch in stop_signal.waiting(run.data.epoch(epoch, start)):
                hyper = run.sched.at(step)
                log_now = (step + 1) % cfg.run.log_every == 0 or step + 1 == stop
                crops = run.data.prepare(batch, env.device)
                out = train_step(run.engine, run.objective, crops, step, hyper, monitor=log_now)
                window.add(step, out, batch.skipped, batch.fallback)
                step += 1
                if log_now:
                    summary = log_metrics(run, logger, window, step, hyper, out)
                if (log_now or step % STOP_POLL_STEPS == 0) and step < stop and stop_signal.agreed():
                    log.info(f"massl: stop signal received; checkpointing at step {step} and exiting")
                    stop = step
                    summary["stopped_by_signal"] = True
                if step % cfg.run.checkpoint_every == 0 or step == stop:  # always at the last step
                    save_checkpoint(run, window, step)
                if knn.due(step, ipe):
                    evaluate_knn(run, knn, logger, step)
                if step >= stop:
                    break
            if stop_signal.interrupted:  # a stop signal while waiting for data (one process)
                log.info(f"massl: stop signal received while waiting for data; checkpointing at step {step} and exiting")
                if step > run.state.step:  # steps since the last checkpoint (state.step: saved or resumed)
                    save_checkpoint(run, window, step)
                summary["stopped_by_signal"], stop = True, step
    except DataTimeoutError as e:  # raised in this process or re-raised from a loader worker
        raise UserError(f"{timeout_message(e)}; the last checkpoint in {run.ckpt.root} is intact") from None
    finally:
        stop_signal.uninstall()
        logger.close()
        run.data.close()
        release_run_lock(lock)
    summary["final_step"] = step
    log.info(f"massl: run {'stopped' if summary.get('stopped_by_signal') else 'finished'} at step {step}"
             f"{'' if summary.get('stopped_by_signal') else f' of {stop}'}; outputs in {cfg.run.output_dir}")
    summary["hosts"] = hosts
    if env.is_main:
        with open(os.path.join(cfg.run.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary
