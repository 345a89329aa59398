"""Run by tests/test_kernels.py under TRITON_INTERPRET=1: Triton must know it is
interpreting before llama.kernels defines its kernels, so this runs in its own process.
Prints, as its last line, one JSON object of measurements for the test to check."""

import json
from unittest import mock

import torch
import torch.nn.functional as F

from llama import Llama, allreduce, kernels
from llama.model import RMSNorm


def masked_reference(q, k, v, lengths):
    mask = (torch.arange(k.shape[2]) < lengths[:, None])[:, None, None]
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                          enable_gqa=True)


def kernel_errors():
    """Max error against SDPA with a mask, per (dtype, heads, kv_heads, lengths, split)."""
    torch.manual_seed(0)
    errors = {}
    for dtype in (torch.float32, torch.float16):
        for heads, kv_heads, head_dim, lengths, split, block_n, programs in [
            (4, 4, 32, [130, 5], 32, 16, 16),       # no grouping; 2-3 blocks per program
            (8, 2, 16, [1, 64, 200], 64, 16, 1024),  # groups of 4; one key; a whole block
            (16, 2, 16, [300, 299], 128, 32, 1024),  # groups of 8 (34B/70B's ratio)
            # The cache is one block: normalised in the first kernel, no merge.
            (4, 4, 32, [130, 5], 256, 16, 16),
            (16, 2, 16, [300, 1, 77], 512, 64, 1024),
        ]:
            bsz, max_len = len(lengths), 320
            # Views into a bigger cache (an extra row, more positions), as the model passes.
            cache_k = torch.randn(bsz + 1, kv_heads, max_len, head_dim, dtype=dtype)
            cache_v = torch.randn(bsz + 1, kv_heads, max_len, head_dim, dtype=dtype)
            kv_len = max(lengths) + 3
            k, v = cache_k[:bsz, :, :kv_len], cache_v[:bsz, :, :kv_len]
            q = torch.randn(bsz, 1, heads, head_dim, dtype=dtype).transpose(1, 2)
            n = torch.tensor(lengths)
            out = kernels.decode_attention(q, k, v, n, split=split, block_n=block_n,
                                            programs=programs)
            key = (f"{str(dtype)[6:]} heads={heads}/{kv_heads} lengths={lengths} split={split} "
                   f"programs={programs}")
            errors[key] = (out.float() - masked_reference(q, k, v, n)).abs().max().item()
            assert out.dtype == dtype and out.shape == q.shape
    return errors


def generation_with_and_without_kernel():
    """Greedy tokens and log-probabilities of a ragged batch on the tiny model, decoded
    with the kernel (as on a GPU) and with SDPA."""
    gen = Llama.from_preset("tiny", max_seq_len=96, max_batch_size=3, device="cpu",
                            dtype=torch.float32)
    prompts = [[5, 9, 14, 3], list(range(20, 60)), [7]]
    runs = {}
    for use_kernel in (False, True):
        with mock.patch.object(kernels, "available", lambda device, head_dim: use_kernel), \
                mock.patch.object(kernels, "decode_attention",
                                  wraps=kernels.decode_attention) as spy:
            tokens, logprobs = gen.generate(prompts, max_gen_len=12, temperature=0.0,
                                            logprobs=True)
        runs["kernel" if use_kernel else "sdpa"] = {
            "tokens": tokens, "logprobs": logprobs, "kernel_calls": spy.call_count}
    return runs


def host_buffers(world: int, capacity: int, dim: int, dtype, rank: int):
    """What PeerBuffers.allocate makes on GPUs, as host tensors: every "rank's" buffers
    live in this process, and the address tables point at them."""
    data = [torch.zeros(allreduce.SLOTS, capacity, world, dim, dtype=dtype)
            for _ in range(world)]
    flags = [torch.zeros(allreduce.SLOTS, capacity, world, dtype=torch.int32)
             for _ in range(world)]
    table = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64)  # noqa
    return data, flags, allreduce.PeerBuffers(data[rank], flags[rank], table(data),
                                              table(flags), rank)


def two_rank_exchange():
    """Both ranks of MP=2 in turn, on 3 rows of slot 1: rank 0 finds rank 1's partial
    and flag in its memory (as if rank 1 had run first), then rank 1 runs."""
    torch.manual_seed(0)
    dim, capacity, rows, slot = 80, 4, 3, 1
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        data, flags, peers0 = host_buffers(2, capacity, dim, dtype, rank=0)
        peers1 = allreduce.PeerBuffers(data[1], flags[1], peers0.data_ptrs, peers0.flag_ptrs, 1)
        partials = [torch.randn(1, rows, dim, dtype=dtype) for _ in range(2)]
        residual = torch.randn(1, rows, dim, dtype=dtype)
        norm = RMSNorm(dim, eps=1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(dim) + 0.5)
            expect_h = residual + (partials[0].float() + partials[1].float()).to(dtype)
            expect_normed = norm(expect_h)
        cells = slice(slot * capacity, slot * capacity + rows)
        entries = [d.view(-1, 2, dim)[cells] for d in data]  # (rows, source rank, dim)
        entries[0][:, 1] = partials[1][0]  # rank 1 pushed its partial to rank 0 ...
        flags[0].view(-1, 2)[cells, 1] = 1  # ... and raised its flag there
        h0, normed0 = peers0.sum_add_norm(partials[0], residual, norm.weight, norm.eps, slot)
        after_rank0 = {"signalled_peer": flags[1].view(-1, 2)[cells, 0].tolist(),
                       "own_flags": flags[0].view(-1, 2)[cells, 1].tolist(),
                       "pushed": torch.equal(entries[1][:, 0], partials[0][0])}
        h1, normed1 = peers1.sum_add_norm(partials[1], residual, norm.weight, norm.eps, slot)
        out[str(dtype)[6:]] = {
            **after_rank0,
            "flags_after_both": [f.sum().item() for f in flags],
            "ranks_equal": torch.equal(h0, h1) and torch.equal(normed0, normed1),
            "h_error": (h0.float() - expect_h.float()).abs().max().item(),
            "normed_error": (normed0.float() - expect_normed.float()).abs().max().item(),
            "shapes": [list(h0.shape), list(normed0.shape)],
            "other_slot_untouched": sum(d[1 - slot].abs().sum().item() for d in data),
        }
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
        _, _, model.peers = host_buffers(1, 2, model.params.dim, torch.float32, rank=0)
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
        model.peers = None
    return {"error": (fused - plain).abs().max().item(), "decode_calls": decode_calls,
            "prefill_calls": prefill_calls}


if __name__ == "__main__":
    results = {"errors": kernel_errors(), "runs": generation_with_and_without_kernel(),
               "exchange": two_rank_exchange(), "model": model_with_fused_sums()}
    print("\n" + json.dumps(results))
