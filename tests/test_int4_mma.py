"""The int4 tensor-core kernel's layout and arithmetic, on CPU.

The kernels need a CUDA GPU (benchmarks/quant_gpu.py checks them there). Here they are
emulated statement by statement, following csrc/int4_mma.cu's control flow (blocks,
warps sharing out the groups, chunks, tiles, slices of 8 rows, the group fold, the
reduction over warps, the output index) with the tensor-core products built from PTX's
documented m16n8k16 fragment mapping. A wrong slot, lane, register or scale order, a
read past the end or an output written twice or never fails these tests.
"""

import pytest
import torch

from llama import int4_mma
from llama import quantize as q

LANES = torch.arange(32)
G, T = LANES // 4, LANES % 4  # a lane's group and its thread in the group


def bf16(bits: torch.Tensor) -> torch.Tensor:
    """16-bit patterns (in any integer tensor) read as bfloat16, as float64."""
    return ((bits & 0xFFFF) << 16).to(torch.int32).view(torch.float32).double()


def words_of(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as its little-endian 32-bit words, in int64."""
    return t.contiguous().view(torch.int32).long().flatten() & 0xFFFFFFFF


def mma(c, a, b):
    """c (32, 4) += the m16n8k16 product of the A fragment a (32 lanes, 4 registers of two
    bfloat16) and the B fragment b (32, 2), by PTX's mapping of lanes to elements."""
    A = torch.zeros(16, 16, dtype=torch.float64)
    B = torch.zeros(16, 8, dtype=torch.float64)
    for r, (row, col) in enumerate([(G, 2 * T), (G + 8, 2 * T), (G, 2 * T + 8),
                                    (G + 8, 2 * T + 8)]):
        A[row, col], A[row, col + 1] = bf16(a[:, r]), bf16(a[:, r] >> 16)
    for r, k in enumerate([2 * T, 2 * T + 8]):
        B[k, G], B[k + 1, G] = bf16(b[:, r]), bf16(b[:, r] >> 16)
    C = A @ B
    c += torch.stack([C[G, 2 * T], C[G, 2 * T + 1], C[G + 8, 2 * T], C[G + 8, 2 * T + 1]], 1)


def to_bf16x2(word):
    return (word & 0x000F000F) | 0x43004300  # the kernel's lop3


def run_matvec(x, layout, pairs, group, tiles, slices, warps):
    """int4_mma_matvec<tiles, slices> with `warps` warps per block, emulated in float64."""
    m, k = x.shape
    n = layout.shape[0] * 16
    xw, w, sz = words_of(x), words_of(layout), words_of(pairs)
    out = torch.full((m * n,), float("nan"), dtype=torch.float64)
    chunks, groups, per_group = k // 64, k // group, group // 64
    row_blocks = -(-m // (8 * slices))
    for block in range(n // 16 // tiles * row_blocks):
        rows, tile = block % row_blocks, block // row_blocks * tiles
        left = m - 8 * slices * rows
        partial = torch.full((warps * tiles * slices * 128,), float("nan"), dtype=torch.float64)
        for warp in range(warps):
            first, last = groups * warp // warps, groups * (warp + 1) // warps

            def codes(i, chunk):  # wp[i * chunks * 32 + chunk * 32]: one 16-byte load a lane
                load = (tile + i) * chunks * 32 + chunk * 32 + LANES
                assert load.max() * 4 + 3 < w.numel()
                return w[4 * load[:, None] + torch.arange(4)]

            def activations(sl, chunk):  # xp[sl][chunk * 8], [chunk * 8 + 1]; zero past row m
                row = 8 * sl + G
                first_word = ((8 * slices * rows + row) * k + 16 * T + chunk * 64) // 2
                got = xw[(first_word[:, None] + torch.arange(8)).clamp(max=xw.numel() - 1)]
                assert all(first_word[row < left] + 8 <= xw.numel())
                return torch.where((row < left)[:, None], got, 0)

            acc = torch.zeros(tiles, slices, 32, 4, dtype=torch.float64)
            for grp in range(first, last):
                c = torch.zeros(tiles, slices, 32, 4, dtype=torch.float64)
                sum_x = torch.zeros(slices, 32, 4, dtype=torch.float64)
                for chunk in range(grp * per_group, (grp + 1) * per_group):
                    xs = [activations(sl, chunk) for sl in range(slices)]
                    for s in range(4):
                        for i in range(tiles):
                            word = codes(i, chunk)[:, s]
                            a = torch.stack([to_bf16x2(word >> shift)
                                             for shift in (0, 4, 8, 12)], 1)
                            for sl in range(slices):
                                mma(c[i, sl], a, xs[sl][:, 2 * s:2 * s + 2])
                        ones = torch.full((32, 4), 0x3F803F80)
                        for sl in range(slices):
                            mma(sum_x[sl], ones, xs[sl][:, 2 * s:2 * s + 2])
                for i in range(tiles):
                    at = (tile + i) * groups * 16 + grp * 16
                    lo, hi = sz[at + G], sz[at + G + 8]
                    scale = torch.stack([bf16(lo), bf16(lo), bf16(hi), bf16(hi)], 1)
                    zero = torch.stack([bf16(lo >> 16), bf16(lo >> 16), bf16(hi >> 16),
                                        bf16(hi >> 16)], 1) - 136 * scale
                    acc[i] += scale * c[i] + zero * sum_x
            for i in range(tiles):
                for sl in range(slices):
                    base = ((warp * tiles + i) * slices + sl) * 128
                    for r, (row, col) in enumerate([(G, 2 * T), (G, 2 * T + 1), (G + 8, 2 * T),
                                                    (G + 8, 2 * T + 1)]):
                        partial[base + row * 8 + col] = acc[i, sl, :, r]
        for idx in range(tiles * slices * 128):
            i, sl, r, b = idx // (slices * 128), (idx >> 7) % slices, (idx >> 3) & 15, idx & 7
            if 8 * sl + b >= left:
                continue
            at = (8 * slices * rows + 8 * sl + b) * n + (tile + i) * 16 + r
            assert out[at].isnan(), "an output written twice"
            out[at] = partial[idx::tiles * slices * 128][:warps].sum()
    assert not out.isnan().any(), "an output never written"
    return out.view(m, n)


def run_dequantize(layout, pairs, group):
    """int4_mma_dequantize, emulated: one thread per 16-byte load (all threads at once)."""
    tiles, chunks = layout.shape[:2]
    n, k, groups = tiles * 16, chunks * 64, chunks * 64 // group
    w, sz = words_of(layout).view(-1, 4), words_of(pairs)
    load = torch.arange(tiles * chunks * 32)
    lane, chunk, tile = load % 32, load // 32 % chunks, load // 32 // chunks
    g, t = lane // 4, lane % 4
    out = torch.full((n, k), float("nan"), dtype=torch.float64)
    for h in range(2):
        pair = sz[(tile * groups + chunk * 64 // group) * 16 + g + 8 * h]
        for e in range(16):
            el = e & 3
            slot = h + 2 * (el >> 1) + 4 * (el & 1)
            code = (w[:, e >> 2] >> (4 * slot)) & 15
            out[tile * 16 + g + 8 * h, chunk * 64 + 16 * t + e] = (
                (code - 8) * bf16(pair) + bf16(pair >> 16))
    return out


def quantized(n, k, group, seed=0):
    torch.manual_seed(seed)
    weight = torch.randn(n, k) * 0.02
    packed, scales, zeros = q.quantize_int4(weight, group)
    return packed, scales.to(torch.bfloat16), zeros.to(torch.bfloat16)


@pytest.mark.parametrize("n,k,group,m,config", [
    (32, 128, 64, 1, (1, 1, 4)),    # two groups for four warps: two warps idle
    (64, 256, 128, 3, (4, 1, 16)),  # four tiles a block, sixteen warps
    (32, 512, 256, 13, (2, 2, 4)),  # two slices, the second partial
    (64, 384, 64, 40, (2, 2, 8)),   # three row blocks, the last partial
    (48, 512, 128, 9, (1, 2, 8)),
])
def test_kernel_equals_dequantize_then_multiply(n, k, group, m, config):
    packed, scales, zeros = quantized(n, k, group)
    layout, pairs = int4_mma.mma_layout(packed), int4_mma.scale_pairs(scales, zeros)
    assert layout.shape == (n // 16, k // 64, 32, 16) and layout.dtype == torch.uint8
    assert pairs.shape == (n // 16, k // group, 16, 2)
    x = (torch.randn(m, k) + 0.5).to(torch.bfloat16)  # a mean, so zeros matter
    dequantized = q.dequantize_int4(packed, scales, zeros, torch.float64)
    want = x.double() @ dequantized.t()
    got = run_matvec(x, layout, pairs, group, *config)
    assert torch.allclose(got, want, rtol=0, atol=1e-9 * want.abs().max())
    assert torch.equal(run_dequantize(layout, pairs, group), dequantized)


def test_layout_mistakes_change_the_product():
    packed, scales, zeros = quantized(32, 256, 128)
    x = (torch.randn(2, 256) + 0.5).to(torch.bfloat16)
    want = x.double() @ q.dequantize_int4(packed, scales, zeros, torch.float64).t()
    layout, pairs = int4_mma.mma_layout(packed), int4_mma.scale_pairs(scales, zeros)
    swapped_nibbles = (layout >> 4) | (layout << 4)
    swapped_lanes = layout.roll(1, dims=2)
    rows_of_pairs = pairs.roll(1, dims=2)
    for bad in (run_matvec(x, swapped_nibbles, pairs, 128, 1, 1, 4),
                run_matvec(x, swapped_lanes, pairs, 128, 1, 1, 4),
                run_matvec(x, layout, rows_of_pairs, 128, 1, 1, 4)):
        assert (bad - want).abs().max() > 1e-3 * want.abs().max()


def test_refuses_what_it_cannot_multiply():
    layer = q.QuantizedLinear(256, 40, "int4", 128)
    assert "out_features % 16" in int4_mma.refuses(layer, torch.bfloat16)
    layer = q.QuantizedLinear(256, 32, "int4", 128)
    assert "bfloat16 activations" in int4_mma.refuses(layer, torch.float32)
    assert "runs on CUDA GPUs, not cpu" in int4_mma.refuses(layer, torch.bfloat16)


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
    an opt-in the kernel does not make) and for at most 16 warps (its launch bound)."""
    for n, k in code_llama_shapes():
        assert n % 16 == 0 and k % 128 == 0  # all taken by the kernel
        for m in range(1, int4_mma.MAX_ROWS + 1):
            tiles, slices, warps = int4_mma.launch_config(n // 16, m, sms)
            assert (n // 16) % tiles == 0 and slices in (1, 2) and warps in (4, 8, 16)
            assert 512 * tiles * slices * warps <= 48 * 1024
            assert slices == (1 if m <= 8 else 2)


def test_products_check_their_inputs_before_launching():
    packed, scales, zeros = quantized(32, 256, 128)
    layout, pairs = int4_mma.mma_layout(packed), int4_mma.scale_pairs(scales, zeros)
    with pytest.raises(ValueError, match="x has 128 inputs per row; the int4 weights take 256"):
        int4_mma.product(torch.zeros(1, 128, dtype=torch.bfloat16), layout, pairs, 128)
    empty = int4_mma.product(torch.zeros(0, 256, dtype=torch.bfloat16), layout, pairs, 128)
    assert empty.shape == (0, 32)
