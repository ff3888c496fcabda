"""The ZeRO partitions massl works on, and the teacher laid out like them.

DeepSpeed keeps each rank's share of the fp32 master weights in flat buffers: under ZeRO-1/2 one
flat partition per parameter group, a contiguous 1/W of the group's concatenated parameters
(a parameter may straddle two ranks); under ZeRO-3 each parameter is split on its own into W
padded pieces of `ds_tensor` size, concatenated per sub-group. Between `backward` and `step` the
averaged gradients sit in the same layout. Everything here reads those buffers through
DeepSpeed's own mapping objects (`_hp_mapping` for ZeRO-1/2, the stage-3 optimizer's
`grad_position`, `fp16_groups` and `averaged_gradients`); they are internal, so the engine pins
the DeepSpeed version and the tests compare every result with a run of another engine.

The teacher is partitioned exactly like the master: rank r keeps the fp32 EMA accumulator of the
elements whose master it holds, so `teacher = m * teacher + (1 - m) * master` is one local
foreach kernel with no communication and no rounding of the master (exact in bf16 and fp16).
Its compute copy is what DeepSpeed would run: ZeRO-1/2 keep a full teacher in the compute dtype,
its flat buffers laid out like the student's and all-gathered after each EMA (as DeepSpeed does
for the student after its step); ZeRO-3 has a teacher engine of its own (no optimiser) whose
`ds_tensor` partitions receive the accumulator, and gathers them in the teacher's forward; its
small persistent parameters stay gathered, refreshed after each EMA in one coalesced all-gather.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ...dist import all_gather_into_


def _offset_in(flat: torch.Tensor, p: torch.Tensor) -> int:
    """Where `p` (a view into `flat`, as DeepSpeed lays out ZeRO-1/2 parameters) starts in `flat`."""
    offset = (p.data_ptr() - flat.data_ptr()) // p.element_size()
    if not 0 <= offset <= flat.numel() - p.numel():
        raise RuntimeError("deepspeed: a ZeRO-1/2 parameter is not a view into its group's flat buffer")
    return offset


class Stage12:
    """ZeRO-1/2: gradient fragments, master partitions, and a full teacher gathered after its EMA."""

    def __init__(self, optimizer, student: nn.Module, teacher: nn.Module, dtype: torch.dtype):
        self.opt, self.teacher = optimizer, teacher
        teacher_of = dict(zip(student.parameters(), teacher.parameters()))
        self.names = {p: n for n, p in teacher.named_parameters()}
        self.params = [p for group in optimizer.bit16_groups for p in group]
        if len(self.params) != len(teacher_of):
            raise RuntimeError("deepspeed: every student parameter must be trained (ZeRO groups miss some)")
        self.groups, self.slots = [], []  # per group: (flat, own partition, accumulator); per parameter: (group, offset, teacher param)
        for i, (lp_flat, lp_params) in enumerate(zip(optimizer.bit16_groups_flat, optimizer.bit16_groups)):
            pg = optimizer.real_dp_process_group[i]
            rank, world = dist.get_rank(pg), dist.get_world_size(pg)
            full32 = torch.zeros(lp_flat.numel(), dtype=torch.float32, device=lp_flat.device)
            for sp in lp_params:
                tp, offset = teacher_of[sp], _offset_in(lp_flat, sp)
                full32[offset:offset + sp.numel()].copy_(tp.detach().reshape(-1))
                self.slots.append((i, offset, tp))
            size = lp_flat.numel() // world
            flat = full32 if dtype == torch.float32 else full32.to(dtype)
            own = flat.narrow(0, rank * size, size)
            # an fp32 compute copy's own partition is the accumulator itself
            acc = own if dtype == torch.float32 else full32.narrow(0, rank * size, size).clone()
            self.groups.append((flat, own, acc, pg))
        for i, offset, tp in self.slots:
            tp.data = self.groups[i][0][offset:offset + tp.numel()].view(tp.shape)

    def grad_fragments(self) -> list[torch.Tensor]:
        """This rank's part of each parameter's averaged gradient (empty where it holds none); writing
        into them changes what the optimiser step will see. Valid between backward and step."""
        # in the gradients' dtype (fp32 in bf16 runs): clip_grads_ casts a global scale to the first one's
        dtype = getattr(self.opt, "gradient_accumulation_dtype", None) or self.params[0].dtype
        empty = torch.empty(0, device=self.params[0].device, dtype=dtype)
        return [p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group) if p._hp_mapping is not None else empty
                for p in self.params]

    def masters(self) -> list[torch.Tensor]:
        return list(self.opt.single_partition_of_fp32_groups)

    @torch.no_grad()
    def ema_(self, momentum: float) -> None:
        flats, owns, accs, groups = zip(*self.groups)
        torch._foreach_lerp_(list(accs), self.masters(), 1.0 - momentum)
        if accs[0] is not owns[0]:
            torch._foreach_copy_(list(owns), list(accs))
        for flat, own, pg in zip(flats, owns, groups):
            all_gather_into_(flat, own, pg)

    def full_state_dict(self) -> dict:
        """Collective: the teacher's parameters in fp32 (from the accumulators) and its buffers, on the
        CPU of the main rank (other ranks: {}), gathered one tensor at a time."""
        pieces = []
        for i, offset, tp in self.slots:
            flat, own, acc, pg = self.groups[i]
            start = dist.get_rank(pg) * acc.numel()  # this rank's elements of the flat group: [start, start + len)
            lo, hi = max(offset, start), min(offset + tp.numel(), start + acc.numel())
            pieces.append((self.names[tp], tp.shape, lo - offset, acc[lo - start:hi - start] if lo < hi else acc[:0], pg))
        return _assemble_on_main(pieces, self.teacher)

    @torch.no_grad()
    def load_full_state_dict(self, state: dict) -> None:
        fulls = [torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device) for flat, *_ in self.groups]
        for i, o, tp in self.slots:
            fulls[i][o:o + tp.numel()].copy_(state[self.names[tp]].reshape(-1))
        for full, (flat, own, acc, pg) in zip(fulls, self.groups):
            rank = dist.get_rank(pg)
            acc.copy_(full.narrow(0, rank * own.numel(), own.numel()))
            flat.copy_(full)
        _load_buffers(self.teacher, state)


@torch.no_grad()
def share_fp32_masters_(optimizer) -> None:
    """ZeRO-3 in fp32: the master partitions made the weights' own flat buffers again. DeepSpeed 0.19.8 means to skip the master copy when the weights are already fp32 on
    the optimiser's device, but compares `tensor.device == "cpu"` (or `"cuda:0"`), which torch 2.14
    answers False, so it clones them: a third fp32 copy of the student's partition per rank. The
    optimiser keeps its tensors (their state and groups are keyed on them); only their storage is
    the weights', which DeepSpeed copies the updated masters into after each step anyway."""
    for master, weights in zip(optimizer.fp32_partitioned_groups_flat, optimizer.fp16_partitioned_groups_flat):
        if (master.data_ptr() != weights.data_ptr() and master.dtype == weights.dtype
                and master.device == weights.device and master.shape == weights.shape
                and torch.equal(master, weights)):
            master.data = weights.data


