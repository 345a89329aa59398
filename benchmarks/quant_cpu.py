"""CPU decode speed of quantized weights against float32, on one random model.

    PYTHONPATH=. python benchmarks/quant_cpu.py [--dim 2048 --layers 18 --rounds 5]

Builds the model once per variant (same seed, same weights), then times batch-1 decode
steps of every variant in turn, round after round, so that the load of a shared machine
falls on all of them alike; prints the median tokens/s of each and its ratio to float32.
"""

import argparse
import statistics
import time

import torch

from llama import Llama
from llama.quant_kernels import select_kernel, use_kernel
from llama.quantize import quantize

# (name, quantization mode or None, kernel name or None for the device's default)
VARIANTS = {
    "float32": (None, None),
    "int8": ("int8", None),
    "int8-aten": ("int8", "cpu"),
    "int4": ("int4", None),
    "int8-plain": ("int8", "plain"),
    "int4-plain": ("int4", "plain"),
}


def build(args, variant: str):
    mode, kernel = VARIANTS[variant]
    gen = Llama.from_preset("7b", max_seq_len=args.prompt + args.steps + 1, max_batch_size=1,
                            device="cpu", dtype=torch.float32, dim=args.dim,
                            n_layers=args.layers, n_heads=args.dim // 128)
    params = sum(p.numel() for p in gen.model.parameters())
    if mode:
        quantize(gen.model, mode, args.group_size, skip=args.skip)
        fallbacks = use_kernel(gen.model, select_kernel("cpu", mode, torch.float32, kernel),
                               torch.float32)
        if fallbacks:
            print(f"{variant}: plain path for {fallbacks}")
    return gen.model, params


def decode_rate(model, args) -> float:
    """Tokens/s of batch-1 decode steps after a short prompt."""
    tokens = torch.arange(1, args.prompt + 1)[None]
    model.forward(tokens, 0)
    token = tokens[:, -1:]
    start = time.perf_counter()
    for pos in range(args.prompt, args.prompt + args.steps):
        token = model.forward(token, pos)[:, -1].argmax(-1, keepdim=True)
    return args.steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--group_size", type=int, default=128)
    parser.add_argument("--skip", nargs="*", default=[], help="layers left unquantized")
    parser.add_argument("--prompt", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=["float32", "int8", "int4"],
                        choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    built = {v: build(args, v) for v in args.variants}
    models = {v: model for v, (model, _) in built.items()}
    params = next(iter(built.values()))[1]
    rates = {v: [] for v in args.variants}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for variant, model in models.items():
                rates[variant].append(decode_rate(model, args))
    base = statistics.median(rates["float32"]) if "float32" in rates else None
    print(f"{params / 1e9:.2f}B parameters (dim {args.dim}, {args.layers} layers), "
          f"{args.threads} threads, "
          f"{args.rounds} rounds of {args.steps} steps")
    for variant, values in rates.items():
        median = statistics.median(values)
        ratio = f"{median / base:5.2f}x float32" if base else ""
        print(f"{variant:12s} {median:7.2f} tok/s  (min {min(values):.2f}, max {max(values):.2f})"
              f"  {ratio}")


if __name__ == "__main__":
    main()
