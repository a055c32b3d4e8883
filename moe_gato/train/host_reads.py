"""Where a step waits for the device: every host read of tensor data, counted on any device.

    with HostReads() as reads:
        trainer.train_step()
    assert reads.count == 0, reads.report()

On a GPU each of these stalls the host until the queued kernels have run (and
``torch.cuda.set_sync_debug_mode("error")`` catches most of them); on the CPU they cost
nothing, which is why a CPU test needs this counter to see them. Counted: reading a value
(``item``, ``tolist``, ``bool``/``int``/``float`` of a tensor, ``numpy``), and the ops whose
output size depends on the data (``nonzero``, boolean-mask indexing, ``unique``,
``bincount``, ``masked_select``, ``repeat_interleave`` without ``output_size``), which must
read a count back before they can allocate.
"""

from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
#: ops that read data back to the host (by name of the overload packet)
_READING_OPS = {
    "_local_scalar_dense", "nonzero", "nonzero_static_", "masked_select", "_unique",
    "_unique2", "unique_dim", "unique_consecutive", "bincount", "is_nonzero", "equal",
    "histc", "_assert_async",
}
_READING_METHODS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__",
                    "__index__"}


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: "HostReads"):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if self.owner._inside_read:  # already counted as the method that reads
            pass
        elif name in _READING_OPS:
            self.owner._record(f"aten.{name}")
        elif name == "repeat_interleave" and kwargs.get("output_size") is None:
            self.owner._record("aten.repeat_interleave without output_size")
        elif name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                     for i in (args[1] if len(args) > 1 else ())):
            self.owner._record("aten.index with a boolean mask")
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, owner: "HostReads"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if not (name in _READING_METHODS and args and isinstance(args[0], torch.Tensor)):
            return func(*args, **(kwargs or {}))
        self.owner._record(f"Tensor.{name}")
        self.owner._inside_read = True
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.owner._inside_read = False


class HostReads:
    """Counts host reads of tensor data inside the ``with`` block (see the module docstring);
    ``events`` holds (what, where) pairs, the first lines of the calling code. ``allow``:
    reads made inside a function of one of these names are not counted (reads of host
    tensors that stay on the host on a GPU too, such as a CPU batch's target count)."""

    def __init__(self, keep_stacks: int = 20, allow: tuple[str, ...] = ()):
        self.events: list[tuple[str, str]] = []
        self.keep_stacks = keep_stacks
        self.allow = tuple(allow)
        self._inside_read = False
        self._modes = (_Function(self), _Dispatch(self))

    @property
    def count(self) -> int:
        return len(self.events)

    def _record(self, what: str) -> None:
        stack = traceback.extract_stack()
        if self.allow and any(f.name in self.allow for f in stack):
            return
        where = ""
        if len(self.events) < self.keep_stacks:
            frames = [f for f in stack
                      if "torch/" not in f.filename and "host_reads.py" not in f.filename]
            where = "; ".join(f"{f.filename.split('/')[-1]}:{f.lineno} {f.line}"
                              for f in frames[-2:])
        self.events.append((what, where))

    def report(self) -> str:
        lines = [f"{self.count} host read(s):"]
        lines += [f"  {what}  at {where}" for what, where in self.events[:self.keep_stacks]]
        return "\n".join(lines)

    def __enter__(self) -> "HostReads":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
