"""Run by tests/test_quantize.py under TRITON_INTERPRET=1 (Triton must know it is
interpreting before llama.quant_kernels defines its kernel, so this is its own process).
Prints, as its last line, one JSON object: per case, the relative error of the Triton
kernel against dequantize-then-multiply in float32, and the limit it must stay under."""

import json

import torch

from llama import quant_kernels as qk
from llama import quantize as q

# The interpreter rounds float32 to bfloat16 by truncation, and its bfloat16 dots are
# wrong, so bfloat16 runs the one-row path only, within two bfloat16 steps.
LIMITS = {torch.float32: 1e-3, torch.float16: 1e-3, torch.bfloat16: 1e-2}

# (rows, out, in, dtype, launch config or None for the default, through the module)
CASES = [
    (1, 96, 256, torch.float32, None, False),
    (5, 80, 256, torch.float32, None, False),  # rows and outputs not filling a tile
    (3, 80, 256, torch.float32, qk.LaunchConfig(16, 32, 32, 2), False),  # split in two
    (1, 64, 384, torch.float32, qk.LaunchConfig(1, 16, 64, 4), False),  # uneven split
    (1, 96, 256, torch.float16, None, False),
    (16, 48, 128, torch.float16, qk.LaunchConfig(16, 16, 64, 1), False),
    (1, 96, 256, torch.bfloat16, None, False),
    (4, 64, 256, torch.float32, None, True),  # QuantizedLinear with use_kernel("triton")
]


def run_case(mode, rows, n, k, dtype, config, through_module):
    gen = torch.Generator().manual_seed(rows * n + k)
    weight = torch.randn(n, k, generator=gen) / k ** 0.5
    layer = q.QuantizedLinear(k, n, mode, group_size=64)
    layer.load_pieces(q.quantize_weight(weight, mode, 64))
    want_weight = q.dequantize_weight(dict(layer.named_buffers()), mode)
    assert qk.use_kernel(layer, qk.KERNELS["triton"], dtype) == {}
    x = torch.randn(rows, k, generator=gen).to(dtype)
    got = layer(x) if through_module else qk.triton_matmul(x, layer, config)
    want = x.float() @ want_weight.t()
    error = ((got.float() - want).norm() / want.norm()).item()
    return {"error": error, "limit": LIMITS[dtype],
            "shape_ok": got.shape == (rows, n) and got.dtype == dtype}


if __name__ == "__main__":
    results = {}
    for mode in q.MODES:
        for case in CASES:
            key = f"{mode} rows={case[0]} out={case[1]} in={case[2]} {case[3]} {case[4]}"
            results[key] = run_case(mode, *case)
    print(json.dumps(results))
