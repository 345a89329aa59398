"""Attention of one decoding query over a long KV cache, kernel by kernel: PyTorch's SDPA
(whatever backend it picks) over exactly the cached length, SDPA and
llama.model.attend_one_query over a longer span of the cache with a mask (what a CUDA
graph of fixed shape must do without a length-aware kernel), and the Triton kernel of
llama/kernels.py, which reads the length from the device, in several launch settings.
Prints microseconds and the bandwidth reached on the cache (keys + values read once),
and writes JSON. Used to choose kernels.SPLIT / BLOCK_N.

    python benchmarks/decode_attention.py --lens 4096,16384,100000 --span 131072 --out attn.json
"""

import json
import sys
import time
from pathlib import Path

import fire
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama.kernels import decode_attention  # noqa: E402
from llama.model import attend_one_query  # noqa: E402

SHAPES = {"7b": (32, 32), "34b": (64, 8)}  # (query heads, key/value heads) at MP=1


def as_list(value, cast=int) -> list:
    """fire gives "a,b" as a tuple or a string."""
    items = value if isinstance(value, (tuple, list)) else str(value).split(",")
    return [cast(x) for x in items]


def failure(e: Exception) -> dict:  # one variant failing must not hide the others
    return dict(error=f"{type(e).__name__}: {e}"[:300])


def save(results: list, out: str) -> None:
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)


def time_us(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    if not torch.cuda.is_available():  # a CPU smoke run of the script itself
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return 1e6 * (time.perf_counter() - t0) / repeats
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / repeats


# Triton launch settings to compare: (keys per program, keys per iteration, warps, stages).
TRITON_CONFIGS = [(512, 64, 4, 2), (256, 64, 4, 2), (1024, 64, 4, 2), (2048, 64, 4, 2),
                  (512, 32, 4, 2), (512, 128, 4, 2), (512, 128, 8, 2), (512, 64, 4, 3),
                  (512, 64, 8, 3), (1024, 128, 8, 3), (1024, 64, 4, 3), (512, 64, 2, 2)]


def main(lens="4096,16384,32768,100000", shapes="7b,34b", batch: int = 1, span: int = 0,
         out: str = None):
    """span: cache positions each call is given (the length is read from a tensor by
    the Triton kernel, masked for the others); 0 means the length itself."""
    lens = as_list(lens)
    results = []
    for shape in as_list(shapes, str):
        heads, kv_heads = SHAPES[shape]
        for n in lens:
            width = max(span, n)
            q = torch.randn(batch, heads, 1, 128, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(batch, kv_heads, width, 128, device="cuda",
                                dtype=torch.bfloat16) for _ in range(2))
            kn, vn = k[:, :, :n], v[:, :, :n]
            lengths = torch.full((batch,), n, device="cuda")
            mask = (torch.arange(width, device="cuda") < n)[None, None, None]
            gqa = heads != kv_heads
            want = F.scaled_dot_product_attention(q.float(), kn.float(), vn.float(),
                                                  enable_gqa=gqa)
            variants = {
                "sdpa_exact_length": lambda: F.scaled_dot_product_attention(
                    q, kn, vn, enable_gqa=gqa),
                "sdpa_masked_span": lambda: F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, enable_gqa=gqa),
                "one_query_masked_span": lambda: attend_one_query(q, k, v, mask),
            }
            for split, block_n, warps, stages in TRITON_CONFIGS:
                variants[f"triton_{split}_{block_n}_w{warps}_s{stages}"] = (
                    lambda c=(split, block_n, warps, stages): decode_attention(
                        q, k, v, lengths, *c))
            gb = 2 * kn.numel() * kn.element_size() / 1e9
            row = dict(shape=shape, heads=heads, kv_heads=kv_heads, batch=batch, kv_len=n,
                       span=width, cache_gb=gb)
            for name, fn in variants.items():
                try:
                    with torch.no_grad():
                        err = (fn().float() - want).abs().max().item()
                        us = time_us(fn)
                    row[name] = dict(us=us, gb_per_s=gb / (us / 1e6), max_abs_err=err)
                except Exception as e:
                    row[name] = failure(e)
            print(json.dumps(row), flush=True)
            results.append(row)
    save(results, out)


if __name__ == "__main__":
    fire.Fire(main)
