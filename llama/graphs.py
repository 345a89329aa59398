"""Ways to run the plain decode step (sampling.decode_step): eagerly, or replayed from
CUDA graphs, optionally compiled by torch.compile first. Chosen once by
`Llama.configure(decode=...)`; the model knows nothing of them.

At batch 1 an eager 7B decode step is ~1,600 small kernels whose launch cost alone
exceeds the time the GPU needs to read the weights; a CUDA graph launches them all at
once. Graphs need fixed shapes: the Triton decode attention (kernels.py) reads each
row's length from the device, so one graph spans the whole cache and serves every
context length. So graphs are offered where that kernel runs (CUDA with Triton, which
PyTorch's Linux CUDA wheels bring), and steps run eagerly elsewhere.
"""

import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch._dynamo
import torch._inductor.config as inductor_config
import torch.nn.functional as F

from . import distributed, kernels
from .sampling import Sampling, decode_step

# Compilations of decode_step allowed in one process (dynamo's default is 8 per function):
# one per batch bucket, greedy or sampling.
MAX_STEP_COMPILATIONS = 64

# torch._inductor settings of compiled decode steps. Coordinate-descent tuning of the
# generated kernels' launch settings (done in the first call of each kernel); with it,
# inductor also turns batch-1 matrix products into its own reductions instead of cuBLAS
# calls, which lets it fuse the work around them.
COMPILE_SETTINGS = {"coordinate_descent_tuning": True}


def graphs_available(model) -> bool:
    return kernels.available(model.rope.device, model.params.head_dim)


def to_device(values: List[int], device: torch.device) -> torch.Tensor:
    """A short list as a tensor on `device`, queued behind the work already launched there
    instead of waiting for it: a copy from ordinary (pageable) host memory synchronises
    the CUDA stream, a copy from pinned memory does not."""
    if device.type != "cuda":
        return torch.tensor(values, device=device)
    return torch.tensor(values, pin_memory=True).to(device, non_blocking=True)


def eager_start(starts: List[int], device: torch.device):
    """Where an eager step's rows start: one int when they all start at one position
    (attention then reads exactly their keys, with no mask), else a tensor of them."""
    return starts[0] if all(s == starts[0] for s in starts) else to_device(starts, device)


class EagerDecoder:
    """decode_step run as it is (any device)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, tokens, positions: List[int], sampling: Sampling):
        return decode_step(self.model, tokens, eager_start(positions, tokens.device),
                           max(positions) + 1, sampling.temperature, sampling.top_p)


def check_inductor_settings(settings: dict) -> None:
    """Refuse names that torch._inductor.config does not have (dotted, as it lists them)."""
    unknown = sorted(set(settings) - set(inductor_config.get_config_copy()))
    if unknown:
        raise ValueError(f"torch._inductor.config has no setting {', '.join(unknown)}")


def compile_step(settings: Optional[dict] = None):
    """decode_step compiled by torch.compile with COMPILE_SETTINGS updated by `settings`
    (torch._inductor.config names, e.g. {"triton.enable_pdl": True}). The settings go with
    this compiled function: another call of compile_step with other settings compiles
    decode_step anew instead of reusing this one's code."""
    return compiled(decode_step, settings)


def compiled(fn: Callable, settings: Optional[dict] = None) -> Callable:
    """`fn` compiled with fixed shapes and COMPILE_SETTINGS (updated by `settings`), free
    to compile once per batch bucket, greedy or sampled, past dynamo's default limit."""
    options = {**COMPILE_SETTINGS, **(settings or {})}
    check_inductor_settings(options)
    step_fn = torch.compile(fn, dynamic=False, options=options)

    def step(*args):
        # Past dynamo's default limit the step would quietly run uncompiled.
        with torch._dynamo.config.patch(recompile_limit=max(
                torch._dynamo.config.recompile_limit, MAX_STEP_COMPILATIONS)):
            return step_fn(*args)

    return step


def sampling_inputs(sampled: bool, temperature, top_p, device: torch.device) -> tuple:
    """What a captured step reads its temperature and top_p from: for sampling, 0-d
    tensors that each call fills, so that one graph (and one compilation) serves every
    setting; a greedy step reads neither."""
    if not sampled:
        return (0.0, 1.0)
    return tuple(torch.tensor(value, dtype=torch.float32, device=device)
                 for value in (temperature, top_p))


