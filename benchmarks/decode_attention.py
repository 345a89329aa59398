"""Attention of one decoding query over a long KV cache, kernel by kernel: PyTorch's SDPA
(whatever backend it picks) against llama.model.attend_one_query (two batched products,
float32 scores), and a variant of the latter that splits the value product into chunks
by hand. Prints microseconds and the bandwidth reached on the cache (keys + values read
once), and writes JSON. Used to choose MASKED_SDPA_MAX_LEN.

    python benchmarks/decode_attention.py kernels --lens 4096,16384,32768,100000 --out attn.json
    python benchmarks/decode_attention.py steps --ctx 32768,100000 --out steps.json

`steps` times whole batch-1 decode steps of a 7B-shaped model (random weights, cache filled
with random values up to the context) with each variant in place of attend_one_query.
"""

import json
import sys
import time
from pathlib import Path

import fire
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llama.model  # noqa: E402
from llama import Llama  # noqa: E402
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


def chunked_values(q, k, v, chunk: int = 4096):
    """attend_one_query with the probabilities x values product cut into chunk-long
    pieces that run as one batch and are summed in float32 (split-K by hand)."""
    bsz, heads, _, hd = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scores = torch.bmm(q.reshape(bsz * kv_heads, group, hd),
                       k.reshape(bsz * kv_heads, kv_len, hd).transpose(1, 2),
                       out_dtype=torch.float32) * hd ** -0.5
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    n = kv_len // chunk
    main = n * chunk
    vv = v.reshape(bsz * kv_heads, kv_len, hd)
    pieces = torch.bmm(probs[..., :main].reshape(-1, group, n, chunk).transpose(1, 2)
                       .reshape(-1, group, chunk),
                       vv[:, :main].reshape(-1, chunk, hd), out_dtype=torch.float32)
    out = pieces.view(bsz * kv_heads, n, group, hd).sum(1)
    if main < kv_len:
        out = out + torch.bmm(probs[..., main:], vv[:, main:], out_dtype=torch.float32)
    return out.to(v.dtype).view(bsz, heads, 1, hd)


def flash_with_lse(q, k, v):
    """Attention output and float32 log-sum-exp per query (PyTorch's flash kernel)."""
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    return out, lse[..., :q.shape[2]]


def split_flash(q, k, v, chunk: int = 4096):
    """Flash-decoding with PyTorch's flash kernel: the cache of each key/value head is cut
    into chunk-long pieces that become the "heads" of one call (strided views, no copy; the
    group's query heads are its query rows), and the pieces are merged with their
    log-sum-exps."""
    bsz, heads, _, hd = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    bk = bsz * kv_heads
    qg = q.reshape(bk, 1, group, hd)
    kk, vv = k.reshape(bk, kv_len, hd), v.reshape(bk, kv_len, hd)
    n = kv_len // chunk
    main = n * chunk
    outs, lses = [], []
    if n:
        o, lse = flash_with_lse(qg.expand(bk, n, group, hd).contiguous(),
                                kk[:, :main].unflatten(1, (n, chunk)),
                                vv[:, :main].unflatten(1, (n, chunk)))
        outs.append(o)
        lses.append(lse)
    if main < kv_len:
        o, lse = flash_with_lse(qg, kk[:, None, main:], vv[:, None, main:])
        outs.append(o)
        lses.append(lse)
    weights = torch.softmax(torch.cat(lses, dim=1), dim=1)  # (bk, pieces, group)
    out = (torch.cat(outs, dim=1).float() * weights[..., None]).sum(1)
    return out.to(q.dtype).view(bsz, heads, 1, hd)


def bf16_scores(q, k, v):
    """attend_one_query with the scores rounded to the model dtype (as Meta's reference
    computes them), to isolate the cost of float32 output from the product."""
    bsz, heads, _, hd = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scores = torch.bmm(q.reshape(bsz * kv_heads, group, hd),
                       k.reshape(bsz * kv_heads, kv_len, hd).transpose(1, 2))
    probs = torch.softmax(scores.float() * hd ** -0.5, dim=-1).to(v.dtype)
    return torch.bmm(probs, v.reshape(bsz * kv_heads, kv_len, hd)).view(bsz, heads, 1, hd)


def main(lens="4096,16384,32768,100000", shapes="7b,34b", batch: int = 1, out: str = None):
    lens = as_list(lens)
    results = []
    for shape in as_list(shapes, str):
        heads, kv_heads = SHAPES[shape]
        for n in lens:
            q = torch.randn(batch, heads, 1, 128, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(batch, kv_heads, n, 128, device="cuda", dtype=torch.bfloat16)
                    for _ in range(2))
            gqa = heads != kv_heads
            want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                  enable_gqa=gqa)
            variants = {
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa),
                "one_query": lambda: attend_one_query(q, k, v, None),
                "one_query_chunked": lambda: chunked_values(q, k, v),
                "bf16_scores": lambda: bf16_scores(q, k, v),
                "split_flash_4096": lambda: split_flash(q, k, v, 4096),
                "split_flash_8192": lambda: split_flash(q, k, v, 8192),
                "split_flash_2048": lambda: split_flash(q, k, v, 2048),
            }
            gb = 2 * k.numel() * k.element_size() / 1e9
            row = dict(shape=shape, heads=heads, kv_heads=kv_heads, batch=batch, kv_len=n,
                       cache_gb=gb)
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


def steps(ctx="32768,100000", preset: str = "7b", repeats: int = 20, out: str = None,
          device: str = "cuda"):
    """Batch-1 eager decode steps (no mask) at each context, attention by SDPA (the
    library's choice), attend_one_query or the split-flash variants."""
    contexts = as_list(ctx)
    gen = Llama.from_preset(preset, max_seq_len=max(contexts) + 1, max_batch_size=1,
                            device=device)
    model = gen.model
    for layer in model.layers:
        layer.attention.cache.k.normal_()
        layer.attention.cache.v.normal_()
    token = torch.randint(0, model.vocab_size, (1, 1), device=device)
    sdpa_attend = llama.model.attend

    def one_query_steps(fn):  # fn for one-query steps, the library's attend otherwise
        return lambda q, k, v, mask: fn(q, k, v, mask) if q.shape[2] == 1 else sdpa_attend(
            q, k, v, mask)

    variants = {
        "sdpa": sdpa_attend,
        "one_query": one_query_steps(lambda q, k, v, m: attend_one_query(q, k, v, None)),
        "split_flash_4096": one_query_steps(lambda q, k, v, m: split_flash(q, k, v, 4096)),
        "split_flash_8192": one_query_steps(lambda q, k, v, m: split_flash(q, k, v, 8192)),
    }
    results = []
    for n in contexts:
        row = dict(preset=preset, ctx=n)
        want = None
        for name, fn in variants.items():
            llama.model.attend = fn
            try:
                with torch.inference_mode():
                    def step():
                        return model.output(model.forward_hidden(token, n - 1, kv_len=n))
                    logits = step().float()
                    want = logits if want is None else want
                    us = time_us(step, repeats)
                row[name] = dict(ms=us / 1000, tokens_per_s=1e6 / us,
                                 max_abs_logit_diff=(logits - want).abs().max().item())
            except Exception as e:
                row[name] = failure(e)
        print(json.dumps(row), flush=True)
        results.append(row)
    save(results, out)


if __name__ == "__main__":
    fire.Fire({"kernels": main, "steps": steps})
