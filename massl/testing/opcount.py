"""Count what a piece of code asks of the dispatcher: every aten operator, and the host
synchronisations among them.

    with OpCounter() as c:
        train_step(...)
    c.total, c.host_scalar_reads, c.dynamic_shape_ops, c.ops.most_common(10)

The operator count is the CPU-measurable proxy for kernel launches on a GPU (each eager op is at
least one launch). A host synchronisation on a GPU is any op that needs a value back on the host:

- host-scalar reads: `aten._local_scalar_dense` (`.item()`, `float(t)`, `bool(t)`, `if t > 0:`),
  device-to-host copies (`.cpu()`, `.tolist()`, `.numpy()` of a device tensor), and, because a
  CPU tensor's `.cpu()`/`.tolist()`/`.numpy()` never reaches the dispatcher, any call of those
  methods inside the block (so that the CPU shows what the GPU would pay);
- data-dependent shapes: ops whose output size depends on tensor values (`nonzero`,
  `masked_select`, boolean-mask indexing, `unique`, ...), which wait for the device to size the
  output;
- `torch.cuda.synchronize` / `torch.cuda.empty_cache` called inside the block.

Only the ops the code dispatches are seen (not those a kernel runs internally: a fused optimiser's
step counter stays inside its kernel), as with the published step's count
(benchmarks/bench_step.py --count-ops).
"""
from __future__ import annotations

import collections
import functools

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_DYNAMIC_SHAPE_OPS = {"aten.nonzero", "aten.nonzero_static", "aten.masked_select", "aten.unique_dim",
                      "aten._unique", "aten._unique2", "aten.unique_consecutive", "aten.repeat_interleave",
                      "aten.argwhere"}
_HOST_METHODS = ("cpu", "tolist", "numpy")  # invisible to the dispatcher when the tensor is already on the CPU
_CUDA_SYNCS = ("synchronize", "empty_cache")


def _device_of(x):
    return x.device if isinstance(x, torch.Tensor) else None


def _is_device_to_host(name: str, args, kwargs) -> bool:
    if name == "aten._to_copy":
        src, dst = _device_of(args[0]), kwargs.get("device")
        return src is not None and src.type not in ("cpu", "meta") and dst is not None and torch.device(dst).type == "cpu"
    if name == "aten.copy_":
        dst, src = _device_of(args[0]), _device_of(args[1])
        return dst is not None and src is not None and dst.type == "cpu" and src.type not in ("cpu", "meta")
    return False


def _has_bool_index(args) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())


class OpCounter(TorchDispatchMode):
    """A dispatch mode counting operators (by overload packet, e.g. `aten.mm`) and host syncs."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.host_reads: collections.Counter = collections.Counter()  # what -> count
        self.dynamic_shapes: collections.Counter = collections.Counter()
        self.view_ops = 0  # ops that only make a view (no kernel on a GPU)
        self.annotations = 0  # profiler ranges (record_function), no work
        self._saved = []

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def non_view_ops(self) -> int:
        """Ops that may do work: the launch proxy, without views and profiler annotations."""
        return self.total - self.view_ops - self.annotations

    @property
    def host_scalar_reads(self) -> int:
        return sum(self.host_reads.values())

    @property
    def dynamic_shape_ops(self) -> int:
        return sum(self.dynamic_shapes.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if func.is_view or name == "aten._unsafe_view":
            self.view_ops += 1
        elif name.startswith("profiler."):
            self.annotations += 1
        if name == "aten._local_scalar_dense":
            self.host_reads[name] += 1
        elif _is_device_to_host(name, args, kwargs):
            self.host_reads["device-to-host copy"] += 1
        elif name in _DYNAMIC_SHAPE_OPS or (name in ("aten.index", "aten.index_put_", "aten.index_put")
                                            and _has_bool_index(args)):
            self.dynamic_shapes[name] += 1
        return func(*args, **kwargs)

    def _count_calls(self, owner, name: str, label: str, cpu_only: bool):
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            # a device tensor's copy to the host is counted by the dispatcher already
            if not cpu_only or args[0].device.type == "cpu":
                self.host_reads[label] += 1
            return fn(*args, **kwargs)

        self._saved.append((owner, name, fn))
        setattr(owner, name, counted)

    def __enter__(self):
        for name in _HOST_METHODS:
            self._count_calls(torch.Tensor, name, f"Tensor.{name}()", cpu_only=True)
        for name in _CUDA_SYNCS:
            self._count_calls(torch.cuda, name, f"torch.cuda.{name}()", cpu_only=False)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for owner, name, fn in reversed(self._saved):
                setattr(owner, name, fn)
            self._saved.clear()

    def summary(self, top: int = 12) -> dict:
        return {"total_ops": self.total, "non_view_ops": self.non_view_ops, "host_scalar_reads": self.host_scalar_reads,
                "dynamic_shape_ops": self.dynamic_shape_ops, "host_reads_by_kind": dict(self.host_reads),
                "top": [[name, n] for name, n in self.ops.most_common(top)]}
