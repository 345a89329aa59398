"""Quantized matrix products on one CUDA GPU, 7B shapes: correctness and time per kernel.

    python benchmarks/quant_gpu.py --out q.json [--batches 1 32] [--budget 170]

For each linear shape of one 7B layer (and the output head) at each batch size: the bf16
F.linear baseline; int8 and int4 through the plain path (eager and compiled, as
graphs.py compiles decode steps), the Triton kernel, tinygemm `_weight_int4pack_mm`
and our tensor-core kernel (int4, `cuda_int4`), the gpt-fast peer's compiled int8
(`linear(x, w.to(bf16)) * scales`), and torchao / gemlite where importable. Each
product is checked against dequantize-then-multiply of the same stored weights (float32
products of the bf16 inputs, rounded to bf16 once; a kernel passes when it is within
1e-3 of the float32-weight or of the bf16-weight reference), then timed from a CUDA
graph of 20 calls that cycle through enough copies of the weights (>= 256 MB) that none
is still in L2 cache, as in a real decoding step. The launch settings of the Triton
kernel and of the int4 tensor-core kernel are then swept per shape and batch, in what is
left of --budget seconds (the whole run's). Prints a table and writes everything to
--out as JSON. Imports only torch, triton and this package's quantize/quant_kernels/int4_mma
modules, not the model.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama import int4_mma  # noqa: E402
from llama import quant_kernels as qk  # noqa: E402
from llama import quantize as q  # noqa: E402

SHAPES = {"wqkv": (12288, 4096), "wo": (4096, 4096), "w13": (22016, 4096),
          "w2": (4096, 11008), "output": (32016, 4096)}
GROUP = 128
DEVICE = "cuda"
COLD_BYTES = 256 << 20  # weights cycled through per timing, several times any L2
CALLS = 20


def relative_error(got, want) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def time_per_call(fns, calls=CALLS, repeats=10) -> float:
    """Microseconds per call, replaying a CUDA graph of `calls` calls that cycle
    through `fns` (one per copy of the weights)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns[:3]:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def stored_bytes(n: int, k: int, mode: str) -> int:
    """Bytes of an (n, k) weight in `mode`, scales and zeros included."""
    return n * k + 2 * n if mode == "int8" else n * k // 2 + 4 * n * k // GROUP


