"""The `deepspeed` engine: the student through `deepspeed.initialize` with ZeRO stage 1, 2 or 3.

- Optimiser: massl's own (AdamW, SGD or LARS) with its parameter groups, handed to DeepSpeed as a
  client optimizer; lr and weight decay are written into its groups every step, identified by
  massl's `apply_wd` key (DeepSpeed's groups hold flat partitions, not the parameters).
- Precision: fp32, or DeepSpeed's bf16 / fp16 modes (low-precision module weights, fp32 master in
  the optimizer, fp16 with DeepSpeed's dynamic loss scaling; bf16 gradients averaged and held
  in fp32 at every ZeRO stage, so the clipping reads fp32). Inputs are cast to the weights'
  dtype, as FSDP2's policy does; no autocast on top. A step DeepSpeed skips (fp16 overflow, or a
  non-finite bf16 gradient) is counted (`skipped_steps`) and moves neither teacher nor memory.
- Clipping: between backward and step, on the averaged gradients' local fragments: one
  all-reduce of the per-parameter squared norms, then per-parameter or global scaling in place
  (massl.optim.clip_grads_); DeepSpeed's own `gradient_clipping` is 0 and asserted so.
- Teacher: partitioned like the fp32 master (partitions.py), EMA local and exact.
- Checkpoints: DeepSpeed's save/load of the student and optimiser, the teacher as a whole fp32
  safetensors file (checkpoint.py).
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
from typing import Any, Optional, cast

import torch
import torch.nn as nn

from ...config import Config, ConfigError
from ...dist import DistEnv, process_group
from ...optim import build_optimizer, clip_grads_, param_groups, set_hparams
from ..base import DTYPES, Engine, resolve_precision
from ..wrapping import wrap_models
from . import checkpoint, ds_config, zero_init
from .partitions import Stage3, Stage12, share_fp32_masters_, step_on_gradient_buffer_

DEEPSPEED_VERSION = "0.19.8"  # the version whose ZeRO internals partitions.py reads (requirements.txt)


def import_deepspeed(device: torch.device):
    """DeepSpeed, on the accelerator of this run's device (it would pick CUDA whenever it sees one)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    try:
        import deepspeed
    except ImportError:
        raise ConfigError(f"engine.name: deepspeed is not installed; pip install deepspeed=={DEEPSPEED_VERSION} "
                          "--no-build-isolation (after torch), or pip install -e .[deepspeed]") from None
    if deepspeed.__version__ != DEEPSPEED_VERSION:
        raise ConfigError(f"engine.name: massl's deepspeed engine reads ZeRO's partitions as DeepSpeed "
                          f"{DEEPSPEED_VERSION} lays them out, found {deepspeed.__version__}; "
                          f"pip install deepspeed=={DEEPSPEED_VERSION} --no-build-isolation")
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != device.type:
        raise ConfigError(f"run.device: DeepSpeed runs on {get_accelerator().device_name()} (DS_ACCELERATOR="
                          f"{os.environ.get('DS_ACCELERATOR')}) but this run's device is {device.type}")
    deepspeed.utils.logger.setLevel(logging.WARNING)  # its INFO lines repeat the config at every start
    return deepspeed


def init_deepspeed_comm(deepspeed, device: torch.device) -> None:
    """DeepSpeed's communication layer over our process group. On the CPU DeepSpeed would also
    JIT-build (about a minute, once per torch extensions folder) and, with LOCAL_SIZE set (the
    deepspeed launcher sets it), start a shared-memory all-reduce for inference, whose start-up hung
    on the machines we test on; massl never uses it, so it is neither built nor started."""
    cpu = device.type == "cpu"
    local_size = os.environ.pop("LOCAL_SIZE", None) if cpu else None
    # (deepspeed.comm.torch is also torch itself); Any: its attributes are patched below
    ds_torch_comm: Any = importlib.import_module("deepspeed.comm.torch")

    build_shm_op = ds_torch_comm.build_shm_op
    if cpu:
        ds_torch_comm.build_shm_op = lambda: None
    try:
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    finally:
        ds_torch_comm.build_shm_op = build_shm_op
        if local_size is not None:
            os.environ["LOCAL_SIZE"] = local_size


