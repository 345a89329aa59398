"""Prompt-lookup rounds that run on the device, so that the host never waits between them.

With the host's lookup (drafting.LookupSession) a round cannot start before the host has
read the previous round's tokens, since the proposal continues them: the host copies the
tokens out, looks up the next proposal, copies it in and launches the verify while the
GPU idles. For a small model, or any model at batch 1 whose step is short, that wait is a
large share of the round. Here each cache row's tokens so far are also kept on the
device, and one step runs a whole round there: the lookup (`propose`, LookupSession's
rule), the verify, the acceptance, and the accepted tokens appended (`append`). Round
r + 1 is then launched before round r's tokens are read, as plain decode steps are
(Engine._steps), and the host's work overlaps the GPU's.

The round runs with fixed shapes beside the verify steps of chunk_steps.GraphedChunks,
with that runner's settings: captured in a CUDA graph in its memory pool, compiled first
under decode="compiled", run directly (not captured) off CUDA. speculative.Speculation
uses it for "lookup" when the verify runs that way, while the lookup keeps finding
proposals and every live row has room in the KV cache for the rounds in flight and the
next; its other rounds run from the host.
"""

import functools
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from .chunk_steps import GraphedChunks, pad_rows
from .engine import HostCopy
from .graphs import batch_bucket, record, sampling_inputs, to_device, warm_up

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch versions below run everywhere
    triton = None

# drafting.LOOKUP_NGRAMS: the last 3 tokens, else 2, else 1 (the Triton kernel compares
# three tokens by name; tests check both versions against LookupSession).
LONGEST_MATCH = 3
BLOCK = 1024  # positions the Triton lookup compares per iteration


def propose(history: torch.Tensor, lengths: torch.Tensor, k: int):
    """drafting.LookupSession's proposals for every row at once, on the device.

    history (rows, S + 1): row i's tokens in its first lengths[i] columns (the last
    column is `append`'s scratch). Returns (chunk (rows, k + 1), counts (rows,)): each
    row's last token, then the tokens after the latest earlier occurrence of its last 3
    tokens, else 2, else 1, of which the first counts[i] are real (0 where nothing
    matched). On CUDA one Triton kernel, as a CUDA graph of `propose_torch`'s ~40 small
    operations spends ~0.1 ms on them; compiled, `propose_torch`, which inductor fuses."""
    if fast_kernels(history):
        return propose_triton(history, lengths, k)
    return propose_torch(history, lengths, k)


def append(history: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor,
           counts: torch.Tensor) -> None:
    """Write each row's first counts[i] `tokens` after its last one and advance lengths, in
    place. What would fall past the cache (rows that finished on the host and ran on)
    goes to the scratch column, which the lookup never reads."""
    if fast_kernels(history):
        append_triton(history, lengths, tokens, counts)
    else:
        append_torch(history, lengths, tokens, counts)


def fast_kernels(history: torch.Tensor) -> bool:
    return history.is_cuda and triton is not None and not torch.compiler.is_compiling()


def propose_torch(history: torch.Tensor, lengths: torch.Tensor, k: int):
    rows, size = history.shape[0], history.shape[1] - 1
    seen, ends = history[:, :size], lengths[:, None]
    device = history.device
    back = torch.arange(1, LONGEST_MATCH + 1, device=device)
    tail = seen.gather(1, (ends - back).clamp(min=0))  # the last token, the one before, ...
    equal = F.pad((seen[:, None, :] == tail[:, :, None]).to(torch.int8), (LONGEST_MATCH, 0))
    # level[t]: how many of the row's last tokens (up to 3) stand, in order, just before
    # position t. Column c of `equal` holds position c - 3, so position t - 1 - j of
    # tail token j sits at column t + 2 - j.
    run = torch.ones((rows, size), dtype=torch.int8, device=device)
    level = torch.zeros((rows, size), dtype=torch.long, device=device)
    for j in range(LONGEST_MATCH):
        start = LONGEST_MATCH - 1 - j
        run = run * equal[:, j, start:start + size]
        level = level + run
    # The match must end before the row's end (t <= length - 1), and a suffix of n tokens
    # needs a token before it (n < length), as in LookupSession.
    level = torch.minimum(level, ends - 1)
    positions = torch.arange(size, device=device)
    score = torch.where((level > 0) & (positions < ends), level * (size + 1) + positions, -1)
    best = score.amax(dim=1)  # longest match first, then the latest
    start = best.clamp(min=0) % (size + 1)
    counts = torch.where(best >= 0, (lengths - start).clamp(max=k), 0)
    last = (lengths - 1).clamp(min=0)[:, None]
    offsets = torch.arange(k, device=device)
    drafts = seen.gather(1, (start[:, None] + offsets).clamp(max=size - 1))
    return torch.cat([seen.gather(1, last), drafts], dim=1), counts


