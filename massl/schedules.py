"""Per-iteration schedules (method.md steps 8-10), as closed forms of the iteration `it`.

With T = epochs * iters_per_epoch total iterations and Wu = warmup iterations, as the published
`cosine_scheduler` (whose warm-up is np.linspace(0, base, Wu): its last value is base, so the
step divides by Wu - 1):
  lr(it)       = base * it / (Wu - 1)                               for it < Wu (base = lr * G / 256)
               = min_lr + (base - min_lr) * (1 + cos(pi * (it - Wu) / (T - Wu))) / 2   otherwise
  wd(it)       = wd_end + (wd - wd_end) * (1 + cos(pi * it / T)) / 2
  teacher_momentum(it) = 1 + (m0 - 1) * (1 + cos(pi * it / T)) / 2
  t_temp(it)   = warm + (final - warm) * it / (Wt - 1)  for it < Wt (Wt = warmup_teacher_temp_epochs * ipe),
                 final after (np.linspace(warm, final, Wt) then constant)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .config import Config


@dataclass(frozen=True)
class Hyper:
    """The schedules' values at one step."""

    lr: float
    wd: float
    teacher_momentum: float
    teacher_temp: float

    def as_dict(self) -> dict[str, float]:
        """For the metrics, under the same names."""
        return asdict(self)


def linspace_at(it: int, length: int, start: float, end: float) -> float:
    """np.linspace(start, end, length)[it]."""
    return start if length <= 1 else start + (end - start) * it / (length - 1)


def cosine(it: int, total: int, start: float, end: float) -> float:
    """Cosine from `start` at it=0 to `end` at it=total."""
    frac = min(max(it / max(total, 1), 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


@dataclass
class Schedules:
    iters_per_epoch: int
    total_iters: int
    base_lr: float
    min_lr: float
    warmup_iters: int
    wd: float
    wd_end: float
    teacher_momentum_start: float
    teacher_temp: float
    warmup_teacher_temp: float
    teacher_temp_iters: int

    @classmethod
    def from_config(cls, cfg: Config, iters_per_epoch: int, global_batch: int) -> "Schedules":
        o, lo = cfg.optim, cfg.loss
        return cls(
            iters_per_epoch=iters_per_epoch,
            total_iters=o.epochs * iters_per_epoch,
            base_lr=o.lr * global_batch / 256.0,
            min_lr=o.min_lr,
            warmup_iters=int(round(o.warmup_epochs * iters_per_epoch)),
            wd=o.weight_decay,
            wd_end=o.weight_decay_end,
            teacher_momentum_start=o.teacher_momentum,
            teacher_temp=lo.teacher_temp,
            warmup_teacher_temp=lo.warmup_teacher_temp,
            teacher_temp_iters=int(round(lo.warmup_teacher_temp_epochs * iters_per_epoch)),
        )

    def lr(self, it: int) -> float:
        if it < self.warmup_iters:
            return linspace_at(it, self.warmup_iters, 0.0, self.base_lr)
        return cosine(it - self.warmup_iters, self.total_iters - self.warmup_iters, self.base_lr, self.min_lr)

    def weight_decay(self, it: int) -> float:
        return cosine(it, self.total_iters, self.wd, self.wd_end)

    def teacher_momentum(self, it: int) -> float:
        return cosine(it, self.total_iters, self.teacher_momentum_start, 1.0)

    def teacher_temperature(self, it: int) -> float:
        if it < self.teacher_temp_iters:
            return linspace_at(it, self.teacher_temp_iters, self.warmup_teacher_temp, self.teacher_temp)
        return self.teacher_temp

    def at(self, it: int) -> Hyper:
        return Hyper(lr=self.lr(it), wd=self.weight_decay(it), teacher_momentum=self.teacher_momentum(it),
                     teacher_temp=self.teacher_temperature(it))