def copies_for(nbytes: int) -> int:
    return max(2, min(64, -(-COLD_BYTES // nbytes)))


def quantized_layers(pieces, mode, kernel_name, copies):
    """`copies` QuantizedLinear layers of the pieces, prepared for the kernel."""
    n, k = pieces["weight"].shape
    k *= 2 if mode == "int4" else 1  # two codes per byte
    layers = []
    for _ in range(copies):
        layer = q.QuantizedLinear(k, n, mode, GROUP, device=DEVICE)
        layer.load_pieces({name: t.clone() for name, t in pieces.items()})
        refused = qk.use_kernel(layer, qk.KERNELS[kernel_name], torch.bfloat16)
        if refused:
            raise RuntimeError(refused[""])
        layers.append(layer)
    return layers


def variants(weight, pieces, x):
    """{name: (weight bytes per call, [one callable per weight copy])} for our kernels and
    the gpt-fast peer; the library peers (optional_variants) add a third item, the product
    with their own dequantized weights. A kernel that cannot be set up is a string."""
    out = {}
    n, k = weight.shape
    bf16_copies = [weight.clone() for _ in range(copies_for(2 * n * k))]
    out["bf16"] = (2 * n * k, [lambda w=w: F.linear(x, w) for w in bf16_copies])
    # What graphs.py's compilation makes of the plain path, and the gpt-fast peer's int8
    # (the product scaled after: rounded twice in bf16).
    compiled = {"int8": torch.compile(q.int8_linear, dynamic=False),
                "int4": torch.compile(q.int4_linear, dynamic=False)}
    gpt_fast_int8 = torch.compile(lambda x, w, s: F.linear(x, w.to(x.dtype)) * s, dynamic=False)
    for mode in q.MODES:
        nbytes = stored_bytes(n, k, mode)
        copies = copies_for(nbytes)
        kernels = ["plain", "triton"] + (["tinygemm", "cuda_int4"] if mode == "int4" else [])
        for kernel in kernels:
            try:
                layers = quantized_layers(pieces[mode], mode, kernel, copies)
            except Exception as error:  # noqa: BLE001 (recorded, the others go on)
                out[f"{mode}-{kernel}"] = f"{type(error).__name__}: {error}"
                continue
            out[f"{mode}-{kernel}"] = (nbytes, [lambda l=l: l.matmul(x, l) for l in layers])
        copies = [{name: t.clone() for name, t in pieces[mode].items()} for _ in range(copies)]
        out[f"{mode}-compiled"] = (nbytes, [lambda c=c, f=compiled[mode]: f(x, **c)
                                            for c in copies])
        if mode == "int8":
            out["int8-gptfast"] = (nbytes, [lambda c=c: gpt_fast_int8(x, c["weight"], c["scales"])
                                            for c in copies])
    out.update(optional_variants(weight, x))
    return out


def optional_variants(weight, x):
    """torchao's int4 (tinygemm layout and its default) and int8, gemlite's int4."""
    out = {}
    n, k = weight.shape
    try:
        from torchao.quantization import (Int4WeightOnlyConfig, Int8WeightOnlyConfig,
                                          quantize_)
    except Exception as error:  # noqa: BLE001
        out["torchao"] = f"not importable: {error}"
    else:
        configs = {
            "torchao-int4-tile": lambda: Int4WeightOnlyConfig(
                group_size=GROUP, int4_packing_format="tile_packed_to_4d"),
            "torchao-int4-default": lambda: Int4WeightOnlyConfig(group_size=GROUP),
            "torchao-int8": lambda: Int8WeightOnlyConfig(),
        }
        for name, config in configs.items():
            nbytes = stored_bytes(n, k, "int8" if name.endswith("int8") else "int4")
            try:
                linears = []
                for _ in range(copies_for(nbytes)):
                    linear = torch.nn.Linear(k, n, bias=False, device=DEVICE, dtype=torch.bfloat16)
                    linear.weight.data.copy_(weight)
                    quantize_(linear, config())
                    linears.append(linear)
                # Where torchao cannot dequantize (the tile layout), our references
                # stand: its grid is ours up to the rounding of scales and zeros.
                weight_q = linears[0].weight
                reference = (F.linear(x.float(), weight_q.dequantize().float())
                             if hasattr(weight_q, "dequantize") else None)
                out[name] = (nbytes, [lambda m=m: m(x) for m in linears], reference)
            except Exception as error:  # noqa: BLE001
                out[name] = f"{type(error).__name__}: {str(error)[:300]}"
    out.update(gemlite_variant(weight, x))
    return out


def gemlite_variant(weight, x):
    try:
        from gemlite.core import DType, GemLiteLinearTriton
    except Exception as error:  # noqa: BLE001
        return {"gemlite-int4": f"not importable: {error}"}
    n, k = weight.shape
    try:
        packed, scales, zeros = q.quantize_int4(weight, GROUP)
        codes = q.unpack_int4(packed)
        # Ours: (c - 8) * s + z; gemlite's: (c - zero_point) * s.
        zero_points = 8 - zeros.float() / scales.float()
        layers, nbytes = [], stored_bytes(n, k, "int4")
        for _ in range(copies_for(nbytes)):
            layer = GemLiteLinearTriton(W_nbits=4, group_size=GROUP, in_features=k,
                                        out_features=n, input_dtype=DType.BF16,
                                        output_dtype=DType.BF16)
            layer.pack(codes, scales, zero_points.to(scales.dtype), bias=None)
            layers.append(layer)
        reference = F.linear(x.float(), q.dequantize_int4(packed, scales, zeros))
        return {"gemlite-int4": (nbytes, [lambda m=m: m(x) for m in layers], reference)}
    except Exception as error:  # noqa: BLE001
        return {"gemlite-int4": f"{type(error).__name__}: {str(error)[:300]}"}


def check_and_time(name, entry, references):
    if isinstance(entry, str):
        return {"variant": name, "skipped": entry}
    nbytes, fns = entry[0], entry[1]
    refs = {"own": entry[2]} if len(entry) == 3 and entry[2] is not None else references
    y = fns[0]()
    torch.cuda.synchronize()
    errors = {ref: relative_error(y, want.to(y.dtype)) for ref, want in refs.items()}
    best = min(errors, key=errors.get)
    us = time_per_call(fns)
    return {"variant": name, "us": us, "error": errors[best], "reference": best,
            "pass": errors[best] < 1e-3, "errors": errors, "weight_GBps": nbytes / us / 1e3}


def sweep_configs(m: int):
    """Launch configs to try: for one row, vector products and also tensor-core tiles
    with the row padded to 16 (how tinygemm multiplies one row); tensor-core tiles else."""
    if m == 1:
        return ([qk.LaunchConfig(1, n, k, split, warps) for n in (16, 32, 64)
                 for k in (64, 128) for split in (1, 2, 4, 8) for warps in (2, 4)]
                + [qk.LaunchConfig(16, n, 128, split, 4) for n in (32, 64, 128)
                   for split in (1, 2, 4, 8)])
    return [qk.LaunchConfig(block_m, n, k, split, 4) for block_m in (16, 32)
            for n in (32, 64, 128) for k in (64, 128) for split in (1, 2, 4)]


def mma_configs(m: int, tiles: int):
    """(tiles, slices, warps) to try for the int4 tensor-core kernel: the ones that divide
    the tiles and fit 48 KB of shared memory."""
    return [(t, s, w) for t in (1, 2, 4) for s in ((1,) if m <= 8 else (1, 2))
            for w in (4, 8, 16) if tiles % t == 0 and 512 * t * s * w <= 48 * 1024]


def sweep(kernel, pieces, mode, x, deadline):
    """Time per call of `kernel` ("triton", or "cuda_int4" for int4) for each launch
    config, best first; stops at the deadline (time.monotonic())."""
    nbytes = stored_bytes(pieces["weight"].shape[0], x.shape[1], mode)
    layers = quantized_layers(pieces, mode, kernel, copies_for(nbytes))
    if kernel == "triton":
        configs = sweep_configs(x.shape[0])
        call = lambda l, config: qk.triton_matmul(x, l, config)  # noqa: E731
    else:
        configs = mma_configs(x.shape[0], layers[0].weight.shape[0])
        call = lambda l, config: int4_mma.product(x, l.weight, l.scale_pairs,  # noqa: E731
                                                  l.group_size, config)
    results = []
    for config in configs:
        if time.monotonic() > deadline:
            break
        record = (config.__dict__ if kernel == "triton"
                  else dict(zip(("tiles", "slices", "warps"), config)))
        try:
            us = time_per_call([lambda l=l: call(l, config) for l in layers])
        except Exception as error:  # noqa: BLE001 (too many registers or shared memory)
            results.append({"config": record, "us": float("inf"), "error": str(error)[:200]})
            continue
        results.append({"config": record, "us": us, "weight_GBps": nbytes / us / 1e3})
    return sorted(results, key=lambda r: r["us"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--budget", type=float, default=170,
                        help="seconds for the whole run: the Triton sweep gets what is left")
    args = parser.parse_args()
    start = time.monotonic()
    # One compiled function serves every shape and batch: let it recompile for each.
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    torch.manual_seed(0)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": getattr(qk.triton, "__version__", None), "group_size": GROUP,
              "results": [], "sweep": {}}
    print(f"{report['device']}, torch {report['torch']}, triton {report['triton']}")
    print(f"{'shape':8s} {'batch':>5s} {'variant':22s} {'us':>8s} {'GB/s':>7s} {'error':>9s}")
    inputs = {}
    for shape in args.shapes:
        n, k = SHAPES[shape]
        weight = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(torch.bfloat16)
        pieces = {mode: q.quantize_weight(weight, mode, GROUP) for mode in q.MODES}
        for batch in args.batches:
            x = torch.randn(batch, k, device=DEVICE).to(torch.bfloat16)
            inputs[shape, batch] = (pieces, x)
            for row in check_shape(shape, batch, weight, pieces, x):
                report["results"].append(row)
                print_row(row)
        del weight
    sweeps = [(shape, batch, mode, kernel) for shape, batch in inputs
              for mode, kernel in (("int8", "triton"), ("int4", "triton"),
                                   ("int4", "cuda_int4"))
              if batch <= int4_mma.MAX_ROWS or kernel == "triton"]
    for i, (shape, batch, mode, kernel) in enumerate(sweeps):
        # An equal share of what is left of the budget for each sweep still to run.
        share = (start + args.budget - time.monotonic()) / (len(sweeps) - i)
        pieces, x = inputs[shape, batch]
        results = sweep(kernel, pieces[mode], mode, x, time.monotonic() + share)
        report["sweep"][f"{shape} batch={batch} {mode} {kernel}"] = results[:5]
        if results:
            best = results[0]
            print(f"{shape:8s} {batch:5d} {kernel + ' best ' + mode:22s} {best['us']:8.1f} "
                  f"{best.get('weight_GBps', 0):7.0f}  {best['config']} "
                  f"({len(results)} configs)")
    report["seconds"] = time.monotonic() - start
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"{report['seconds']:.0f} s; written to {args.out}")


def check_shape(shape, batch, weight, pieces, x):
    """One result row per variant for this shape and batch."""
    n, k = weight.shape
    references = {"bf16": x.float() @ weight.float().t()}
    for mode in q.MODES:
        w32 = q.dequantize_weight(pieces[mode], mode)
        references[f"{mode}-w32"] = x.float() @ w32.t()
        references[f"{mode}-w16"] = x.float() @ w32.to(torch.bfloat16).float().t()
    rows = []
    for name, entry in variants(weight, pieces, x).items():
        mode = next((m for m in q.MODES if m in name), "bf16")
        refs = {r: v for r, v in references.items() if r.startswith(mode)}
        rows.append({"shape": shape, "n": n, "k": k, "batch": batch,
                     **check_and_time(name, entry, refs)})
    return rows


def print_row(row):
    if "skipped" in row:
        print(f"{row['shape']:8s} {row['batch']:5d} {row['variant']:22s} skipped: "
              f"{row['skipped'][:90]}")
        return
    flag = "" if row["pass"] else "  FAIL"
    print(f"{row['shape']:8s} {row['batch']:5d} {row['variant']:22s} {row['us']:8.1f} "
          f"{row.get('weight_GBps', 0):7.0f} {row['error']:9.2e}{flag}")


if __name__ == "__main__":
    main()