def append_torch(history, lengths, tokens, counts) -> None:
    size, width = history.shape[1] - 1, tokens.shape[1]
    offsets = torch.arange(width, device=history.device)
    columns = lengths[:, None] + offsets
    keep = (offsets < counts[:, None]) & (columns < size)
    history.scatter_(1, torch.where(keep, columns, size), tokens)
    lengths.copy_((lengths + counts).clamp(max=size))


def propose_triton(history: torch.Tensor, lengths: torch.Tensor, k: int):
    rows, size = history.shape[0], history.shape[1] - 1
    chunk = torch.empty((rows, k + 1), dtype=history.dtype, device=history.device)
    counts = torch.empty_like(lengths)
    _propose[(rows,)](history, lengths, chunk, counts, history.stride(0), size, k,
                      BLOCK=BLOCK, WIDTH=triton.next_power_of_2(k + 1), num_warps=4)
    return chunk, counts


def append_triton(history, lengths, tokens, counts) -> None:
    size, width = history.shape[1] - 1, tokens.shape[1]
    _append[(history.shape[0],)](history, lengths, tokens, counts, history.stride(0),
                                 tokens.stride(0), size, width,
                                 WIDTH=triton.next_power_of_2(width), num_warps=1)


if triton is not None:

    @triton.jit
    def _propose(history_ptr, lengths_ptr, chunk_ptr, counts_ptr, stride, size, k,
                 BLOCK: tl.constexpr, WIDTH: tl.constexpr):
        # One program per row: propose_torch's rule, a block of positions at a time.
        row = tl.program_id(0)
        base = history_ptr + row * stride
        length = tl.load(lengths_ptr + row)
        last = tl.load(base + tl.maximum(length - 1, 0))
        before = tl.load(base + tl.maximum(length - 2, 0))
        third = tl.load(base + tl.maximum(length - 3, 0))
        best = tl.full([BLOCK], -1, tl.int64)
        for first in range(0, length, BLOCK):
            t = first + tl.arange(0, BLOCK)
            inside = t < length
            # Tokens are >= 0: the masked loads' -1 matches nothing.
            m1 = tl.load(base + t - 1, mask=inside & (t >= 1), other=-1) == last
            m2 = m1 & (tl.load(base + t - 2, mask=inside & (t >= 2), other=-1) == before)
            m3 = m2 & (tl.load(base + t - 3, mask=inside & (t >= 3), other=-1) == third)
            level = m1.to(tl.int64) + m2.to(tl.int64) + m3.to(tl.int64)
            level = tl.minimum(level, length - 1)
            score = tl.where(inside & (level > 0), level * (size + 1) + t, -1)
            best = tl.maximum(best, score)
        top = tl.max(best, axis=0)
        start = tl.where(top >= 0, top % (size + 1), 0)
        count = tl.where(top >= 0, tl.minimum(length - start, k), 0)
        j = tl.arange(0, WIDTH)
        source = tl.where(j == 0, tl.maximum(length - 1, 0), start + j - 1)
        tokens = tl.load(base + tl.minimum(source, size - 1), mask=j <= k, other=0)
        tl.store(chunk_ptr + row * (k + 1) + j, tokens, mask=j <= k)
        tl.store(counts_ptr + row, count)

    @triton.jit
    def _append(history_ptr, lengths_ptr, tokens_ptr, counts_ptr, stride, tokens_stride,
                size, width, WIDTH: tl.constexpr):
        row = tl.program_id(0)
        length = tl.load(lengths_ptr + row)
        count = tl.load(counts_ptr + row)
        j = tl.arange(0, WIDTH)
        tokens = tl.load(tokens_ptr + row * tokens_stride + j, mask=j < width, other=0)
        keep = (j < count) & (length + j < size)
        tl.store(history_ptr + row * stride + length + j, tokens, mask=keep)
        tl.store(lengths_ptr + row, tl.minimum(length + count, size))