def _adjacent_span(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The one flat tensor `tensors` are consecutive pieces of (a view of their storage), or None."""
    first = tensors[0]
    storage, offset = first.untyped_storage(), first.storage_offset()
    end = offset
    for t in tensors:
        if (not t.is_contiguous() or t.dtype != first.dtype or t.untyped_storage().data_ptr() != storage.data_ptr()
                or t.storage_offset() != end):
            return None
        end += t.numel()
    return first.new_empty(0).set_(storage, offset, (end - offset,), (1,))  # contiguous, as the default stride


def step_on_gradient_buffer_(optimizer) -> None:
    """ZeRO-3: the optimiser step reads each sub-group's gradients where they are. DeepSpeed 0.19.8
    flattens them (`torch.cat`) into a new tensor at every step although they are already consecutive
    pieces of its one gradient buffer: a transient copy of this rank's whole gradient partition at the
    step (the peak of a step, once the gathered weights are released). Only the flattening of
    `averaged_gradients` is changed, and only where the pieces are adjacent; the values are the
    same, and the buffer is overwritten by the next backward."""
    flatten = optimizer.flatten

    def flatten_in_place(tensors):
        groups = optimizer.averaged_gradients  # sub-group id -> its gradient pieces (a dict in 0.19.8)
        if tensors and any(tensors is grads for grads in (groups.values() if isinstance(groups, dict) else groups)):
            span = _adjacent_span(list(tensors))
            if span is not None:
                return span
        return flatten(tensors)

    optimizer.flatten = flatten_in_place


class Stage3:
    """ZeRO-3: gradient and master pieces per parameter; the teacher engine's partitions follow the master."""

    # the parameters as Any: ZeRO-3's attributes (ds_tensor, ds_shape, ...) are not in torch's types
    def __init__(self, optimizer, pairs: list[tuple[Any, Any, str, torch.Tensor]],
                 teacher: nn.Module, pieces: bool = False):
        """`pairs`: (student parameter, teacher parameter, teacher name, the teacher's initial fp32
        values on the CPU), both parameters already partitioned by their engines; with `pieces`
        (a teacher partitioned at construction) the initial values are this rank's fp32 pieces."""
        self.opt, self.teacher = optimizer, teacher
        index = {p: (sg, j) for sg, group in enumerate(optimizer.fp16_groups) for j, p in enumerate(group)}
        if len(index) != len(pairs):
            raise RuntimeError("deepspeed: every student parameter must be trained (ZeRO-3 groups miss some)")
        self.positions = [index[sp] for sp, *_ in pairs]
        self.student = [sp for sp, *_ in pairs]
        self.names = [name for *_, name, _ in pairs]
        self.shapes = [tp.ds_shape for _, tp, *_ in pairs]
        self.ds_tensors = [tp.ds_tensor for _, tp, *_ in pairs]
        self.group = self.student[0].ds_process_group
        rank = dist.get_rank(self.group)
        accs = []
        for (sp, tp, name, init), ds in zip(pairs, self.ds_tensors):
            if ds.numel() != sp.ds_tensor.numel():
                raise RuntimeError(f"deepspeed: teacher {name} is partitioned unlike the student")
            piece = (init if pieces else self._piece(init, rank, ds.numel())).to(ds.device)
            if not torch.equal(ds, piece.to(ds.dtype)):  # ZeRO-3's layout is the one assumed here
                raise RuntimeError(f"deepspeed: teacher {name}'s partition is not elements [r*n, (r+1)*n) of it")
            accs.append(ds if ds.dtype == torch.float32 else piece.clone())
        self.accs = accs
        # ZeRO-3 keeps a parameter under stage3_param_persistence_threshold (biases, norms, small
        # tokens) gathered after its first use: the EMA, which writes the partitions, refreshes them
        self.persistent = [tp for _, tp, *_ in pairs if getattr(tp, "ds_persist", False)]
        self.refresh()

    @staticmethod
    def _piece(full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        flat = full.reshape(-1).float()
        piece = torch.zeros(size, dtype=torch.float32, device=flat.device)
        chunk = flat[rank * size:(rank + 1) * size]
        piece[:chunk.numel()].copy_(chunk)
        return piece

    def refresh(self) -> None:
        """Views of the master pieces (again after a checkpoint load, which may replace DeepSpeed's buffers)."""
        self._masters = []
        for sp in self.student:
            sg, offset, numel = self.opt.grad_position[self.opt.get_param_id(sp)]
            self._masters.append(self.opt.fp32_partitioned_groups_flat[sg].narrow(0, offset, numel))

    def grad_fragments(self) -> list[torch.Tensor]:
        return [self.opt.averaged_gradients[sg][j] for sg, j in self.positions]

    def masters(self) -> list[torch.Tensor]:
        return self._masters

    @torch.no_grad()
    def ema_(self, momentum: float) -> None:
        torch._foreach_lerp_(self.accs, self._masters, 1.0 - momentum)
        if self.accs[0] is not self.ds_tensors[0]:
            torch._foreach_copy_(self.ds_tensors, self.accs)
        self.regather_persistent()

    def regather_persistent(self) -> None:
        """Collective: the persistent parameters' whole copies made again from the partitions just
        written, in one coalesced all-gather (the stale copies released first, without communication)."""
        if not self.persistent:
            return
        stale = [p for p in self.persistent if p.ds_status.name == "AVAILABLE"]
        if stale:
            stale[0].partition(param_list=stale, has_been_updated=False)
        self.persistent[0].all_gather_coalesced(self.persistent).wait()

    def full_state_dict(self) -> dict:
        """Collective: the whole fp32 teacher on the CPU of the main rank (other ranks: {}), gathered
        one tensor at a time (ZeRO-3 keeps the persistent small parameters whole: their pieces too)."""
        rank = dist.get_rank(self.group)
        pieces = []
        for name, shape, acc in zip(self.names, self.shapes, self.accs):
            start = rank * acc.numel()
            length = max(0, min(acc.numel(), shape.numel() - start))  # the last pieces are padded
            pieces.append((name, shape, start, acc[:length], self.group))
        return _assemble_on_main(pieces, self.teacher)

    @torch.no_grad()
    def load_full_state_dict(self, state: dict) -> None:
        rank = dist.get_rank(self.group)
        for name, acc, ds in zip(self.names, self.accs, self.ds_tensors):
            acc.copy_(self._piece(state[name].to(acc.device), rank, acc.numel()))
            if acc is not ds:
                ds.copy_(acc)
        self.regather_persistent()
        _load_buffers(self.teacher, state)


def _assemble_on_main(pieces: list, teacher: nn.Module) -> dict:
    """Collective: each (name, shape, start, this rank's elements from `start` on, group) reassembled
    into a whole fp32 tensor on the main rank's CPU, one tensor at a time: each rank lays its
    elements into a zero tensor of the parameter's size and the main rank receives their sum (a
    reduce: exact, every element comes from one rank), so no rank holds more than one parameter
    beyond its partitions on the device."""
    main = dist.get_rank() == 0
    state = {}
    for name, shape, start, mine, group in pieces:
        whole = torch.zeros(shape.numel(), dtype=torch.float32, device=mine.device)
        whole[start:start + mine.numel()].copy_(mine)
        dist.reduce(whole, dst=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        if main:
            state[name] = whole.view(shape).to("cpu")
        del whole
    return {**state, **_buffers(teacher)} if main else {}


def _buffers(module: nn.Module) -> dict:
    return {n: (b.float() if b.is_floating_point() else b).to("cpu") for n, b in module.named_buffers()}


@torch.no_grad()
def _load_buffers(module: nn.Module, state: dict) -> None:
    for n, b in module.named_buffers():
        b.copy_(state[n])
