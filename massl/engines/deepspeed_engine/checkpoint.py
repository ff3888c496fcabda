"""The `deepspeed` engine's part of a checkpoint (format `deepspeed`), and its teacher reader.

    <checkpoint>/engine/
        zero/                  DeepSpeed's save_checkpoint with the explicit tag `zero` and no
                               `latest` file: model states (module, buffers, step counters, loss
                               scaler) and each rank's optimiser partition
        zero_to_fp32.py        DeepSpeed's consolidation scripts (the student's fp32 weights:
                               `python zero_to_fp32.py <checkpoint>/engine OUT -t zero`)
        layout.json            world size, ZeRO stage, precision, DeepSpeed version

The teacher is not here: the checkpoint's `teacher/teacher.safetensors` (written for every engine
from `teacher_state_dict()`, gathered once, to the main rank) is the whole teacher in fp32, and
the resume reads it. Checkpoints of the earlier layout also hold `engine/teacher.safetensors` (the
same tensors); it is read when present.

The checkpoint manager makes the whole folder atomic: DeepSpeed writes into the temporary
checkpoint directory and the manifest seals it, so a partial save is never loaded; loading
names the tag, and a missing load path is an error (DeepSpeed only warns).

At another world size, the ZeRO files are converted once to DeepSpeed's universal format
(`deepspeed.checkpoint.ds_to_universal`, by the main rank, into `.tmp-universal-step_<N>` in
this run's checkpoints directory, removed afterwards or with the next save's stale `.tmp-*`) and loaded with `load_universal`;
the teacher file, the memory and the trainer state load at any world size as they are.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import torch

from ...config import ConfigError
from ...dist import all_reduce_, barrier
from ...fileio import write_json_atomic

FORMAT = "deepspeed"
TAG = "zero"
TEACHER_FILE = "teacher.safetensors"
# the checkpoint's teacher part, beside this engine folder (massl.checkpoint.teacher.TEACHER_PATH;
# not imported: the checkpoint package imports the engines)
CHECKPOINT_TEACHER = os.path.join(os.pardir, "teacher", TEACHER_FILE)
LAYOUT_FILE = "layout.json"


def teacher_file(directory: str) -> str:
    """The teacher file of a `deepspeed` engine directory: its own (earlier layout) or the checkpoint's."""
    own = os.path.join(directory, TEACHER_FILE)
    return own if os.path.isfile(own) else os.path.normpath(os.path.join(directory, CHECKPOINT_TEACHER))


def read_teacher_state_dict(directory: str) -> dict:
    """The full teacher state dict (fp32, CPU) of a `deepspeed` engine directory, without a process
    group and without DeepSpeed (safetensors: nothing is unpickled)."""
    from safetensors.torch import load_file

    return load_file(teacher_file(directory))


def save(engine, directory: str) -> None:
    """Collective. The teacher is the checkpoint's teacher part (not written here)."""
    engine.ds.save_checkpoint(directory, tag=TAG, client_state={}, save_latest=False)
    if engine.env.is_main:
        write_json_atomic(os.path.join(directory, LAYOUT_FILE), {
            "world_size": engine.env.world_size, "zero_stage": engine.stage, "precision": engine.precision,
            "tag": TAG, "deepspeed": engine.deepspeed.__version__})


def load(engine, directory: str) -> None:
    """Collective: student and optimiser through DeepSpeed (converted if the world size changed), then the teacher."""
    with open(os.path.join(directory, LAYOUT_FILE)) as f:
        layout = json.load(f)
    if layout["zero_stage"] != engine.stage:
        raise ConfigError(f"engine.zero_stage: checkpoint {directory} was written with ZeRO stage "
                          f"{layout['zero_stage']}; resume with engine.zero_stage={layout['zero_stage']}")
    universal = layout["world_size"] != engine.env.world_size
    if universal and engine.cfg.optim.name != "adamw":
        raise ConfigError(f"run.resume: checkpoint {directory} was written by {layout['world_size']} ranks; DeepSpeed "
                          f"converts ZeRO checkpoints for another world size with Adam's state only, and this run "
                          f"uses optim.name={engine.cfg.optim.name}. Resume it with {layout['world_size']} ranks, or "
                          f"train with optim.name=adamw")
    load_dir = _convert_to_universal(engine, directory) if universal else directory
    engine.ds._config.load_universal_checkpoint = universal
    try:
        path, _ = engine.ds.load_checkpoint(load_dir, tag=TAG, load_module_strict=True, load_optimizer_states=True,
                                            load_lr_scheduler_states=False)
    finally:
        engine.ds._config.load_universal_checkpoint = False
    if path is None:
        raise RuntimeError(f"deepspeed: no checkpoint with tag {TAG!r} under {load_dir}")
    own_step_counters_(engine.ds.optimizer.optimizer)
    from safetensors.torch import load_file

    engine.partitions.load_full_state_dict(load_file(teacher_file(directory)))  # CPU; moved tensor by tensor
    if universal:
        barrier(engine.group)
        if engine.env.is_main:
            shutil.rmtree(load_dir, ignore_errors=True)


def own_step_counters_(optimizer: torch.optim.Optimizer) -> None:
    """Give each flat group's optimiser state a `step` counter of its own, where the optimiser keeps
    it. DeepSpeed 0.19.8's stage-3 universal loader gives every group one shared CPU tensor (a fused
    AdamW then advances it once per group and step: wrong from the second step after the resume on),
    and both universal loaders leave it on the CPU, where a fused or capturable optimiser on an
    accelerator cannot use it."""
    on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    for param, state in optimizer.state.items():
        if "step" in state:
            device = param.device if on_device else torch.device("cpu")
            state["step"] = torch.as_tensor(state["step"]).to(device=device, dtype=torch.float32, copy=True)


def _convert_to_universal(engine, directory: str) -> str:
    """Collective: the main rank converts the ZeRO files for another world size; returns the folder."""
    name = os.path.basename(os.path.dirname(os.path.abspath(directory)))  # step_<N>
    out = os.path.join(engine.cfg.run.output_dir, "checkpoints", ".tmp-universal-" + name)
    ok = torch.ones(1, device=engine.env.device)
    if engine.env.is_main:
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               os.path.join(directory, TAG), "--output_folder", os.path.join(out, TAG), "--inject_missing_state"]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            print(f"deepspeed: {' '.join(cmd)} failed:\n{done.stdout[-4000:]}", file=sys.stderr)
            ok.zero_()
    all_reduce_(ok, engine.group, op=torch.distributed.ReduceOp.MIN)
    if not bool(ok.item()):
        raise RuntimeError(f"deepspeed: converting {directory} to a universal checkpoint for "
                           f"{engine.env.world_size} ranks failed (the main rank printed why)")
    return out
