"""FSDP checkpoints through torch.distributed.checkpoint (DCP), loadable at any world size.

One checkpoint directory holds DCP's files (`.metadata` and one `__<rank>_0.distcp` per rank)
with these entries, each stored once however many ranks hold it:

    student.<fqn>, teacher.<fqn>     parameters and buffers, sharded on dim 0 (DTensors)
    optimizer.state.<fqn>.<name>     optimiser state, sharded like the parameters
    optimizer.param_groups           hyper-parameters, keyed by parameter names
    memory.bank                      the global [D, K] ring, a DTensor sharded on dim 1 (memory.sharded)
                                     or one replicated tensor; either loads into either layout
    memory.ptr                       the ring pointer

and `trainer.pt` (main rank, torch.save): the loop's trainer state (step, every rank's RNG
state) and the fp16 loss scaler. DCP reshards on load: a run saved on W ranks resumes on W'.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, Shard

FORMAT = "dcp"
TRAINER_FILE = "trainer.pt"


def _memory_state(memory, mesh) -> dict:
    """The memory as the global [D, K] array: our slots as a DTensor shard, or the replica itself."""
    bank = memory.bank
    if memory.sharded:
        bank = DTensor.from_local(bank, mesh, [Shard(1)], run_check=False,
                                  shape=torch.Size((memory.dim, memory.size)), stride=(memory.size, 1))
    return {"bank": bank, "ptr": torch.tensor(memory.ptr, dtype=torch.long)}


def _check_memory_shape(directory: str, memory) -> None:
    meta = FileSystemReader(directory).read_metadata().state_dict_metadata.get("memory.bank")
    if meta is not None and tuple(meta.size) != (memory.dim, memory.size):
        raise ValueError(f"run.resume: checkpoint {directory} has a {tuple(meta.size)[0]} x {tuple(meta.size)[1]} "
                         f"memory, this run's is {memory.dim} x {memory.size} "
                         f"(model.head_bottleneck_dim x memory.size); use the checkpoint's values")


def save(engine, directory: str, memory, trainer_state: dict) -> None:
    """Collective: every rank writes its shards; the main rank also writes trainer.pt."""
    state = {
        "student": get_model_state_dict(engine.student),
        "teacher": get_model_state_dict(engine.teacher),
        "optimizer": get_optimizer_state_dict(engine.student, engine.optimizer),
        "memory": _memory_state(memory, engine.mesh),
    }
    dcp.save(state, checkpoint_id=directory, process_group=engine.group)
    if engine.env.is_main:
        extra = {"trainer": trainer_state, "scaler": engine.scaler.state_dict() if engine.scaler is not None else {}}
        torch.save(extra, os.path.join(directory, TRAINER_FILE))


def load(engine, directory: str, memory) -> dict:
    """Collective: restore models, optimiser and memory (resharded to this run); returns the trainer state."""
    _check_memory_shape(directory, memory)
    memory_state = _memory_state(memory, engine.mesh)
    state = {
        "student": get_model_state_dict(engine.student),
        "teacher": get_model_state_dict(engine.teacher),
        # on a fresh optimiser this first creates its (zero) state, so DCP has tensors to load into
        "optimizer": get_optimizer_state_dict(engine.student, engine.optimizer),
        "memory": memory_state,
    }
    dcp.load(state, checkpoint_id=directory, process_group=engine.group)
    set_model_state_dict(engine.student, state["student"])
    set_model_state_dict(engine.teacher, state["teacher"])
    set_optimizer_state_dict(engine.student, engine.optimizer, state["optimizer"])
    bank = memory_state["bank"]
    memory.bank.copy_(bank.to_local() if isinstance(bank, DTensor) else bank)
    memory.ptr = int(memory_state["ptr"])
    extra = torch.load(os.path.join(directory, TRAINER_FILE), map_location="cpu", weights_only=True)
    if engine.scaler is not None and extra["scaler"]:
        engine.scaler.load_state_dict(extra["scaler"])
    return extra["trainer"]


def read_teacher_state_dict(directory: str) -> dict:
    """The full teacher state dict on the CPU, without a process group (for massl-export)."""
    entries = FileSystemReader(directory).read_metadata().state_dict_metadata
    prefix = "teacher."
    template = {name[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype)
                for name, meta in entries.items()
                if name.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    if not template:
        raise ValueError(f"checkpoint {directory} holds no teacher weights")
    state = {"teacher": template}
    with warnings.catch_warnings():  # DCP warns that it loads in one process, which is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, storage_reader=FileSystemReader(directory), no_dist=True)
    return state["teacher"]
