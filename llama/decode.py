"""The per-token step of generation: choose the next tokens from logits, and run one
decode step of the model followed by that choice, either plainly or replayed from a CUDA
graph.

At batch 1 an eager 7B decode step is ~1,600 small kernels (about 50 per layer) whose
launch cost alone exceeds the time the GPU needs to read the weights. A CUDA graph
launches them all at once. Graphs need fixed shapes. With the Triton decode attention
(kernels.py), which reads each row's length from the device, one graph spans the whole
cache and serves every context length: one graph (and one compilation) per batch size
for greedy steps and one for sampling steps, whatever their temperature and top_p. Without
it, each graph attends over a fixed number of cache positions (a bucket at least as large
as the longest row, see kv_bucket) and masks the positions a row has not reached.
"""

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch._dynamo
import torch._inductor.config as inductor_config
import torch.nn.functional as F

from . import kernels

# Buckets, for CUDA without Triton (with it, a graph spans the whole cache; see above).
MIN_BUCKET = 512  # one bucket covers short chats: fewer graphs and compilations
# Buckets double up to this length, then grow in steps of LONG_BUCKET_STEP, so that a
# long context reads at most that many padded positions (8k of 100k, not 28k). Compiled
# steps are compiled for the doubling buckets only: one compilation per long bucket would
# cost more than it saves, and there a step is mostly attention over the cache.
MAX_COMPILED_BUCKET = 16384
LONG_BUCKET_STEP = 8192


def sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling: draw from the smallest set of most likely tokens whose mass
    reaches p (the most likely token is always kept). probs: (bsz, vocab) -> (bsz, 1).

    The draw is an exponential race (argmax of prob / Exp(1) noise), which picks token i
    with probability proportional to its kept mass, like torch.multinomial, but without
    a host synchronisation, so it can live inside a CUDA graph."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before > p, 0.0)
    noise = torch.empty_like(sorted_probs).exponential_(1)
    choice = torch.argmax(sorted_probs / noise, dim=-1, keepdim=True)
    return torch.gather(order, -1, choice)


def pick(logits: torch.Tensor, temperature, top_p):
    """Next tokens (bsz,) from float32 logits (bsz, vocab): greedy when temperature is a
    number <= 0, else top-p sampling at that temperature; and each chosen token's
    log-probability under the unscaled distribution. For sampling, temperature and top_p
    may be 0-d tensors: a compiled step then takes them as inputs instead of compiling
    their values in, and serves every setting."""
    if isinstance(temperature, torch.Tensor) or temperature > 0:
        tokens = sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p)[:, 0]
    else:
        tokens = torch.argmax(logits, dim=-1)
    logprobs = F.log_softmax(logits, dim=-1).gather(-1, tokens[:, None])[:, 0]
    return tokens, logprobs


def decode_step(model, tokens, positions, kv_len: int, temperature: float, top_p: float):
    """Feed one token per row at its own position; return the next (tokens, logprobs)."""
    hidden = model.forward_hidden(tokens[:, None], positions, kv_len=kv_len)
    return pick(model.output(hidden[:, 0]).float(), temperature, top_p)


def to_device(values: List[int], device: torch.device) -> torch.Tensor:
    """A short list as a tensor on `device`, queued behind the work already launched there
    instead of waiting for it: a copy from ordinary (pageable) host memory synchronises
    the CUDA stream, a copy from pinned memory does not."""
    if device.type != "cuda":
        return torch.tensor(values, device=device)
    return torch.tensor(values, pin_memory=True).to(device, non_blocking=True)


class HostCopy:
    """Small device tensors on their way to the host. The copies are queued now, behind the
    step that computes the tensors; wait() waits for those copies only, not for steps
    launched after them."""

    def __init__(self, *tensors: torch.Tensor):
        self.host, self.done = tensors, None  # off CUDA, the tensors are ready as they are
        if tensors[0].is_cuda:
            self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                         .copy_(t, non_blocking=True) for t in tensors]
            self.done = torch.cuda.Event()
            # The copies run on the stream of the tensors' device, which need not be the
            # current device.
            self.done.record(torch.cuda.current_stream(tensors[0].device))

    def wait(self) -> List[list]:
        """The tensors as (nested) lists."""
        if self.done is not None:
            self.done.synchronize()
        return [t.tolist() for t in self.host]


