"""Run by tests/test_kernels.py under TRITON_INTERPRET=1: Triton must know it is
interpreting before llama.kernels defines its kernels, so this runs in its own process.
Prints, as its last line, one JSON object of measurements for the test to check."""

import json
from unittest import mock

import torch
import torch.nn.functional as F

from llama import Llama, kernels, matvec


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


def matvec_reference(x, weight, norm_weight=None, eps=1e-5, residual=None, swiglu=False):
    x = x.float()
    if norm_weight is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    y = F.linear(x, weight.float())
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y if residual is None else y + residual.float()


def matvec_errors():
    """Max error of matvec against float32 PyTorch, relative to the largest output, per
    (dtype, rows, shape, fused operation); K and N not multiples of the block sizes."""
    torch.manual_seed(0)
    errors = {}
    for dtype in (torch.float32, torch.float16):
        for rows, features, outputs in [(1, 200, 48), (3, 96, 20)]:
            x = torch.randn(rows, features, dtype=dtype)
            weight = (torch.randn(outputs, features) / features ** 0.5).to(dtype)
            fused = dict(plain={}, norm=dict(norm_weight=(torch.rand(features) + 0.5).to(dtype),
                                             eps=1e-5),
                         residual=dict(residual=torch.randn(rows, outputs, dtype=dtype)))
            fused["norm_swiglu"] = dict(fused["norm"], swiglu=True)
            for name, kwargs in fused.items():
                got = matvec.matvec(x, weight, block_n=8, block_k=64, **kwargs)
                want = matvec_reference(x, weight, **kwargs)
                assert got.dtype == dtype and got.shape == want.shape, (got.shape, want.shape)
                key = f"{str(dtype)[6:]} rows={rows} {outputs}x{features} {name}"
                errors[key] = ((got.float() - want).abs().max() / want.abs().max()).item()
    return errors


def generation_runs():
    """Greedy tokens and log-probabilities of a ragged batch on the tiny model, decoded
    with SDPA and unfused layers, with the attention kernel (as on a GPU), and with the
    attention kernel plus fused weights through the matvec kernels (also as on a GPU)."""
    gen = Llama.from_preset("tiny", max_seq_len=96, max_batch_size=3, device="cpu",
                            dtype=torch.float32)
    prompts = [[5, 9, 14, 3], list(range(20, 60)), [7]]
    few_rows = lambda x: x.numel() // x.shape[-1] <= matvec.MAX_ROWS  # noqa: E731
    runs = {}
    for name in ("sdpa", "kernel", "matvec"):
        if name == "matvec":
            gen.model.fuse()
        with mock.patch.object(kernels, "available", lambda device, head_dim: name != "sdpa"), \
                mock.patch.object(matvec, "usable", few_rows if name == "matvec" else
                                  lambda x: False), \
                mock.patch.object(kernels, "decode_attention",
                                  wraps=kernels.decode_attention) as attention, \
                mock.patch.object(matvec, "matvec", wraps=matvec.matvec) as products:
            tokens, logprobs = gen.generate(prompts, max_gen_len=12, temperature=0.0,
                                            logprobs=True)
        runs[name] = {"tokens": tokens, "logprobs": logprobs,
                      "kernel_calls": attention.call_count, "matvec_calls": products.call_count}
    return runs


if __name__ == "__main__":
    results = {"errors": kernel_errors(), "matvec_errors": matvec_errors(),
               "runs": generation_runs()}
    print("\n" + json.dumps(results))
