"""CUDA-graphed control steps: each forward call of a control loop captured once, replayed.

At batch 1 a control step is launch-bound on a GPU: a forward call is hundreds of small
kernels, each a few microseconds of host work, and MoE layers add their routing and dispatch
kernels on top (benchmarks/RESULTS.md: a MoE step was 1.7-2.2x its dense twin on an H100).
A CUDA graph replays all of a call's kernels with one launch. It needs every shape fixed by
the call's shape and no host read inside; ``StepGraphs`` provides both:

- the KV cache is a ``StaticKVCache`` (fixed buffers, a device write position, host copies
  of the eviction state), and the model runs under ``GatoModel.static_shapes`` (the MoE
  layers take the column-space dispatch, which reads nothing back);
- every call shape of a control loop (the observation chunk of a task, one action token)
  gets one graph, captured at its first call after two eager warm-up calls (which the cache
  rehearses: they leave it as it was), and replayed on copies of the inputs after;
- sampling stays outside the graph (``GatoModel.generate`` with ``step_logits``), so
  greedy and sampled actions use the same code as the eager policy;
- under autocast a graph cannot keep autocast's cached casts, so it would cast every
  linear layer's weights again at every replay (for gato-1.18b ~0.8B dense parameters, four
  times the bytes of the matmuls themselves): the graphs are captured with the linear
  weights swapped for copies in autocast's dtype, made once (``autocast_weights``). Autocast
  would have made the same copies, so the results are bit for bit those of the eager step.

On a CPU there are no graphs: ``capture=False`` runs the same static-shape forward eagerly,
which is what the tests compare with the dynamic cache.

The graphs read the model's weights where they were at capture (the MoE layers' stacked
experts and the value embedding's rows included, kept alive here): a model changed
afterwards needs a new ``StepGraphs`` (a new ``Policy``).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn as nn

from moe_gato.model.moe import ModalityRoutedMoE
from moe_gato.model.static_cache import StaticKVCache


def supports_graphs(model) -> bool:
    """Every MoE layer of ``model`` can take the column-space dispatch (dropless, no added
    experts, no expert parallelism)."""
    return all(m.columns_supported() for m in model.modules() if isinstance(m, ModalityRoutedMoE))


def check_graphs(model) -> None:
    """A ValueError saying why, where ``model`` cannot run CUDA-graphed steps."""
    if not supports_graphs(model):
        raise ValueError("CUDA-graphed steps (graphs=True) need every MoE layer dropless "
                         "(capacity_factor null), without added experts or expert parallelism")


#: graphs kept at once (an evaluation over many tasks meets many call shapes); the oldest
#: is let go first, and captured again if its shape comes back
MAX_GRAPHS = 16


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]   # static copies the replay reads
    logits: torch.Tensor              # (B, N) the replay writes
    keep: list                        # tensors the graph reads that nothing else holds


class StepGraphs:
    """Forward calls of a control loop on ``cache``: ``logits(batch, id_range)`` -> (B, N)
    logits of each row's last position for ids [lo, hi). ``capture``: CUDA graphs (needs a
    CUDA model); else the static-shape forward runs eagerly."""

    def __init__(self, model, cache: StaticKVCache, *, capture: bool, warmup: int = 2):
        check_graphs(model)
        if capture and not torch.cuda.is_available():
            raise ValueError("capture=True needs CUDA; on a CPU use capture=False")
        self.model, self.cache = model, cache
        self.capture, self.warmup = capture, int(warmup)
        self.graphs: dict[tuple, _Graph] = {}
        self._generation = cache.generation
        self.captures = self.replays = 0
        self._low: dict[str, torch.Tensor] = {}  # linear weights in autocast's dtype

    def logits(self, batch: dict, id_range: tuple[int, int], *, graph: bool = True
               ) -> torch.Tensor:
        """``graph=False``: this call runs eagerly (a one-off shape, such as a prompt)."""
        self.cache.prepare(batch["tokens"].shape[1])
        if not (self.capture and graph):
            return self._forward(batch, id_range)
        if self.cache.generation != self._generation:  # rows dropped: new buffers
            self.graphs.clear()
            self._generation = self.cache.generation
        inputs = {k: v for k, v in batch.items() if v is not None}
        key = (tuple(id_range), tuple(sorted((k, tuple(v.shape), v.dtype)
                                             for k, v in inputs.items())))
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= MAX_GRAPHS:
                del self.graphs[next(iter(self.graphs))]
            entry = self.graphs[key] = self._capture(inputs, id_range)
        for name, value in inputs.items():
            entry.inputs[name].copy_(value, non_blocking=True)
        entry.graph.replay()
        self.cache.end()
        self.replays += 1
        return entry.logits.clone()

    def _forward(self, batch: dict, id_range: tuple[int, int]) -> torch.Tensor:
        with self.model.static_shapes():
            out = self.model(batch, cache=self.cache, compute_loss=False, last_only=True,
                             id_range=id_range)
        return out.logits[:, -1]

    def _capture(self, inputs: dict[str, torch.Tensor], id_range: tuple[int, int]) -> _Graph:
        static = {k: v.clone() for k, v in inputs.items()}
        # warm-up and capture with the same weights: stacks built from them (a shared
        # expert's) are then made in the warm-up, not captured
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: allocations, lazy init, stacked experts
            for _ in range(self.warmup):
                with self.cache.rehearsal(), autocast_weights(self.model, dtype, self._low):
                    self._forward(static, id_range)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with self.cache.rehearsal(), autocast_weights(self.model, dtype, self._low):
            with torch.cuda.graph(graph):
                logits = self._forward(static, id_range)
        keep = [m._stacked for m in self.model.modules() if isinstance(m, ModalityRoutedMoE)]
        keep.append(self.model.embed._rows)  # the value embedding's rows, if it has them
        self.captures += 1
        return _Graph(graph=graph, inputs=static, logits=logits, keep=keep)


@contextlib.contextmanager
def autocast_weights(model: nn.Module, dtype: torch.dtype | None,
                     copies: dict[str, torch.Tensor]):
    """Inside, every ``nn.Linear`` of ``model`` holds its weight in ``dtype`` (autocast's),
    from ``copies`` (filled on first use: a copy made once, kept by the caller); afterwards
    the original parameters are back. Under autocast a linear layer casts its weight to that
    dtype anyway, so its results do not change; what changes is that a graph captured inside
    reads the copies instead of casting at every replay. ``dtype`` None: nothing swapped."""
    swapped = []
    if dtype is not None:
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and module.weight.dtype != dtype:
                if name not in copies:
                    copies[name] = module.weight.detach().to(dtype)
                swapped.append((module, module.weight))
                module._parameters["weight"] = nn.Parameter(copies[name], requires_grad=False)
    try:
        yield
    finally:
        for module, weight in swapped:
            module._parameters["weight"] = weight
