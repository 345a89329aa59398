"""Run by tests/test_kernels.py under TRITON_INTERPRET=1: Triton must know it is
interpreting before llama.kernels defines its kernels, so this runs in its own process.
Prints, as its last line, one JSON object of measurements for the test to check."""

import json
import os
import signal
import time
import traceback
from unittest import mock

import torch
import torch.nn.functional as F

from llama import Llama, allreduce, kernels, lookup_rounds
from llama.model import RMSNorm


def masked_reference(q, k, v, lengths):
    """SDPA with the mask decode_attention means: the last of a row's queries sees its
    first lengths[b] keys, each earlier query one fewer."""
    queries = q.shape[2]
    seen = lengths[:, None] - (queries - 1) + torch.arange(queries)  # (bsz, queries)
    mask = (torch.arange(k.shape[2]) < seen[..., None])[:, None]
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                          enable_gqa=True)


def kernel_errors():
    """Max error against SDPA with a mask, per (dtype, heads, kv_heads, lengths, split,
    queries per row)."""
    torch.manual_seed(0)
    errors = {}
    for dtype in (torch.float32, torch.float16):
        for heads, kv_heads, head_dim, lengths, split, block_n, programs, queries in [
            (4, 4, 32, [130, 5], 32, 16, 16, 1),       # no grouping; 2-3 blocks per program
            (8, 2, 16, [1, 64, 200], 64, 16, 1024, 1),  # groups of 4; one key; a whole block
            (16, 2, 16, [300, 299], 128, 32, 1024, 1),  # groups of 8 (34B/70B's ratio)
            # The cache is one block: normalised in the first kernel, no merge.
            (4, 4, 32, [130, 5], 256, 16, 16, 1),
            (16, 2, 16, [300, 1, 77], 512, 64, 1024, 1),
            # Several queries per row (verify steps). Lengths 130 in blocks of 32: the
            # last block holds keys only the last 2 of 8 queries see; length 8: the first
            # query sees one key.
            (4, 4, 32, [130, 8], 32, 16, 16, 8),
            (16, 2, 16, [300, 299], 128, 32, 1024, 5),  # 40 (query, head) rows: 8 warps
            (8, 2, 16, [16, 200], 64, 16, 1024, 16),    # the most queries taken
            (4, 4, 32, [130, 5], 256, 16, 16, 3),       # one block
        ]:
            bsz, max_len = len(lengths), 320
            # Views into a bigger cache (an extra row, more positions), as the model passes.
            cache_k = torch.randn(bsz + 1, kv_heads, max_len, head_dim, dtype=dtype)
            cache_v = torch.randn(bsz + 1, kv_heads, max_len, head_dim, dtype=dtype)
            kv_len = max(lengths) + 3
            k, v = cache_k[:bsz, :, :kv_len], cache_v[:bsz, :, :kv_len]
            q = torch.randn(bsz, queries, heads, head_dim, dtype=dtype).transpose(1, 2)
            n = torch.tensor(lengths)
            out = kernels.decode_attention(q, k, v, n, split=split, block_n=block_n,
                                            programs=programs)
            key = (f"{str(dtype)[6:]} heads={heads}/{kv_heads} lengths={lengths} split={split} "
                   f"programs={programs} queries={queries}")
            errors[key] = (out.float() - masked_reference(q, k, v, n)).abs().max().item()
            # The layout the output projection reads without a copy.
            assert out.dtype == dtype and out.shape == q.shape
            assert out.transpose(1, 2).is_contiguous()
    return errors


