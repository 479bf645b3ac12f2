"""A step replayed from CUDA graphs: one graph per input shape, captured on first use.

UNTESTED ON A GPU: written for CUDA exports, and never run here (the development machine has no GPU). A CPU
call passes straight through, so CPU runs do not depend on it.

Inputs are copied into the graph's static buffers, except the `state` inputs (the KV caches), which the graph
writes in place: those must be the very tensors it was captured with (the runtime keeps one set per row count).
The output is cloned out of the graph's static buffer, so a sampler may keep it across calls (Heun and
DPM-Solver++ do). Nothing random happens inside a graph: the samplers draw their noise outside, as eagerly.
Capture runs the step on the real first inputs (after a warm-up on a side stream), and replays it once for the
result; for the AR steps that rewrites the same cache position with the same values, so it is harmless.
"""
from typing import Callable, Iterable

import torch


class GraphedCall:
    def __init__(self, fn: Callable[..., torch.Tensor], state: Iterable[int] = (), warmup: int = 2):
        self.fn, self.state, self.warmup = fn, frozenset(state), warmup
        self.graphs: dict = {}
        self.pool = None

    def _key(self, args) -> tuple:
        return tuple((tuple(a.shape), a.dtype) for a in args)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if not (args and args[0].is_cuda):
            return self.fn(*args)
        key = self._key(args)
        if key not in self.graphs:
            self.graphs[key] = self._capture(args)
        graph, static, out = self.graphs[key]
        for i, (buffer, a) in enumerate(zip(static, args)):
            if i in self.state:
                if a.data_ptr() != buffer.data_ptr():
                    raise RuntimeError(f"input {i} is state written in place by the graph: pass the tensor it was "
                                       f"captured with")
            elif a.data_ptr() != buffer.data_ptr():
                buffer.copy_(a)
        graph.replay()
        return out.clone()

    def _capture(self, args):
        static = [a if i in self.state else a.clone() for i, a in enumerate(args)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(*static)
        return graph, static, out
