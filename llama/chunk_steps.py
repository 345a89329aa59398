"""Ways to run a forward step over a chunk of tokens per row, each row starting at its own
cache position: eagerly, or with fixed shapes replayed from CUDA graphs (compiled by
torch.compile first under decode="compiled"). Speculative decoding runs its draft steps
and its verify steps (the last accepted token plus k drafted ones) through these, as the
plain decode step runs through graphs.py.

A step function has the signature `fn(model, tokens, starts, kv_len, *inputs,
temperature, top_p)` and returns a tuple of tensors (or None) whose first dimension is the
rows; `inputs` are tensors with one entry per row.
"""

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .graphs import (batch_bucket, compiled, eager_start, record, sampling_inputs,
                     to_device, warm_up)


def chunk_runner(model, decode: str):
    """The runner for a model whose plain steps run in mode `decode` (Engine settings)."""
    if decode == "eager":
        return EagerChunks(model)
    return GraphedChunks(model, compile=decode == "compiled")


class EagerChunks:
    """Steps run as they are (graphs.eager_start)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, fn: Callable, tokens: torch.Tensor, starts: List[int],
                 inputs: Sequence[torch.Tensor] = (), temperature: float = 0.0,
                 top_p: float = 1.0):
        kv_len = max(starts) + tokens.shape[1]
        return fn(self.model, tokens, eager_start(starts, tokens.device), kv_len, *inputs,
                  temperature, top_p)


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x with zero rows appended up to `rows` rows (x itself if it has them)."""
    if x.shape[0] == rows:  # no copy: at batch 1 a round's host work is a large share
        return x
    return F.pad(x, (0, 0) * (x.dim() - 1) + (0, rows - x.shape[0]))


class GraphedChunks:
    """Steps with fixed shapes: one CUDA graph per (step function, rows bucket, chunk
    width, input shapes, greedy or sampled), each attending over the whole cache, captured
    on first use. A call's outputs are valid until the runner's next call (the graphs
    share one memory pool). Padding rows start at position 0 of cache rows that the
    generation does not use. Off CUDA (`capture` False) the same fixed-shape steps run
    directly, so that compiled steps compile once per key there too."""

    def __init__(self, model, compile: bool = False, capture: Optional[bool] = None):
        self.model = model
        self.graphs = {}
        on_cuda = model.rope.device.type == "cuda"
        self.capture_graphs = on_cuda if capture is None else capture
        self.pool = torch.cuda.graph_pool_handle() if self.capture_graphs else None
        self.compile = compile
        self.compiled_steps = {}  # fn -> graphs.compiled(fn)

    def __call__(self, fn: Callable, tokens: torch.Tensor, starts: List[int],
                 inputs: Sequence[torch.Tensor] = (), temperature: float = 0.0,
                 top_p: float = 1.0):
        n, width = tokens.shape
        rows = batch_bucket(n, self.model.params.max_batch_size)
        starts = to_device(starts, tokens.device)
        padded = [pad_rows(x, rows) for x in (tokens, starts, *inputs)]
        sampled = temperature > 0
        key = (fn, rows, width, sampled, tuple(tuple(x.shape[1:]) for x in inputs))
        if key not in self.graphs:
            self.graphs[key] = self.capture(fn, padded, temperature, top_p)
        replay, statics, settings, outputs = self.graphs[key]
        for static, value in zip(statics, padded):
            static.copy_(value)
        if sampled:
            settings[0].fill_(temperature)
            settings[1].fill_(top_p)
        replay()
        # Views of the graph's outputs, which the next replay (of any of this runner's
        # graphs: they share a pool) may overwrite: callers copy what they keep (a
        # verify's results go straight to the host).
        return tuple(None if out is None else out[:n] for out in outputs)

    def step_fn(self, fn: Callable) -> Callable:
        if not self.compile:
            return fn
        if fn not in self.compiled_steps:
            self.compiled_steps[fn] = compiled(fn)
        return self.compiled_steps[fn]

    def capture(self, fn, padded, temperature, top_p):
        device = padded[0].device
        # Under no_grad, not inference_mode, as graphs.GraphedDecoder.capture explains.
        with torch.inference_mode(False), torch.no_grad():
            statics = [torch.empty_like(x).copy_(x) for x in padded]
            settings = sampling_inputs(temperature > 0, temperature, top_p, device)
            step_fn, whole_cache = self.step_fn(fn), self.model.params.max_seq_len
            step = lambda: step_fn(self.model, *statics[:2], whole_cache,  # noqa: E731
                                   *statics[2:], *settings)
            warm_up(step, device)  # writes the cache entries the real step writes
            outputs, replay = record(step, self.capture_graphs, self.pool)
        return replay, statics, settings, outputs
