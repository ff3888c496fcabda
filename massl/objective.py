"""The MaSSL objective as one component: what one step computes from the embeddings.

`MaSSLObjective` owns the memory bank and its layout (sharded over the ranks or replicated,
`memory.sharded`, massl/scaling.py), the step's partition permutation, the KoLeo scope and the
gradient scaling of the terms that span the global batch. The training step (massl/train.py)
hands it the student's and teacher's embeddings and gets typed terms back; it never sees a
process group or a memory layout.

    objective = MaSSLObjective.from_config(cfg, env)
    terms = objective(zs, zt, step, hyper, monitor)   # StepTerms
    engine.backward(terms.objective)
    ...
    objective.remember(zt[1])                         # the enqueue, once the step is applied

The memory stays its own checkpoint part (`objective.memory`, saved and loaded by MemoryBank).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .config import Config
from .dist import DistEnv, world_of
from .loss import koleo_loss, massl_loss, partition_agreement, random_partition_perm
from .memory import MemoryBank
from .scaling import LossShape, resolve_sharded
from .schedules import Hyper


@dataclass(frozen=True)
class StepTerms:
    """The terms of one step, as device tensors (no host sync).

    loss: the value to report, MaSSL + weighted KoLeo (this rank's value when each rank sees its
    own batch); objective: the value to backpropagate (terms over the global batch scaled for the
    engine's gradient average); koleo: the unweighted KoLeo term (None at weight 0); agreement:
    the top-1 and top-5 agreement of method.md (None unless monitored)."""

    loss: torch.Tensor
    objective: torch.Tensor
    koleo: Optional[torch.Tensor] = None
    agreement: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def metrics(self) -> dict[str, torch.Tensor]:
        """The terms to log, detached, under the metrics' names (loss, koleo, agree_top1/5)."""
        out = {"loss": self.loss.detach()}
        if self.koleo is not None:
            out["koleo"] = self.koleo.detach()
        if self.agreement is not None:
            out["agree_top1"], out["agree_top5"] = (a.detach() for a in self.agreement)
        return out


def global_term_scale(group: Optional[dist.ProcessGroup]) -> float:
    """Engines average gradients over ranks. A term over the global batch (computed with `group`)
    gives each rank only its slice of the term's gradient, so it is scaled by the world size
    for the average to be that gradient; a term over the local batch (None) is averaged as is."""
    return float(world_of(group)[1])


class MaSSLObjective:
    """The memory-bank loss and KoLeo of method.md, steps 3-7, over `memory` (module docstring)."""

    def __init__(self, memory: MemoryBank, *, partition_size: int, student_temp: float, seed: int,
                 koleo_weight: float = 0.0, koleo_group: Optional[dist.ProcessGroup] = None,
                 chunk_rows: int = 0) -> None:
        self.memory = memory
        # Sharded memory: the loss spans the global batch. Replicated (published layout): each
        # rank's loss sees its own batch, the memory still stores every rank's keys.
        self.loss_group = memory.group if memory.sharded else None
        self.partition_size = partition_size
        self.student_temp = student_temp
        self.seed = seed
        self.koleo_weight = koleo_weight
        self.koleo_group = koleo_group
        self.chunk_rows = chunk_rows

    @classmethod
    def from_config(cls, cfg: Config, env: DistEnv) -> "MaSSLObjective":
        """The run's objective: the memory laid out as `memory.sharded` resolves at this world size,
        initialised from run.seed on env.device; KoLeo over the global batch when
        loss.koleo_scope=global, else over each rank's own batch (published)."""
        sharded = resolve_sharded(cfg.memory.sharded, LossShape.of_run(cfg, env.world_size))
        memory = MemoryBank(cfg.model.head_bottleneck_dim, cfg.memory.size, group=env.group, sharded=sharded,
                            seed=cfg.run.seed, device=env.device)
        return cls(memory, partition_size=cfg.memory.partition_size, student_temp=cfg.loss.student_temp,
                   seed=cfg.run.seed, koleo_weight=cfg.loss.koleo_weight,
                   koleo_group=env.group if cfg.loss.koleo_scope == "global" else None,
                   chunk_rows=cfg.memory.chunk_rows)

    @property
    def sharded(self) -> bool:
        return self.memory.sharded

    def permutation(self, step: int, device: torch.device) -> torch.Tensor:
        """The step's random partition of the memory slots, the same on every rank."""
        return random_partition_perm(self.memory.size, self.seed, step, device)

    def __call__(self, zs: torch.Tensor, zt: torch.Tensor, step: int, hyper: Hyper,
                 monitor: bool = False) -> StepTerms:
        """The terms for student embeddings zs [V, B, D] and teacher embeddings zt [2, B, D] against
        the memory *before* this step's enqueue."""
        return self.terms(zs, zt, self.permutation(step, zs.device), hyper.teacher_temp, monitor)

    def terms(self, zs: torch.Tensor, zt: torch.Tensor, perm: torch.Tensor, teacher_temp: float,
              monitor: bool = False) -> StepTerms:
        """`__call__` with the permutation given (the FLOP count's, on the meta device)."""
        bank = self.memory.bank
        loss = massl_loss(zs, zt, bank, perm, self.partition_size, self.student_temp, teacher_temp,
                          group=self.loss_group, chunk_rows=self.chunk_rows)
        objective = loss * global_term_scale(self.loss_group)
        koleo = None
        if self.koleo_weight > 0:  # no work at all at weight 0
            koleo = 0.5 * (koleo_loss(zs[0], self.koleo_group) + koleo_loss(zs[1], self.koleo_group))
            loss = loss + self.koleo_weight * koleo
            objective = objective + self.koleo_weight * koleo * global_term_scale(self.koleo_group)
        agreement = None
        if monitor:
            agreement = partition_agreement(zs[0].detach(), zt[1], bank, perm, self.partition_size, self.loss_group)
        return StepTerms(loss=loss, objective=objective, koleo=koleo, agreement=agreement)

    def remember(self, keys: torch.Tensor) -> None:
        """Enqueue this rank's [B, D] keys (teacher view 1) and every other rank's."""
        self.memory.enqueue(keys)
