"""CUDA graphs: a call replayed as one launch instead of one launch per kernel.

On a GPU a small member at batch 1 is bound by launches, not arithmetic (an H100 runs the
five CIFAR-10 members of BENCHMARKS.md eagerly in 1.7 ms fused, in 0.2 ms as one graph),
so the fastest full ensemble there is a graphed one, and ``infer.py`` measures it as a
baseline. A graph replays fixed shapes and fixed memory: :class:`CudaGraphed` keeps one
graph per input shape, its static input and output, and with ``bucket`` pads the batch up
to a power of two, so a halting loop's varying sub-batches share a few graphs. Rows are
independent in an inference-form member, so padding rows (stale inputs, outputs dropped)
change nothing for the real ones.

A graph holds the addresses of the weights it was captured with: moving a
:class:`CudaGraphed` (``.to``, ``.cpu``, Lightning's teardown) drops its graphs, and the
next call captures them again; weights changed in place, or moved through another module
that shares them, are not noticed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from flexens.execution import EnsembleOutput


def bucket_size(batch: int) -> int:
    """The power of two a batch of ``batch`` rows is padded to."""
    if batch < 1:
        raise ValueError(f"a batch needs at least one row, got {batch}")
    return 1 << (batch - 1).bit_length()


def map_tensors(fn: Callable[[Tensor], Tensor], out):
    """``fn`` on every tensor of a call's result: a tensor or an ``EnsembleOutput``."""
    if isinstance(out, EnsembleOutput):
        return EnsembleOutput(**{k: None if v is None else fn(v) for k, v in vars(out).items()})
    return fn(out)


class CudaGraphed(nn.Module):
    """``fn(x)`` replayed from a CUDA graph captured once per input shape.

    ``fn`` is a network (registered, so it moves with this module) or any callable (a
    fused ensemble's ``full``). The result is a view of the graph's static output: the next
    call of the same shape overwrites it, so use or copy it first (every caller in flexens
    reduces it at once).
    """

    def __init__(self, fn: Callable[[Tensor], object], bucket: bool = False) -> None:
        super().__init__()
        self.fn, self.bucket = fn, bucket
        self.graphs: dict[tuple, tuple] = {}

    def _apply(self, fn, *args, **kwargs):
        self.graphs.clear()  # captured with the old weights' addresses
        return super()._apply(fn, *args, **kwargs)

    def _capture(self, like: Tensor, rows: int) -> tuple:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "a CUDA graph cannot be captured inside another: graph the members or the "
                "whole ensemble, not both"
            )
        static = like.new_zeros((rows, *like.shape[1:]))
        if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last):
            static = static.contiguous(memory_format=torch.channels_last)
        side = torch.cuda.Stream(like.device)
        side.wait_stream(torch.cuda.current_stream(like.device))
        with torch.cuda.stream(side):  # warm-up off the capture: cuDNN picks its kernels
            for _ in range(3):
                self.fn(static)
        torch.cuda.current_stream(like.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.fn(static)
        return graph, static, out

    def prepare(self, example: Tensor, batches: Iterable[int]) -> None:
        """Capture the graphs for these batch sizes now, so none is captured while timed."""
        for batch in batches:
            self(example[:1].expand(batch, *example.shape[1:]).contiguous())

    def forward(self, x: Tensor):
        if x.device.type != "cuda":
            raise ValueError(f"CUDA graphs replay on a GPU; got an input on {x.device}")
        rows = bucket_size(x.shape[0]) if self.bucket else x.shape[0]
        key = (rows, *x.shape[1:], x.dtype, x.device, torch.is_inference_mode_enabled())
        if key not in self.graphs:
            self.graphs[key] = self._capture(x, rows)
        graph, static, out = self.graphs[key]
        static[: x.shape[0]].copy_(x)
        graph.replay()
        return map_tensors(lambda t: t[: x.shape[0]], out)


def graphed_members(members: Iterable[nn.Module]) -> list[CudaGraphed]:
    """Members as a halting loop replays them: one bucketed graph set per member (what
    ``FlexibleEnsembleModule(cuda_graphs=True)`` runs and a GPU latency profile times)."""
    return [CudaGraphed(m, bucket=True) for m in members]