def kv_bucket(kv_len: int, max_seq_len: int) -> int:
    """Cache positions a graphed step attends over: kv_len rounded up (see above)."""
    if kv_len > MAX_COMPILED_BUCKET:
        bucket = -(-kv_len // LONG_BUCKET_STEP) * LONG_BUCKET_STEP
    else:
        bucket = MIN_BUCKET
        while bucket < kv_len:
            bucket *= 2
    return min(bucket, max_seq_len)


# Compilations of decode_step allowed in one process (dynamo's default is 8 per function).
MAX_STEP_COMPILATIONS = 64

# torch._inductor settings of compiled decode steps. Coordinate-descent tuning of the
# generated kernels' launch settings (done in the first call of each kernel): +6% tokens/s
# for 7B at batch 1. With it, inductor also turns batch-1 matrix products into its own
# reductions instead of cuBLAS calls, which lets it fuse the work around them.
COMPILE_SETTINGS = {"coordinate_descent_tuning": True}


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
    options = {**COMPILE_SETTINGS, **(settings or {})}
    check_inductor_settings(options)
    compiled = torch.compile(decode_step, dynamic=False, options=options)

    def step(*args):
        # Every batch size, greedy or sampling (and bucket, without Triton) compiles
        # decode_step once more. Past dynamo's default limit of 8 compilations per function
        # the step would quietly run uncompiled; compile those too, as configure(compile=
        # True) promises. (Graphs call this only while capturing: no cost per token.)
        with torch._dynamo.config.patch(recompile_limit=max(
                torch._dynamo.config.recompile_limit, MAX_STEP_COMPILATIONS)):
            return compiled(*args)

    return step


def warm_up(step, device: torch.device, runs: int = 2) -> None:
    """Run `step` before capturing it in a CUDA graph (kernel selection, workspaces,
    compilation), on a side stream on CUDA, as capturing asks. Without moving the random
    generators: the step's draws (sampling) would otherwise advance them, so that the same
    seed gave other tokens when a call captured a graph than when it replayed one."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type != "cuda":
            for _ in range(runs):
                step()
            return
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(runs):
                step()
        torch.cuda.current_stream(device).wait_stream(side)


def batch_bucket(rows: int, max_batch_size: int) -> int:
    """Rows a graphed step runs for a batch of `rows`: the next power of two, at most
    max_batch_size. The padding costs little in a step that mostly reads weights, and
    batches of 5 to 8 prompts share one graph and one compilation (minutes for 13B):
    at most log2(max_batch_size) + 2 per kind of step instead of one per batch size.
    The padding rows draw random numbers too, so a padded batch samples other tokens than
    an eager run with the same seed (as reproducibly)."""
    bucket = 1
    while bucket < rows:
        bucket *= 2
    return min(bucket, max_batch_size)


class GraphedDecoder:
    """decode_step replayed from CUDA graphs captured on first use.

    With `compile`, steps are first compiled by torch.compile (inductor fuses the ~50
    small kernels per layer of RMSNorm, RoPE and the cache update into a few), and the
    compiled kernels are what the graph captures; `inductor` updates COMPILE_SETTINGS for
    them. Compiling takes about a minute for 7B and up to three for 13B (on an H200
    machine) per batch bucket (batch_bucket) the first time, for greedy and for sampled
    steps (per cache bucket up to MAX_COMPILED_BUCKET without Triton)."""

    def __init__(self, model, compile: bool = False, inductor: Optional[dict] = None):
        self.model = model
        # Attention reads each row's length from the device: graphs span the whole cache.
        self.whole_cache = kernels.available(model.rope.device, model.params.head_dim)
        self.graphs: Dict[tuple, Tuple[Callable[[], None], tuple, tuple]] = {}
        # Per graph, the batch size and sampling settings its inputs were last given: the
        # padding rows and the settings are written only when they change, not every token.
        self.last_call: Dict[tuple, tuple] = {}
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool shared by all graphs
        self.compiled = compile_step(inductor) if compile else None

    def usable(self, kv_len: int) -> bool:
        return kv_len <= self.model.params.max_seq_len

    def __call__(self, tokens, positions, kv_len: int, temperature: float, top_p: float):
        max_seq_len = self.model.params.max_seq_len
        bucket = max_seq_len if self.whole_cache else kv_bucket(kv_len, max_seq_len)
        n = tokens.shape[0]
        rows = batch_bucket(n, self.model.params.max_batch_size)
        key = (rows, bucket, temperature > 0)
        if key not in self.graphs:
            padding = rows - n
            self.graphs[key] = self.capture(F.pad(tokens, (0, padding)),
                                            F.pad(positions, (0, padding)), bucket,
                                            temperature, top_p)
        replay, (static_tokens, static_positions, sampling), outputs = self.graphs[key]
        static_tokens[:n].copy_(tokens)
        static_positions[:n].copy_(positions)
        last_rows, *last_settings = self.last_call.get(key, (0, None, None))
        # Padding rows decode at position 0 of cache rows that this batch does not use (a
        # generation's rows are the cache's first rows): one key to attend to. They are
        # zero from the capture on, until a larger batch writes some of them.
        if n < last_rows:
            static_positions[n:].zero_()
        if temperature > 0 and last_settings != [temperature, top_p]:
            sampling[0].fill_(temperature)
            sampling[1].fill_(top_p)
        self.last_call[key] = (n, temperature, top_p)
        replay()
        return tuple(t[:n].clone() for t in outputs)  # the next replay overwrites outputs

    def capture(self, tokens, positions, bucket, temperature, top_p):
        # Traced and captured under no_grad rather than inference_mode, which inductor
        # mishandles (pytorch/pytorch#180823); the model's parameters need no grad anyway.
        with torch.inference_mode(False), torch.no_grad():
            static_tokens = torch.empty_like(tokens).copy_(tokens)
            static_positions = torch.empty_like(positions).copy_(positions)
            # A sampling step reads its temperature and top_p from tensors that each call
            # fills, so that one graph (and one compilation: recompiling 13B takes minutes)
            # serves all settings; a greedy step reads neither.
            sampling = (0.0, 1.0)
            if temperature > 0:
                sampling = tuple(torch.tensor(value, dtype=torch.float32, device=tokens.device)
                                 for value in (temperature, top_p))
            fn = decode_step
            if self.compiled is not None and (self.whole_cache or bucket <= MAX_COMPILED_BUCKET):
                fn = self.compiled
            step = lambda: fn(  # noqa: E731
                self.model, static_tokens, static_positions, bucket, *sampling)
            # The warm-up writes the same cache entries the real step writes.
            warm_up(step, tokens.device)
            outputs, replay = self.record(step)
        return replay, (static_tokens, static_positions, sampling), outputs

    def record(self, step):
        """(outputs, replay): `step` captured in a CUDA graph; each replay runs it again
        on the static inputs and writes its outputs into the same tensors."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = step()
        return outputs, graph.replay