def warm_up(step, device: torch.device) -> None:
    """Run `step` twice before capturing it in a CUDA graph (kernel selection, workspaces,
    compilation), on a side stream on CUDA, as capturing asks. Without moving the random
    generators: the step's draws (sampling) would otherwise advance them, so that the same
    seed gave other tokens when a call captured a graph than when it replayed one."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type != "cuda":
            for _ in range(2):
                step()
            return
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(device).wait_stream(side)


def record(step, capture: bool, pool) -> Tuple[tuple, Callable[[], None]]:
    """(outputs, replay): `step` captured in a CUDA graph in `pool` (or, without
    `capture`, run once); each replay runs it again on the static inputs and writes its
    outputs into the same tensors. GraphedDecoder's and chunk_steps.GraphedChunks'."""
    if not capture:
        with torch.random.fork_rng(devices=[]):  # capturing draws no random numbers
            outputs = step()

        def rerun():  # in the mode the step was traced in (see GraphedDecoder.capture)
            with torch.inference_mode(False), torch.no_grad():
                new = step()
            for out, value in zip(outputs, new):
                if out is not None:  # a chunk step may leave an output out
                    out.copy_(value)
        return outputs, rerun
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = step()
    return outputs, graph.replay


def batch_bucket(rows: int, max_batch_size: int) -> int:
    """Rows a graphed step runs for a batch of `rows`: the next power of two, at most
    max_batch_size. The padding costs little in a step that mostly reads weights, and
    batches of 5 to 8 prompts share one graph and one compilation: at most
    log2(max_batch_size) + 2 per kind of step instead of one per batch size. The padding
    rows draw random numbers too, so a padded batch samples other tokens than an eager
    run with the same seed (as reproducibly)."""
    bucket = 1
    while bucket < rows:
        bucket *= 2
    return min(bucket, max_batch_size)


class GraphedDecoder:
    """decode_step with fixed shapes, replayed from CUDA graphs captured on first use: one
    per (batch bucket, greedy or sampling), each over the whole cache.

    With `compile`, steps are first compiled by torch.compile (inductor fuses the small
    kernels of RMSNorm, RoPE and the cache update), and the compiled kernels are what the
    graph captures. Compiling takes a minute or more per graph the first time. Off CUDA
    (`capture` False) the same fixed-shape steps run directly, so that a compiled step
    compiles once per graph key there too (at the price of attending over the whole
    cache, masked)."""

    def __init__(self, model, compile: bool = False, capture: Optional[bool] = None):
        self.model = model
        self.graphs: Dict[tuple, Tuple[Callable[[], None], tuple, tuple]] = {}
        # Per graph, the batch size and sampling settings its inputs were last given: the
        # padding rows and the settings are written only when they change, not every token.
        self.last_call: Dict[tuple, tuple] = {}
        self.capture_graphs = model.rope.device.type == "cuda" if capture is None else capture
        # One memory pool shared by all graphs.
        self.pool = torch.cuda.graph_pool_handle() if self.capture_graphs else None
        self.step = compile_step() if compile else decode_step

    def __call__(self, tokens, positions: List[int], sampling: Sampling):
        temperature, top_p = sampling.temperature, sampling.top_p
        positions = to_device(positions, tokens.device)
        n = tokens.shape[0]
        rows = batch_bucket(n, self.model.params.max_batch_size)
        key = (rows, temperature > 0)
        if key not in self.graphs:
            if self.step is not decode_step and distributed.model_parallel_rank() == 0:
                print(f"(compiling the decode step for {rows} row(s), "
                      f"{'sampling' if temperature > 0 else 'greedy'}: once per batch bucket "
                      f"and kind, a minute or more for a 7B model)", file=sys.stderr, flush=True)
            padding = rows - n
            self.graphs[key] = self.capture(F.pad(tokens, (0, padding)),
                                            F.pad(positions, (0, padding)), temperature, top_p)
        replay, (static_tokens, static_positions, settings), outputs = self.graphs[key]
        static_tokens[:n].copy_(tokens)
        static_positions[:n].copy_(positions)
        last_rows, *last_settings = self.last_call.get(key, (0, None, None))
        # Padding rows decode at position 0 of cache rows that this batch does not use (a
        # generation's rows are the cache's first rows): one key to attend to. They are
        # zero from the capture on, until a larger batch writes some of them.
        if n < last_rows:
            static_positions[n:].zero_()
        if temperature > 0 and last_settings != [temperature, top_p]:
            settings[0].fill_(temperature)
            settings[1].fill_(top_p)
        self.last_call[key] = (n, temperature, top_p)
        replay()
        return tuple(t[:n].clone() for t in outputs)  # the next replay overwrites outputs

    def capture(self, tokens, positions, temperature, top_p):
        # Traced and captured under no_grad rather than inference_mode, which inductor
        # mishandles (pytorch/pytorch#180823); the model's parameters need no grad anyway.
        with torch.inference_mode(False), torch.no_grad():
            static_tokens = torch.empty_like(tokens).copy_(tokens)
            static_positions = torch.empty_like(positions).copy_(positions)
            settings = sampling_inputs(temperature > 0, temperature, top_p, tokens.device)
            whole_cache = self.model.params.max_seq_len
            step = lambda: self.step(  # noqa: E731
                self.model, static_tokens, static_positions, whole_cache, *settings)
            # The warm-up writes the same cache entries the real step writes.
            warm_up(step, tokens.device)
            outputs, replay = record(step, self.capture_graphs, self.pool)
        return replay, (static_tokens, static_positions, settings), outputs

