"""The `fsdp` engine's checkpoint files, through torch.distributed.checkpoint (DCP), loadable at
any world size (format `dcp`).

One directory holds DCP's files (`.metadata` and one `__<rank>_0.distcp` per rank) with these
entries, each stored once however many ranks hold it:

    student.<fqn>, teacher.<fqn>     parameters and buffers, sharded on dim 0 (DTensors)
    optimizer.state.<fqn>.<name>     optimiser state, sharded like the parameters
    optimizer.param_groups           hyper-parameters, keyed by parameter names

and, with fp16, `scaler.pt` (the loss scaler, main rank). DCP reshards on load: a run saved on
W ranks resumes on W'. Loading reads only these entries, so the same code reads the engine
entries of a checkpoint written before the memory and trainer state moved to their own files.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

FORMAT = "dcp"
SCALER_FILE = "scaler.pt"


def _state(engine) -> dict:
    # on a fresh optimiser this first creates its (zero) state, so DCP has tensors to load into
    return {"student": get_model_state_dict(engine.student), "teacher": get_model_state_dict(engine.teacher),
            "optimizer": get_optimizer_state_dict(engine.student, engine.optimizer)}


def save(engine, directory: str) -> None:
    """Collective: every rank writes its shards."""
    dcp.save(_state(engine), checkpoint_id=directory, process_group=engine.group)
    if engine.scaler is not None and engine.env.is_main:
        torch.save(engine.scaler.state_dict(), os.path.join(directory, SCALER_FILE))


def load(engine, directory: str) -> None:
    """Collective: restore models and optimiser, resharded to this run."""
    state = _state(engine)
    dcp.load(state, checkpoint_id=directory, process_group=engine.group)
    set_model_state_dict(engine.student, state["student"])
    set_model_state_dict(engine.teacher, state["teacher"])
    set_optimizer_state_dict(engine.student, engine.optimizer, state["optimizer"])
    scaler = os.path.join(directory, SCALER_FILE)
    if engine.scaler is not None and os.path.isfile(scaler):
        engine.scaler.load_state_dict(torch.load(scaler, map_location="cpu", weights_only=True))


def read_full_tensors(directory: str, prefix: str) -> dict:
    """Every tensor entry `prefix<name>` of a DCP directory as a whole CPU tensor, read in this
    process alone (no process group; the tools and old checkpoints' memory)."""
    entries = FileSystemReader(directory).read_metadata().state_dict_metadata
    template = {name[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype)
                for name, meta in entries.items()
                if name.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    if not template:
        return {}
    state = {prefix.rstrip("."): template}
    with warnings.catch_warnings():  # DCP warns that it loads in one process, which is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, storage_reader=FileSystemReader(directory), no_dist=True)
    return state[prefix.rstrip(".")]


def read_teacher_state_dict(directory: str) -> dict:
    """The full teacher state dict on the CPU, without a process group."""
    teacher = read_full_tensors(directory, "teacher.")
    if not teacher:
        raise ValueError(f"checkpoint {directory} holds no teacher weights")
    return teacher
