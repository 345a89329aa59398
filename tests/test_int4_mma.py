"""The int4 tensor-core kernel's layout and arithmetic, on CPU.

The kernel itself needs a CUDA GPU (benchmarks/quant_gpu.py checks it there). Here the
layout `int4_mma.mma_layout` builds is read back the way the kernel reads it: words
turned into bfloat16 pairs by the kernel's bit trick, placed into m16n8k16 fragments by
PTX's documented mapping, multiplied, and each group folded with its scale and zero as
csrc/int4_mma.cu does. A wrong slot, lane or scale order gives a different product.
"""

import pytest
import torch

from llama import int4_mma
from llama import quantize as q


def bf16_pair(bits: torch.Tensor):
    """int64 words holding two bfloat16 -> (low, high) as float64."""
    low = ((bits & 0xFFFF) << 16).to(torch.int32).view(torch.float32).double()
    high = (bits & 0xFFFF0000).to(torch.int32).view(torch.float32).double()
    return low, high


def emulate(x: torch.Tensor, packed: torch.Tensor, pairs: torch.Tensor, group: int):
    """What int4_mma_matvec computes for x (m <= 8, k) from the layout, in float64."""
    m, k = x.shape
    tiles, chunks = packed.shape[:2]
    words = packed.view(tiles, chunks, 32, 4, 4).long()
    words = (words * torch.tensor([1, 1 << 8, 1 << 16, 1 << 24])).sum(-1)  # little-endian
    xb = torch.zeros(8, k, dtype=torch.float64)
    xb[:m] = x.double()
    lanes = torch.arange(32)
    g, t = lanes // 4, lanes % 4
    c = torch.zeros(tiles, chunks, 16, 8, dtype=torch.float64)  # sum (128 + code) x
    for s in range(4):
        a = [bf16_pair(((words[:, :, :, s] >> (4 * i)) & 0x000F000F) | 0x43004300)
             for i in range(4)]
        A = torch.zeros(tiles, chunks, 16, 16, dtype=torch.float64)
        # PTX m16n8k16 A fragment: a0 (g, 2t..), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
        for i, (row, col) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8),
                                        (g + 8, 2 * t + 8)]):
            A[:, :, row, col], A[:, :, row, col + 1] = a[i]
        # B fragment: b0 = (k 2t, 2t+1; column g), b1 = (k 2t+8, 2t+9; column g), the
        # lane's activations 16 t + 4 s + (0, 1) and + (2, 3) of each chunk.
        B = torch.zeros(chunks, 16, 8, dtype=torch.float64)
        base = torch.arange(chunks)[:, None] * 64 + 16 * t + 4 * s
        for col, offset in ((2 * t, 0), (2 * t + 8, 2)):
            B[:, col, g] = xb[g[None], base + offset]
            B[:, col + 1, g] = xb[g[None], base + offset + 1]
        c += A @ B
    sum_x = xb.view(8, chunks, 64).sum(-1).t()  # the all-ones product: (chunks, 8)
    per_group = group // 64
    c = c.view(tiles, chunks // per_group, per_group, 16, 8).sum(2)
    sum_x = sum_x.reshape(chunks // per_group, per_group, 8).sum(1)
    pairs32 = pairs.contiguous().view(torch.int32).long() & 0xFFFFFFFF
    scale, zero = bf16_pair(pairs32.squeeze(-1))  # (tiles, groups, 16)
    out = scale[..., None] * c + (zero - 136 * scale)[..., None] * sum_x[None, :, None, :]
    return out.sum(1).permute(2, 0, 1).reshape(8, tiles * 16)[:m]


def quantized(n, k, group, seed=0):
    torch.manual_seed(seed)
    weight = torch.randn(n, k) * 0.02
    packed, scales, zeros = q.quantize_int4(weight, group)
    return packed, scales.to(torch.bfloat16), zeros.to(torch.bfloat16)


@pytest.mark.parametrize("n,k,group,m", [(32, 128, 64, 1), (48, 256, 128, 3),
                                         (16, 512, 256, 8), (64, 384, 128, 5)])
def test_layout_read_as_the_kernel_reads_it(n, k, group, m):
    packed, scales, zeros = quantized(n, k, group)
    layout = int4_mma.mma_layout(packed)
    pairs = int4_mma.scale_pairs(scales, zeros)
    assert layout.shape == (n // 16, k // 64, 32, 16) and layout.dtype == torch.uint8
    assert pairs.shape == (n // 16, k // group, 16, 2)
    x = torch.randn(m, k).to(torch.bfloat16)
    want = x.double() @ q.dequantize_int4(packed, scales, zeros, torch.float64).t()
    got = emulate(x, layout, pairs, group)
    assert torch.allclose(got, want, rtol=0, atol=1e-9 * want.abs().max())


def test_layout_mistakes_change_the_product():
    packed, scales, zeros = quantized(32, 256, 128)
    x = torch.randn(2, 256).to(torch.bfloat16)
    want = x.double() @ q.dequantize_int4(packed, scales, zeros, torch.float64).t()
    layout, pairs = int4_mma.mma_layout(packed), int4_mma.scale_pairs(scales, zeros)
    swapped_nibbles = (layout >> 4) | (layout << 4)
    swapped_lanes = layout.roll(1, dims=2)
    rows_of_pairs = pairs.roll(1, dims=2)
    for bad in (emulate(x, swapped_nibbles, pairs, 128), emulate(x, swapped_lanes, pairs, 128),
                emulate(x, layout, rows_of_pairs, 128)):
        assert (bad - want).abs().max() > 1e-3 * want.abs().max()


def test_refuses_what_it_cannot_multiply():
    layer = q.QuantizedLinear(256, 40, "int4", 128)
    assert "out_features % 16" in int4_mma.refuses(layer, torch.bfloat16)
    layer = q.QuantizedLinear(256, 32, "int4", 128)
    assert "bfloat16 activations" in int4_mma.refuses(layer, torch.float32)


def code_llama_shapes():
    """(out, in) of every quantized product of Code Llama 7B, 13B, 34B and 70B, whole and
    as one rank's slice at the model's MP size, with the output head."""
    shapes = set()
    for dim, hidden, kv, mp in ((4096, 11008, 4096, 1), (5120, 13824, 5120, 2),
                                (8192, 22016, 1024, 4), (8192, 28672, 1024, 8)):
        for procs in {1, mp}:
            shapes |= {((dim + 2 * kv) // procs, dim), (dim // procs, dim),
                       (2 * hidden // procs, dim), (dim, hidden // procs), (32016, dim)}
    return sorted(shapes)


@pytest.mark.parametrize("sms", [108, 132])
def test_launch_configs_fit_every_shape(sms):
    """Each choice divides the tiles, asks for at most 48 KB of shared memory (more needs
    an opt-in the kernel does not make) and for warps the registers allow."""
    for n, k in code_llama_shapes():
        assert n % 16 == 0 and k % 128 == 0  # all taken by the kernel
        for m in range(1, int4_mma.MAX_ROWS + 1):
            tiles, slices, warps = int4_mma.launch_config(n // 16, m, sms)
            assert (n // 16) % tiles == 0 and slices in (1, 2) and warps in (4, 8, 16)
            assert 512 * tiles * slices * warps <= 48 * 1024
            assert slices == (1 if m <= 8 else 2)