class CastInputs:
    """`model(crops)` with the crops cast to the model's compute dtype (DeepSpeed's bf16/fp16 modes
    cast the weights only); attributes pass through to the model."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.model, self.dtype = model, dtype

    def __call__(self, crops: list[torch.Tensor]) -> torch.Tensor:
        return self.model([c.to(self.dtype) for c in crops])

    def __getattr__(self, name: str):
        return getattr(self.model, name)


class _CastInputModule(nn.Module):
    """A module whose float input is cast to its weights' dtype and whose output is float32 (the
    teacher's backbone in bf16/fp16 modes, for the periodic k-NN)."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.dtype)).float()


def _names_without_checkpoint_wrapper(ds) -> None:
    """DeepSpeed names parameters (in its checkpoints' shapes and fragment maps, and in the folders of
    a universal checkpoint) by `named_parameters()`, which carries the activation-checkpointing
    wrapper's prefix: strip it, as the state dicts do, so a checkpoint converts and loads whatever
    engine.activation_checkpointing was when it was written."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

    for names in {id(ds.param_names): ds.param_names, id(ds.optimizer.param_names): ds.optimizer.param_names}.values():
        for p, name in names.items():
            names[p] = name.replace(_CHECKPOINT_PREFIX, "")
    if hasattr(ds.optimizer, "_param_slice_mappings"):  # ZeRO-1/2: the fragment map saved with the optimiser
        ds.optimizer._param_slice_mappings = ds.optimizer._create_param_mapping()


@contextlib.contextmanager
def _zero_optimizer_for_fp32_grads(active: bool):
    """DeepSpeed 0.19.8 hands ZeRO-1 with bf16 weights and fp32 gradients to its BF16_Optimizer,
    whose flat buffers, fragment maps and checkpoints differ from ZeRO-1's (and which refuses
    compute_grad_norm=false). Its ZeRO-1/2 optimizer holds fp32 gradient partitions itself (the
    path ZeRO-2 takes), so while `active` the choice of wrapper is made as if the gradients were
    bf16: ZeRO-1 keeps DeepSpeed's ZeRO optimizer, built with fp32 gradients. The test of bf16
    clipping against float64 checks that the gradients it ends with are fp32 and exact."""
    if not active:
        yield
        return
    from deepspeed.runtime.engine import DeepSpeedEngine as _DS

    choose = _DS._do_optimizer_sanity_check

    def choose_as_bf16(ds, basic_optimizer):
        model_dtype, _ = ds.get_data_types()
        ds.get_data_types = lambda: (model_dtype, model_dtype)  # seen by the wrapper's choice only
        try:
            return choose(ds, basic_optimizer)
        finally:
            del ds.get_data_types

    _DS._do_optimizer_sanity_check = choose_as_bf16
    try:
        yield
    finally:
        _DS._do_optimizer_sanity_check = choose


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    checkpoint_format = checkpoint.FORMAT

    def __init__(self, cfg: Config, env: DistEnv, student: nn.Module, teacher: nn.Module):
        self.cfg, self.env = cfg, env
        self.stage = cfg.engine.zero_stage
        self.precision = resolve_precision(cfg.run.precision, env.device)
        self.dtype = DTYPES[self.precision]
        self.group = process_group(env)
        deepspeed = import_deepspeed(env.device)
        process_group(env)  # one plain process (no launcher): its one-rank group, else DeepSpeed looks for MPI
        for name, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank)):
            os.environ.setdefault(name, str(value))  # DeepSpeed asserts on them, also in one plain process
        init_deepspeed_comm(deepspeed, env.device)
        self.config = ds_config.student_config(cfg, self.precision)
        self.deepspeed = deepspeed
        self.student_module, self.teacher_module = wrap_models(
            student.to(env.device), teacher.to(env.device), cfg.engine, env.group, self._initialize)
        self.student = CastInputs(self.ds, self.dtype)
        self.teacher = CastInputs(self.teacher_ds if self.stage == 3 else self.teacher_module, self.dtype)
        self.wd_flags = [g.get("apply_wd", True) for g in self.ds.optimizer.param_groups]
        self._check_settings()

    @classmethod
    def check_config(cls, cfg: Config, env: DistEnv) -> None:
        """The user's DeepSpeed file, before any data or model is built (one ConfigError naming the key)."""
        ds_config.check_user_file(cfg, env.world_size, resolve_precision(cfg.run.precision, env.device))

    @classmethod
    def model_init(cls, cfg: Config, env: DistEnv):
        """ZeRO-3: student and teacher partitioned at construction (zero_init.py), so no rank holds a
        whole model."""
        if cfg.engine.zero_stage != 3:
            return contextlib.nullcontext()
        deepspeed = import_deepspeed(env.device)
        process_group(env)  # one plain process (no launcher): its one-rank group, else DeepSpeed looks for MPI
        for name, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank)):
            os.environ.setdefault(name, str(value))
        init_deepspeed_comm(deepspeed, env.device)
        return zero_init.partitioned_build(deepspeed, ds_config.student_config(cfg, resolve_precision(
            cfg.run.precision, env.device)))

    def _initialize(self, student: nn.Module, teacher: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The parallel wrapper (wrapping.py's last step): DeepSpeed engines and the teacher's layout."""
        optimizer = build_optimizer(self.cfg.optim, param_groups(student))  # AdamW fused, as the other engines
        if self.dtype != torch.float32:  # DeepSpeed casts the weights only; BatchNorm needs its statistics alike
            for model in (student, teacher):
                for b in model.buffers():
                    if b.is_floating_point():
                        b.data = b.data.to(self.dtype)
        names = [n for n, _ in teacher.named_parameters()]
        prepartitioned = zero_init.prepartitioned(teacher)  # built in model_init's context
        initial: Optional[list[torch.Tensor]]  # ZeRO-3's teacher values (the EMA's start)
        if prepartitioned:  # the teacher's fp32 pieces (the EMA's start), then the weights in the compute dtype
            # (in fp32 the pieces stay as they are: no copy of the teacher's partition)
            zero_params: list[Any] = list(teacher.parameters())  # ZeRO-3 parameters (ds_tensor: this rank's piece)
            initial = [t.ds_tensor.detach() if self.dtype == torch.float32 else t.ds_tensor.detach().float().clone()
                       for t in zero_params]
            for model in (student, teacher):
                zero_init.cast_partitions_(model, self.dtype)
        else:
            initial = [t.detach().to("cpu", copy=True) for t in teacher.parameters()] if self.stage == 3 else None
        with _zero_optimizer_for_fp32_grads(self.stage == 1 and self.precision == "bf16"):
            self.ds, *_ = self.deepspeed.initialize(model=student, optimizer=optimizer, config=self.config,
                                                     dist_init_required=False)
        _names_without_checkpoint_wrapper(self.ds)
        if self.stage == 3:
            self.teacher_ds, *_ = self.deepspeed.initialize(model=teacher, config=ds_config.teacher_config(self.config),
                                                             dist_init_required=False)
            share_fp32_masters_(self.ds.optimizer)
            step_on_gradient_buffer_(self.ds.optimizer)
            assert initial is not None  # set above for ZeRO-3
            pairs = list(zip(student.parameters(), teacher.parameters(), names, initial))
            self.partitions: Stage3 | Stage12 = Stage3(self.ds.optimizer, pairs, teacher, prepartitioned)
        else:
            self.partitions = Stage12(self.ds.optimizer, student, teacher, self.dtype)
        return student, teacher

    def _check_settings(self) -> None:
        """What the exact clipping and EMA rely on, checked on the engine DeepSpeed built (0.19.3 changed
        the defaults of gradient clipping and of the bf16 overflow check)."""
        ds, opt = self.ds, self.ds.optimizer
        ds_config.check_built(ds._config)  # what DeepSpeed made of the user's file (aliases included)
        if self.stage == 3:
            ds_config.check_built(self.teacher_ds._config, "the teacher's DeepSpeed config")
        checks = [
            (ds.gradient_clipping() == 0.0 and getattr(opt, "clip_grad", 0.0) == 0.0, "DeepSpeed's gradient_clipping is 0"),
            (ds.zero_optimization_stage() == self.stage, f"ZeRO stage {self.stage}"),
            (ds.gradient_accumulation_steps() == 1, "no gradient accumulation"),
            (ds.bfloat16_enabled() == (self.precision == "bf16") and ds.fp16_enabled() == (self.precision == "fp16"),
             f"precision {self.precision}"),
            (self.precision != "bf16" or ds._config.bfloat16_config.check_grad_overflow, "bf16 overflow check on"),
            (self.precision != "bf16" or getattr(opt, "gradient_accumulation_dtype", None) == torch.float32,
             "bf16 gradients averaged and held in fp32 by its ZeRO optimizer"),
            (next(self.student_module.parameters()).dtype == self.dtype, f"student weights in {self.dtype}"),
        ]
        for ok, what in checks:
            if not ok:
                raise RuntimeError(f"deepspeed: massl expects {what}; DeepSpeed {self.deepspeed.__version__} "
                                   "set it otherwise")

    # -- the interface -------------------------------------------------------------------------
    def autocast(self):
        return contextlib.nullcontext()  # the weights are in the compute dtype (CastInputs)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # averages the gradients over the ranks (and applies fp16's loss scale)

    def step(self, lr: float, wd: float) -> dict:
        set_hparams(self.ds.optimizer, lr, wd)
        o = self.cfg.optim
        scale = float(self.ds.optimizer.loss_scale) if self.precision == "fp16" else 1.0
        norm = clip_grads_(self.partitions.grad_fragments(), o.clip_grad, o.clip_mode, self.group, grad_scale=scale)
        self.ds.step()
        # DeepSpeed skips a step in every precision: fp16 overflow, a non-finite bf16 gradient, and a
        # non-finite gradient norm under ZeRO-3 (also fp32)
        return {"grad_norm": norm, "skipped_steps": torch.tensor(float(self.ds.skipped_steps))}

    def step_applied(self) -> bool:
        return self.ds.was_step_applied()

    def update_teacher(self, teacher_momentum: float) -> None:
        self.partitions.ema_(teacher_momentum)

    def teacher_state_dict(self) -> dict:
        return self.partitions.full_state_dict()  # collective: the fp32 teacher from the EMA accumulators

    @contextlib.contextmanager
    def teacher_backbone(self):
        # ZeRO-3: the teacher's backbone parameters gathered for the duration (read only); 1/2: whole
        backbone = self.teacher_module.backbone
        gathered = (self.deepspeed.zero.GatheredParameters(list(backbone.parameters())) if self.stage == 3
                    else contextlib.nullcontext())
        with gathered:
            yield _CastInputModule(backbone, self.dtype)
        if self.stage == 3:
            cast(Stage3, self.partitions).regather_persistent()  # the gathered context released the persistent ones too

    def save(self, directory: str) -> None:
        checkpoint.save(self, directory)

    def load(self, directory: str) -> None:
        checkpoint.load(self, directory)
        for group, flag in zip(self.ds.optimizer.param_groups, self.wd_flags):
            group["apply_wd"] = flag  # a universal checkpoint's groups all carry the first group's keys
        if self.stage == 3:
            cast(Stage3, self.partitions).refresh()
