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
    (1, 64, 384, torch.float32, qk.LaunchConfig(16, 32, 64, 2), False),  # one row, dots
    (1, 96, 256, torch.float16, None, False),
    (16, 48, 128, torch.float16, qk.LaunchConfig(16, 16, 64, 1), False),
    (1, 96, 256, torch.bfloat16, None, False),
    (1, 52, 640, torch.float32, None, False),  # int8: part of a row tile, a part step
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


def tinygemm_pack(packed: torch.Tensor, inner: int) -> torch.Tensor:
    """What `_convert_weight_to_int4pack(packed, inner)` returns on CUDA, built on the CPU
    the way PyTorch's int4mm.cu builds it: per 8 rows and 16 * inner inputs, lane t of 32
    takes row t // 4 and, per pair of 16-input tiles, the bytes t % 4 + (0, 4, 8, 12) of
    the pair's 16 bytes (two codes each), high nibbles in the word's low half."""
    n, half_k = packed.shape
    blocks = half_k // (8 * inner)
    lane = torch.arange(32)
    rows = torch.arange(n // 8)[:, None, None, None] * 8 + (lane // 4)[None, None, :, None]
    word = torch.arange(inner // 2)[None, None, None, :]
    block = torch.arange(blocks)[None, :, None, None]
    base = (block * inner + 2 * word) * 8 + (lane % 4)[None, None, :, None]
    v = [packed[rows, base + offset].to(torch.int64) for offset in (0, 4, 8, 12)]
    out = sum((v[i] >> 4) << (4 * i) for i in range(4)) + sum((v[i] & 15) << (16 + 4 * i)
                                                             for i in range(4))
    return out.to(torch.int32)  # (n / 8, blocks, 32, inner / 2), as int32 bit patterns


def tinygemm_dequantize_cases():
    """tinygemm_dequantize of the packed layout against dequantize_weight of the stored
    one, for each inner tile count and group size: max abs difference, in float32 (the
    interpreter rounds to bfloat16 by truncation, the GPU to nearest)."""
    out = {}
    for n, k, group, inner in [(16, 256, 64, 8), (24, 384, 128, 4), (8, 128, 32, 2)]:
        gen = torch.Generator().manual_seed(n + k)
        weight = torch.randn(n, k, generator=gen)
        pieces = q.quantize_weight(weight, "int4", group)
        layer = q.QuantizedLinear(k, n, "int4", group_size=group)
        layer.load_pieces(pieces)
        want = q.dequantize_weight(pieces, "int4")
        qk._scales_and_zeros(layer, torch.float32)
        packed = tinygemm_pack(layer.weight, inner)
        got = qk.tinygemm_dequantize(packed, layer.scales_and_zeros, group)
        out[f"n={n} k={k} group={group} inner={inner}"] = {
            "difference": (got.float() - want.float()).abs().max().item(),
            "shape_ok": got.shape == (n, k) and got.dtype == torch.float32}
    return out


if __name__ == "__main__":
    results = {"tinygemm_dequantize": tinygemm_dequantize_cases()}
    for mode in q.MODES:
        for case in CASES:
            key = f"{mode} rows={case[0]} out={case[1]} in={case[2]} {case[3]} {case[4]}"
            results[key] = run_case(mode, *case)
    print(json.dumps(results))