def generation_with_and_without_kernel():
    """Greedy tokens and log-probabilities of a ragged batch on the tiny model, decoded
    with the kernel (as on a GPU) and with SDPA, plainly and with prompt lookup (whose
    verify steps of 5 tokens per row go through the kernel too)."""
    gen = Llama.from_preset("tiny", max_seq_len=96, max_batch_size=3, device="cpu",
                            dtype=torch.float32)
    # Each prompt twice around its own greedy continuation: lookup finds the prompt's
    # last token earlier and proposes what followed it.
    bases = [[5, 9, 14, 3], list(range(20, 40)), [7]]
    continued, _ = gen.generate(bases, max_gen_len=12, temperature=0.0)
    prompts = [p + c + p for p, c in zip(bases, continued)]
    runs = {}
    for draft in (None, "lookup"):
        gen.configure(draft=draft, draft_tokens=4)
        for use_kernel in (False, True):
            with mock.patch.object(kernels, "available", lambda device, head_dim: use_kernel), \
                    mock.patch.object(kernels, "decode_attention",
                                      wraps=kernels.decode_attention) as spy:
                tokens, logprobs = gen.generate(prompts, max_gen_len=12, temperature=0.0,
                                                logprobs=True)
            queries = sorted({call.args[0].shape[2] for call in spy.call_args_list})
            stats = gen.engine.speculation.stats if draft else {}
            runs[f"{draft or 'plain'} {'kernel' if use_kernel else 'sdpa'}"] = {
                "tokens": tokens, "logprobs": logprobs, "kernel_calls": spy.call_count,
                "queries": queries, "proposed": stats.get("proposed", 0)}
    gen.configure(draft=None)
    return runs


def host_buffers(world: int, capacity: int, dim: int, dtype, shared=False):
    """What PeerBuffers.allocate makes on GPUs, as host tensors: every "rank's" buffer,
    all in this process (in shared memory with `shared`: forked processes see it at the
    same addresses)."""
    words = dim * dtype.itemsize // 4
    data = [torch.zeros(allreduce.SLOTS, capacity, world, words, dtype=torch.int64)
            for _ in range(world)]
    return [d.share_memory_() for d in data] if shared else data


def rank_buffers(data, rank: int, dim: int, dtype) -> allreduce.PeerBuffers:
    """Rank `rank`'s PeerBuffers over host_buffers' `data`."""
    table = torch.tensor([d.data_ptr() for d in data], dtype=torch.int64)
    epochs = torch.zeros(allreduce.SLOTS, data[0].shape[1], dtype=torch.int32)
    return allreduce.PeerBuffers(data[rank], epochs, table, rank, dim, dtype)


def stamped(values: torch.Tensor, epoch: int) -> torch.Tensor:
    """The words a rank writes for `values` (rows, dim) in call `epoch`, computed here
    independently of the kernel: the values' bits, 4 bytes per word, little end first,
    and the epoch in each word's upper 4 bytes."""
    if values.element_size() == 2:
        halves = values.view(torch.int16).to(torch.int64) & 0xFFFF
        bits = halves[..., 0::2] | (halves[..., 1::2] << 16)
    else:
        bits = values.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return bits | (epoch << 32)


def fused_inputs(dtype, dim: int, rows: int, seed: int):
    """Both ranks' partials, a residual and a norm, from a seed (so that every process
    can make them), and the expected (h, normed)."""
    gen = torch.Generator().manual_seed(seed)
    partials = [torch.randn(1, rows, dim, generator=gen).to(dtype) for _ in range(2)]
    residual = torch.randn(1, rows, dim, generator=gen).to(dtype)
    norm = RMSNorm(dim, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(dim, generator=gen) + 0.5)
        h = residual + (partials[0].float() + partials[1].float()).to(dtype)
        return partials, residual, norm, (h, norm(h))


