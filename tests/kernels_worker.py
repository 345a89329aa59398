"""Run by tests/test_kernels.py under TRITON_INTERPRET=1: Triton must know it is
interpreting before llama.kernels defines its kernels, so this runs in its own process.
Prints, as its last line, one JSON object of measurements for the test to check."""

import json
from unittest import mock

import torch
import torch.nn.functional as F

from llama import Llama, kernels


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


if __name__ == "__main__":
    results = {"errors": kernel_errors(), "runs": generation_with_and_without_kernel()}
    print("\n" + json.dumps(results))