class DeviceRounds:
    """Every cache row's tokens so far on the device, and the round step `step(model,
    history, lengths, kv_len, temperature, top_p)` captured once per (rows bucket, greedy
    or sampled) with `chunks`' settings. Its outputs: (tokens, logprobs, counts,
    n_drafted), as a verify's plus each row's number of proposals."""

    def __init__(self, chunks: GraphedChunks, step: Callable):
        self.chunks, self.step = chunks, step
        params, device = chunks.model.params, chunks.model.rope.device
        self.max_batch_size, self.size = params.max_batch_size, params.max_seq_len
        with torch.inference_mode(False):  # the captured step updates them in place
            self.history = torch.zeros((self.max_batch_size, self.size + 1),
                                       dtype=torch.long, device=device)
            self.lengths = torch.zeros(self.max_batch_size, dtype=torch.long, device=device)
        self.graphs = {}
        self.current = None  # (replay, outputs, real rows) of the generation's rounds

    def begin(self, history: List[List[int]], synced: List[int], temperature: float,
              top_p: float, then: Optional[torch.Tensor] = None) -> None:
        """Get ready to launch rounds for rows with these tokens so far, of which the
        device holds the first synced[i] already (updated here), followed by the tokens
        `then` (one per row, on the device) if given."""
        n = len(history)
        rows = batch_bucket(n, self.max_batch_size)
        device = self.history.device
        new = [(i, j, h[j]) for i, h in enumerate(history) for j in range(synced[i], len(h))]
        if new:
            where = to_device(list(zip(*new)), device)
            self.history[where[0], where[1]] = where[2]
        synced[:] = [len(h) for h in history]
        # Padding rows restart at position 0 of cache rows this generation leaves alone.
        lengths = to_device([len(h) for h in history] + [0] * (rows - n), device)
        self.lengths[:rows] = lengths
        sampled = temperature > 0
        key = (rows, sampled)
        if key not in self.graphs:
            # Capturing runs the step (twice, warming up) from these lengths, so it
            # writes each row's cache at its last token's position or later, which the
            # real rounds rewrite before reading; it moves the lengths on: reset them.
            self.graphs[key] = self.capture(rows, sampled)
            self.lengths[:rows] = lengths
        if then is not None:
            one = torch.ones(rows, dtype=torch.long, device=device)
            append(self.history[:rows], self.lengths[:rows], pad_rows(then[:, None], rows), one)
        replay, outputs, settings = self.graphs[key]
        if sampled:
            settings[0].fill_(temperature)
            settings[1].fill_(top_p)
        self.current = (replay, outputs, n)

    def launch(self) -> HostCopy:
        """One round; its results on their way to the host."""
        replay, outputs, n = self.current
        replay()
        return HostCopy(*(out[:n] for out in outputs))

    def capture(self, rows: int, sampled: bool):
        chunks, device = self.chunks, self.history.device
        with torch.inference_mode(False), torch.no_grad():  # as GraphedChunks.capture
            settings = sampling_inputs(sampled, 1.0, 1.0, device)  # filled by each round
            step_fn = chunks.step_fn(self.step)
            history, lengths = self.history[:rows], self.lengths[:rows]
            step = functools.partial(step_fn, chunks.model, history, lengths, self.size,
                                     *settings)
            warm_up(step, device)
            outputs, replay = record(step, chunks.capture_graphs, chunks.pool)
        return replay, outputs, settings