def exchange_layout():
    """Rank 0 of MP=2, two calls on 3 rows of slot 1, finding rank 1's words in its
    buffer (as if rank 1 had run first): the words it writes into rank 1's buffer, its
    epochs, and its results."""
    dim, capacity, rows, slot = 80, 4, 3, 1
    cells = slice(slot * capacity, slot * capacity + rows)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        data = host_buffers(2, capacity, dim, dtype)
        peers = rank_buffers(data, 0, dim, dtype)
        words = [d.view(-1, 2, d.shape[-1])[cells] for d in data]  # (rows, source rank, w)
        runs = []
        for epoch in (1, 2):
            partials, residual, norm, (h_want, normed_want) = fused_inputs(dtype, dim, rows,
                                                                           seed=epoch)
            words[0][:, 1] = stamped(partials[1][0], epoch)  # rank 1's write
            h, normed = peers.sum_add_norm(partials[0], residual, norm.weight, norm.eps, slot)
            runs.append({
                "pushed": torch.equal(words[1][:, 0], stamped(partials[0][0], epoch)),
                "epochs": peers.epochs.tolist(),
                "h_error": (h.float() - h_want.float()).abs().max().item(),
                "normed_error": (normed.float() - normed_want.float()).abs().max().item(),
                "shapes": [list(h.shape), list(normed.shape)]})
        out[str(dtype)[6:]] = {
            "runs": runs,
            "other_slot_untouched": sum(d[1 - slot].abs().sum().item() for d in data)}
    return out


# (rows, slot) of the calls in concurrent_ranks: a forward pass of two layers at 3 rows,
# then one at 1 row, then one at 2.
CALLS = [(3, 0), (3, 1), (3, 0), (3, 1), (1, 0), (1, 1), (2, 0), (2, 1)]


def concurrent_ranks(timeout: float = 60.0):
    """MP=2 as two processes (forked), each running its rank's calls of CALLS through the
    kernel at the same time as the other, exchanging through shared memory; before each
    call one of them sleeps (each in turn), so the other must wait for its words. Each
    rank's results go into shared memory; a rank that never finishes ends by an alarm."""
    dim, capacity = 80, 4
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        data = host_buffers(2, capacity, dim, dtype, shared=True)
        results = torch.zeros(len(CALLS), 2, 2, capacity, dim).share_memory_()
        # When each rank started and finished each call (time.monotonic()).
        started, finished = (torch.zeros(2, len(CALLS), dtype=torch.float64).share_memory_()
                             for _ in range(2))
        pids = []
        for rank in range(2):
            pid = os.fork()
            if pid == 0:  # the rank's process
                status = 1
                signal.alarm(int(timeout))  # never outlives the test, even if it hangs
                try:
                    peers = rank_buffers(data, rank, dim, dtype)
                    for i, (rows, slot) in enumerate(CALLS):
                        partials, residual, norm, _want = fused_inputs(dtype, dim, rows, i)
                        if i % 2 == rank:
                            time.sleep(0.3)
                        started[rank, i] = time.monotonic()
                        h, normed = peers.sum_add_norm(partials[rank], residual, norm.weight,
                                                       norm.eps, slot)
                        finished[rank, i] = time.monotonic()
                        results[i, rank, 0, :rows] = h[0].float()
                        results[i, rank, 1, :rows] = normed[0].float()
                    status = 0
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(status)
            pids.append(pid)
        # A rank that hangs ends by its alarm: a non-zero status.
        exit_codes = [os.waitpid(pid, 0)[1] for pid in pids]
        errors, equal = [], True
        for i, (rows, _slot) in enumerate(CALLS):
            _, _, _, (h_want, normed_want) = fused_inputs(dtype, dim, rows, i)
            got = results[i, :, :, :rows]
            equal = equal and torch.equal(got[0], got[1])
            errors.append(max((got[0, 0] - h_want[0].float()).abs().max().item(),
                              (got[0, 1] - normed_want[0].float()).abs().max().item()))
        # Each call, how long the kernel took on the rank that did not sleep: it had to
        # wait for the sleeper's words (the sleeps are 0.3 s; a call takes far less).
        out[str(dtype)[6:]] = {
            "exit_codes": exit_codes,
            "ranks_equal": equal, "worst_error": max(errors),
            "waits": [(finished[1 - i % 2, i] - started[1 - i % 2, i]).item()
                      for i in range(len(CALLS))]}
    return out


