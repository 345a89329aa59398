"""Should the SwiGLU of a batch-1 decode step be written to memory once instead of being
evaluated inside the w2 product? (benchmarks/NOTES.md, v7)

With coordinate-descent tuning, inductor turns each batch-1 product into a Triton
reduction and inlines the pointwise work before it into that reduction's loads, so every
program of the w2 product (4 output rows each in the 13B runs) evaluates silu(gate) * up
over the whole hidden width again. This times a stack of feed-forward blocks with 13B
widths (hidden width per rank: 6912 at MP=2, 13824 at MP=1), compiled three ways and
replayed from one CUDA graph:

    inlined: the w1/w3 product, the SwiGLU and the w2 product in one compiled function,
             as the model's decode step has them
    written: two compiled functions, so the SwiGLU output is written once and the w2
             product reads it
    realized: one compiled function, the SwiGLU output passed through an identity
             as_strided view, which inductor can only build on a buffer in memory (its
             lowering realizes the input): the in-graph way to write it once

and checks that all give the same output. Prints microseconds per block and the rate at
which the block's weights are read. On a CPU (no CUDA graph) the times mean little; the
agreement check still holds.

    python benchmarks/ffn_swiglu.py --hidden 6912,13824

Answered on two H200s (RESULTS.md, eighth session): written once is faster (54 against 57
us per block at 6,912, 103-110 against 105-114 at 13,824), so model.FeedForward realizes
the SwiGLU output now.
"""

import sys
import time
from pathlib import Path

import fire
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import DTYPES, as_list  # noqa: E402
from llama.decode import COMPILE_SETTINGS  # noqa: E402


def swiglu(x, w13):
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.silu(gate) * up


def down(h, x, w2):
    return x + F.linear(h, w2)


def block(x, w13, w2):
    return down(swiglu(x, w13), x, w2)


def realized_block(x, w13, w2):
    h = swiglu(x, w13)
    return down(torch.as_strided(h, h.shape, h.stride()), x, w2)


def time_stack(run, x, repeats: int) -> float:
    """Seconds per call of run(x): a CUDA graph replayed `repeats` times, or a plain loop
    off CUDA. The first calls (compilation, tuning) happen before."""
    for _ in range(2):
        run(x)
    if x.is_cuda:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run(x)
        call = graph.replay
    else:
        call = lambda: run(x)  # noqa: E731
    call()
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    sync()
    return (time.perf_counter() - start) / repeats


def main(hidden="6912,13824", dim: int = 5120, layers: int = 16, repeats: int = 50,
         device: str = None, dtype: str = "bfloat16"):
    """hidden: hidden widths per rank to time. layers: blocks with their own weights (more
    weight than the L2 cache holds, as in a model)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    def compiled(fn):  # with the settings of the model's decode steps
        return torch.compile(fn, dynamic=False, options=COMPILE_SETTINGS)

    first, second = compiled(swiglu), compiled(down)
    blocks = {"inlined": compiled(block),
              "written": lambda h, w13, w2: second(first(h, w13), h, w2),
              "realized": compiled(realized_block)}
    with torch.no_grad():
        return [time_width(blocks, width, dim, layers, repeats, device, DTYPES[dtype])
                for width in as_list(hidden)]


def time_width(blocks, width, dim, layers, repeats, device, dtype) -> dict:
    """Each block function of `blocks` run on a stack of `layers` blocks of this width."""
    g = torch.Generator(device="cpu").manual_seed(width)
    # Each block adds a term quadratic in its input: at unit scale a stack of 16 overflows
    # (the first GPU run compared NaNs); at 0.3 its activations stay near the input's.
    def weight(rows, cols):
        return (0.3 * torch.randn(rows, cols, generator=g) / cols ** 0.5).to(device, dtype)

    weights = [(weight(2 * width, dim), weight(dim, width)) for _ in range(layers)]
    x = torch.randn(1, 1, dim, generator=g).to(device, dtype)

    def stack(fn):
        def run(h):
            for w13, w2 in weights:
                h = fn(h, w13, w2)
            return h
        return run

    outputs = {name: stack(fn)(x).float() for name, fn in blocks.items()}
    if not all(out.isfinite().all() for out in outputs.values()):
        raise ValueError(f"hidden {width}: a stack's output is not finite, so the variants "
                         f"cannot be compared; use fewer --layers")
    diff = max((out - outputs["inlined"]).abs().max().item() for out in outputs.values())
    scale = outputs["inlined"].abs().max().item()
    row = {"hidden": width, "max_abs_diff": diff, "max_abs": scale}
    block_bytes = 3 * width * dim * weights[0][0].element_size()
    for name, fn in blocks.items():
        seconds = time_stack(stack(fn), x, repeats) / layers
        row[f"{name}_us"] = 1e6 * seconds
        row[f"{name}_tb_per_s"] = block_bytes / seconds / 1e12
    times = ", ".join(f"{name} {row[f'{name}_us']:.1f} us ({row[f'{name}_tb_per_s']:.2f} TB/s)"
                      for name in blocks)
    print(f"hidden {width}, per block: {times}; outputs at most {diff:.3g} apart "
          f"(of {scale:.3g})", flush=True)
    return row


if __name__ == "__main__":
    fire.Fire(main)
