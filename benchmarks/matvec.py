"""The matrix-vector products of a decoding step (llama/matvec.py) against cuBLAS, on a GPU.

    python benchmarks/matvec.py sweep --preset 7b     # GB/s per weight shape and launch setting
    python benchmarks/matvec.py layers --preset 7b    # every layer's products in one graph

`sweep` times each weight shape of a layer (and the output layer) at batch 1 with F.linear
(cuBLAS) and with the plain kernel under a grid of launch settings, then the best setting
at 1-8 rows and with its fused norm / residual / SwiGLU, and checks the results against
float32. `layers` replays, as one CUDA graph, what a whole decode step does around the
weights (norms, four products per layer, residual adds, SwiGLU; attention left out) three
ways: eager PyTorch, compiled by torch.compile, and through the fused kernels. Weights are
random; each timing cycles over enough copies that they do not sit in the L2 cache.
"""

import itertools
import json
import sys
from pathlib import Path

import fire
import torch
import torch._inductor.config
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama import matvec as mv  # noqa: E402
from llama.model import ModelArgs  # noqa: E402

GB = 1e9


def shapes(preset: str, mp: int):
    """(name, (N, K), fused operation) of each product, one rank's share at MP=mp."""
    a = ModelArgs.from_name(preset)
    hd = a.head_dim
    return [
        ("qkv", ((a.n_heads + 2 * a.kv_heads) * hd // mp, a.dim), "norm"),
        ("wo", (a.dim, a.n_heads * hd // mp), "residual"),
        ("w13", (2 * a.ffn_hidden_dim // mp, a.dim), "norm_swiglu"),
        ("w2", (a.dim, a.ffn_hidden_dim // mp), "residual"),
        ("output", (a.vocab_size // mp, a.dim), "plain"),
    ], a


def graph_seconds(fn, replays: int = 20) -> float:
    """Seconds per call of fn, captured as a CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / replays


def fused_args(kind: str, x, n_out: int):
    dim = x.shape[-1]
    if kind == "norm":
        return dict(norm_weight=torch.rand(dim, device=x.device, dtype=x.dtype) + 0.5, eps=1e-5)
    if kind == "norm_swiglu":
        return dict(fused_args("norm", x, n_out), swiglu=True)
    if kind == "residual":
        return dict(residual=torch.randn(*x.shape[:-1], n_out, device=x.device, dtype=x.dtype))
    return {}


def reference(x, weight, norm_weight=None, eps=0.0, residual=None, swiglu=False):
    x = x.float()
    if norm_weight is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    y = F.linear(x, weight.float())
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y if residual is None else y + residual.float()


def ints(value):
    """fire gives 4 or (4, 8) or "4,8"; return a list of ints."""
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(v) for v in str(value).split(",") if v]


def sweep(preset: str = "7b", mp: int = 1, block_n="4,8,16", block_k="256,512,1024",
          num_warps="4,8", num_stages="2,3,4", sum_each_step="0,1", rows="1,2,4,8",
          min_bytes: float = 0.4e9):
    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    grid = list(itertools.product(*[ints(v) for v in (block_n, block_k, num_warps, num_stages,
                                                      sum_each_step)]))
    products, args = shapes(preset, mp)
    weights = {}
    for name, (n, k), _ in products:
        copies = max(1, int(min_bytes // (n * k * 2)) + 1)
        weights[name] = [torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5
                         for _ in range(copies)]
    counts = {name: (1 if name == "output" else args.n_layers) for name, _, _ in products}

    def seconds(name, call, n_rows=1):
        x = torch.randn(n_rows, weights[name][0].shape[1], device=dev, dtype=dt)
        ws = weights[name]
        return graph_seconds(lambda: [call(x, w) for w in ws]) / len(ws)

    def rate(name, s):
        n, k = weights[name][0].shape
        return n * k * 2 / s / GB

    print(f"== {preset} MP={mp}, batch 1: GB/s of weights read (cuBLAS vs matvec)")
    cublas = {name: seconds(name, F.linear) for name, _, _ in products}
    for name, (n, k), _ in products:
        print(f"cuBLAS   {name:7s} {n}x{k}: {rate(name, cublas[name]):7.0f} GB/s "
              f"({1e6 * cublas[name]:.1f} us)", flush=True)
    table = {}
    for cfg in grid:
        bn, bk, w, s, each = cfg
        kw = dict(block_n=bn, block_k=bk, num_warps=w, num_stages=s, sum_each_step=each)
        try:
            table[cfg] = {name: seconds(name, lambda x, wt: mv.matvec(x, wt, **kw))
                          for name, _, _ in products}
        except Exception as e:  # a setting the compiler rejects (registers, shared memory)
            print(f"config {cfg}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        step = sum(counts[nm] * t for nm, t in table[cfg].items())
        print(f"matvec block_n={bn:2d} block_k={bk:4d} warps={w} stages={s} each={each}: "
              + " ".join(
            f"{nm} {rate(nm, t):5.0f}" for nm, t in table[cfg].items())
            + f" | step {1e3 * step:.3f} ms", flush=True)
    step_cublas = sum(counts[nm] * t for nm, t in cublas.items())
    best = min(table, key=lambda c: sum(counts[nm] * t for nm, t in table[c].items()))
    best_step = sum(counts[nm] * t for nm, t in table[best].items())
    print(f"weights of a step: cuBLAS {1e3 * step_cublas:.3f} ms, best matvec {best} "
          f"{1e3 * best_step:.3f} ms")
    for name, _, _ in products:
        own = min(table, key=lambda c: table[c][name])
        print(f"best for {name}: {own} {rate(name, table[own][name]):.0f} GB/s")

    bn, bk, w, s, each = best
    kw = dict(block_n=bn, block_k=bk, num_warps=w, num_stages=s, sum_each_step=each)
    print("BEST " + json.dumps(kw), flush=True)
    print("== rows (batch size): cuBLAS vs best matvec, GB/s")
    for n_rows in [int(r) for r in str(rows).split(",")]:
        line = []
        for name, _, _ in products:
            c = seconds(name, F.linear, n_rows)
            m = seconds(name, lambda x, wt: mv.matvec(x, wt, **kw), n_rows)
            line.append(f"{name} {rate(name, c):5.0f}/{rate(name, m):5.0f}")
        print(f"rows {n_rows}: " + "  ".join(line), flush=True)

    print("== fused operations (best setting, batch 1): GB/s, and max error vs float32 "
          "relative to the largest output")
    for name, (n, k), kind in products:
        x = torch.randn(1, k, device=dev, dtype=dt)
        n_out = n // 2 if kind == "norm_swiglu" else n
        extra = fused_args(kind, x, n_out)
        t = graph_seconds(lambda: [mv.matvec(x, wt, **extra, **kw) for wt in weights[name]])
        got = mv.matvec(x, weights[name][0], **extra, **kw).float()
        want = reference(x, weights[name][0], **extra)
        err = ((got - want).abs().max() / want.abs().max()).item()
        cub = (F.linear(x, weights[name][0]).float() - reference(x, weights[name][0])).abs().max()
        print(f"{name:7s} {kind:12s}: {rate(name, t / len(weights[name])):6.0f} GB/s, "
              f"error {err:.2e} (cuBLAS plain: {(cub / want.abs().max()).item():.2e})",
              flush=True)
    if mp == 1:
        del weights
        torch.cuda.empty_cache()
        layers(preset, **kw)


def layers(preset: str = "7b", block_n: int = mv.BLOCK_N, block_k: int = mv.BLOCK_K,
           num_warps: int = mv.NUM_WARPS, num_stages: int = mv.NUM_STAGES,
           sum_each_step: bool = False):
    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    products, a = shapes(preset, 1)
    dims = {name: nk for name, nk, _ in products}
    eps = a.norm_eps
    layer_weights = [{name: torch.randn(*dims[name], device=dev, dtype=dt) / dims[name][1] ** 0.5
                      for name in ("qkv", "wo", "w13", "w2")} for _ in range(a.n_layers)]
    norms = [(torch.rand(a.dim, device=dev, dtype=dt) + 0.5,
              torch.rand(a.dim, device=dev, dtype=dt) + 0.5) for _ in range(a.n_layers)]
    out_w = torch.randn(*dims["output"], device=dev, dtype=dt) / a.dim ** 0.5
    final_norm = torch.rand(a.dim, device=dev, dtype=dt) + 0.5
    x0 = torch.randn(1, a.dim, device=dev, dtype=dt)
    kw = dict(block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
              sum_each_step=sum_each_step)
    print(f"== {preset} layers, matvec launch settings {kw}")

    def rms(x, weight):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight

    def plain(h):
        for lw, (n1, n2) in zip(layer_weights, norms):
            attn_in = F.linear(rms(h, n1), lw["qkv"])[:, : a.dim]  # stands in for attention
            h = h + F.linear(attn_in, lw["wo"])
            gate, up = F.linear(rms(h, n2), lw["w13"]).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, lw["w2"])
        return F.linear(rms(h, final_norm), out_w)

    def fused(h):
        for lw, (n1, n2) in zip(layer_weights, norms):
            attn_in = mv.matvec(h, lw["qkv"], n1, eps, **kw)[:, : a.dim]
            h = mv.matvec(attn_in, lw["wo"], residual=h, **kw)
            h = mv.matvec(mv.matvec(h, lw["w13"], n2, eps, swiglu=True, **kw), lw["w2"],
                          residual=h, **kw)
        return mv.matvec(h, out_w, final_norm, eps, **kw)

    weight_bytes = 2 * (sum(w.numel() for lw in layer_weights for w in lw.values())
                        + out_w.numel())
    torch._inductor.config.coordinate_descent_tuning = True  # as GraphedDecoder compiles
    compiled = torch.compile(plain, dynamic=False)
    with torch.no_grad():
        results = {}
        for name, fn in (("eager", plain), ("compiled", compiled), ("matvec", fused)):
            results[name] = fn(x0).float()
            s = graph_seconds(lambda: fn(x0))
            print(f"{preset} weights of a decode step, {name:8s}: {1e3 * s:.3f} ms, "
                  f"{weight_bytes / s / GB:.0f} GB/s ({weight_bytes / GB:.2f} GB)", flush=True)
        for name in ("compiled", "matvec"):
            diff = (results[name] - results["eager"]).abs().max() / results["eager"].abs().max()
            print(f"{name} vs eager logits: max difference {diff.item():.2e} of the largest; "
                  f"same argmax {bool(results[name].argmax() == results['eager'].argmax())}")


if __name__ == "__main__":
    fire.Fire({"sweep": sweep, "layers": layers})