def model_with_fused_sums():
    """The tiny model's forward pass through the fused kernel (one rank, host buffers)
    against the plain path: hidden states, and how many calls took the kernel."""
    gen = Llama.from_preset("tiny", max_seq_len=32, max_batch_size=2, device="cpu",
                            dtype=torch.float32)
    model = gen.model
    tokens = torch.tensor([[3, 8, 1, 9], [4, 4, 2, 7]])
    with torch.no_grad():
        plain = model.forward_hidden(tokens[:, :1], 0)
        dim = model.params.dim
        peers = rank_buffers(host_buffers(1, 2, dim, torch.float32), 0, dim, torch.float32)
        allreduce.install(model, peers)
        launches = []
        launch = allreduce.sum_add_norm

        def counted(*args):
            launches.append(args[0].shape)
            return launch(*args)

        with mock.patch.object(allreduce, "sum_add_norm", counted):
            fused = model.forward_hidden(tokens[:, :1], 0)
            decode_calls = len(launches)
            model.forward_hidden(tokens, 0)  # 8 rows: more than the buffers hold
            prefill_calls = len(launches) - decode_calls
        epochs_eager = peers.epochs.tolist()
        # Compiled, the op is opaque and declared pure: every call must still run once.
        compiled = torch.compile(model.forward_hidden, dynamic=False)(tokens[:, :1], 0)
        epochs_compiled = peers.epochs.tolist()
        allreduce.uninstall(model)
        unfused = model.forward_hidden(tokens[:, :1], 0)
    return {"error": (fused - plain).abs().max().item(), "decode_calls": decode_calls,
            "prefill_calls": prefill_calls, "epochs_eager": epochs_eager,
            "epochs_compiled": epochs_compiled,
            "compiled_error": (compiled - plain).abs().max().item(),
            "uninstalled_error": (unfused - plain).abs().max().item()}


def lookup_kernels():
    """lookup_rounds' Triton kernels against their PyTorch versions: rows of few distinct
    tokens (matches of every length) at every length from 0 to past one block, and
    appends that run into the cache end. Counts the rows that differ."""
    gen = torch.Generator().manual_seed(0)
    size, k = lookup_rounds.BLOCK + 40, 6
    history = torch.randint(0, 3, (4, size + 1), generator=gen)
    history[3] = torch.arange(size + 1)  # nothing repeats
    cases = differ = 0
    for length in list(range(0, 12)) + [lookup_rounds.BLOCK - 1, lookup_rounds.BLOCK,
                                        lookup_rounds.BLOCK + 3, size]:
        lengths = torch.tensor([length, max(length - 5, 0), length // 2, length])
        want = lookup_rounds.propose_torch(history, lengths, k)
        got = lookup_rounds.propose_triton(history, lengths, k)
        cases += 1
        differ += int(not all(torch.equal(a, b) for a, b in zip(got, want)))
        tokens = torch.randint(0, 9, (4, k + 1), generator=gen)
        counts = torch.tensor([1, k + 1, 3, 2])
        mine, theirs = history.clone(), history.clone()
        mine_len, their_len = lengths.clone(), lengths.clone()
        lookup_rounds.append_triton(mine, mine_len, tokens, counts)
        lookup_rounds.append_torch(theirs, their_len, tokens, counts)
        cases += 1
        differ += int(not (torch.equal(mine[:, :size], theirs[:, :size])
                           and torch.equal(mine_len, their_len)))
    return {"cases": cases, "differ": differ,
            "found": int((lookup_rounds.propose_torch(history, torch.full((4,), 50), k)[1]
                          > 0).sum())}


if __name__ == "__main__":
    # A kernel that waits forever ends this process (and so the test) instead.
    signal.alarm(400)
    results = {"errors": kernel_errors(), "runs": generation_with_and_without_kernel(),
               "exchange": exchange_layout(), "concurrent": concurrent_ranks(),
               "model": model_with_fused_sums(), "lookup": lookup_kernels()}
    print("\n" + json.dumps(results))
