"""Count the bytes a piece of code moves through torch.distributed collectives (inside a rank).

    with CollectiveCounter() as counter:
        ...
    counter.calls  # [("all_gather" | "reduce_scatter" | "all_reduce" | ..., payload bytes), ...]

The payload is the largest tensor (or list of tensors, summed) a call takes: the gathered output
of an all-gather, the input of a reduce-scatter, the tensor of an all-reduce. torch.distributed's
functions and the aliases massl.dist bound at import are patched for the duration; a call made
from inside another counted call (a deprecated wrapper forwarding to its successor) counts once.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist

import massl.dist

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
                "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "all_to_all_single")
_MASSL_ALIASES = ("_all_gather_tensor", "_reduce_scatter_tensor")


def _kind(name: str) -> str:
    return "all_gather" if "all_gather" in name else "reduce_scatter" if "reduce_scatter" in name else name


def _nbytes(arg) -> int:
    if isinstance(arg, torch.Tensor):
        return arg.numel() * arg.element_size()
    if isinstance(arg, (list, tuple)):
        return sum(_nbytes(a) for a in arg)
    return 0


class CollectiveCounter:
    def __init__(self):
        self.calls: list[tuple[str, int]] = []
        self._depth = 0
        self._saved = []

    def _wrap(self, kind, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self._depth == 0:
                self.calls.append((kind, max(_nbytes(a) for a in (*args, *kwargs.values()))))
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        return counted

    def __enter__(self):
        for module, names in ((dist, _COLLECTIVES), (massl.dist, _MASSL_ALIASES)):
            for name in names:
                if hasattr(module, name):
                    fn = getattr(module, name)
                    self._saved.append((module, name, fn))
                    setattr(module, name, self._wrap(_kind(fn.__name__), fn))
        return self

    def __exit__(self, *exc):
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)
