"""torch.cuda's stream and graph API, faked on the CPU, for the tests of speed.CUDAGraphReplay's logic: which stream
each warm-up and recording runs on, which pool a recording gets, what a failed recording leaves, what is called when.

Nothing here runs a kernel: fn runs eagerly on the CPU wherever the real thing would run it, a recording runs fn
once (as a capture would) unless it is told to fail, and replay() does nothing (its output is the recording's).
"""
import contextlib
import itertools
import weakref

import torch


class Stream:
    numbers = itertools.count()

    def __init__(self, device=None, name=None):
        self.name = name or f"stream {next(self.numbers)}"

    def wait_stream(self, other):
        pass

    def __repr__(self):
        return f"<{self.name}>"


class Graph:
    def __init__(self, cuda):
        self.cuda = cuda

    def replay(self):
        self.cuda.calls.append("replay")


class FakeCUDA:
    """Installs itself over torch.cuda's stream and graph API (monkeypatch undoes it). `calls` lists what happened,
    in order: ("on stream", stream) (a warm-up), ("record", stream, pool), "replay", "empty_cache",
    ("set_stream", stream), ("end allocate to pool", device, pool).
    Set `fail` to a message to make the next recordings raise it.
    `graphs`: a weak reference to each graph object made, to see that a failed one is let go."""

    def __init__(self, monkeypatch):
        self.default = Stream(name="the default stream")
        self.calls, self.fail, self.current, self.sync_debug_mode, self.graphs = [], None, self.default, "default", []
        self.pools = itertools.count(1)
        for name, value in dict(
                Stream=Stream, stream=self.stream, current_stream=lambda: self.current, set_stream=self.set_stream,
                device=lambda device: contextlib.nullcontext(), current_device=lambda: 0,
                CUDAGraph=self.new_graph, graph_pool_handle=lambda: (next(self.pools), 0), graph=self.graph,
                empty_cache=lambda: self.calls.append("empty_cache"),
                get_sync_debug_mode=lambda: self.sync_debug_mode, set_sync_debug_mode=self.set_sync_debug_mode,
        ).items():
            monkeypatch.setattr(torch.cuda, name, value)
        monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool",
                            lambda device, pool: self.calls.append(("end allocate to pool", device, pool)),
                            raising=False)

    def new_graph(self):
        graph = Graph(self)
        self.graphs.append(weakref.ref(graph))
        return graph

    def set_stream(self, stream):
        self.calls.append(("set_stream", stream))
        self.current = stream

    def set_sync_debug_mode(self, mode):
        self.sync_debug_mode = mode

    @contextlib.contextmanager
    def stream(self, stream):
        before, self.current = self.current, stream
        self.calls.append(("on stream", stream))
        try:
            yield
        finally:
            self.current = before

    @contextlib.contextmanager
    def graph(self, graph, pool=None, stream=None):
        self.calls.append(("record", stream, pool))
        if self.fail:
            self.current = stream  # as a failed capture can leave it
            raise RuntimeError(self.fail)
        before, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = before
