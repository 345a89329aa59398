"""int4 products on CUDA through our own tensor-core kernel (csrc/int4_mma.cu).

Decoding reads every weight once per token, so an int4 product should take about a
quarter of bf16's time; PyTorch's `_weight_int4pack_mm` (tinygemm) takes 53-58% of it at
one row and slows down quickly past a few rows. This kernel reads a layout made for it:
each lane's one 16-byte load is exactly the 32 codes it feeds to four m16n8k16
tensor-core products, turning 8 codes into bfloat16 costs 7 integer instructions, and the
converted codes serve up to 16 rows, so one row costs 43-48% of bf16's product and 32
rows 93% of bf16's over a 7B layer's four products (docs/quantization.md). The source is
compiled at first use by NVRTC, which ships with PyTorch's CUDA builds
(`torch.cuda._compile_kernel`), so no CUDA compiler is needed.

`mma_layout` and `scale_pairs` build the layout from quantize.py's stored pieces;
`matmul` multiplies any number of rows: up to MAX_ROWS through the kernel, more by
dequantizing the matrix and handing it to cuBLAS.
"""

import functools
from pathlib import Path
from typing import Optional, Tuple

import torch

from .quantize import unpack_int4

SOURCE = Path(__file__).parent / "csrc" / "int4_mma.cu"
# Above this many rows a product dequantizes the weights and calls cuBLAS: the kernel
# converts every tile's codes again for each 16 rows, so its time grows with the rows
# and at 64 it is about even with dequantizing (7B's wqkv: ~75 us; bf16's product 28).
MAX_ROWS = 64


def refuses(layer, dtype) -> Optional[str]:
    """Why the kernel cannot take `layer` with `dtype` activations, or None."""
    if dtype != torch.bfloat16:
        return f"the int4 tensor-core kernel takes bfloat16 activations, not {dtype}"
    if layer.out_features % 16 or layer.in_features % 64 or layer.group_size % 64:
        return ("the int4 tensor-core kernel needs out_features % 16 == 0, in_features % 64"
                " == 0 and a group size that is a multiple of 64")
    if layer.weight.device.type != "cuda":
        return f"the int4 tensor-core kernel runs on CUDA GPUs, not {layer.weight.device}"
    if torch.version.hip is not None or not hasattr(torch.cuda, "_compile_kernel"):
        return "the int4 tensor-core kernel needs a CUDA build of PyTorch with NVRTC kernels"
    if torch.cuda.get_device_capability(layer.weight.device) < (8, 0):
        return "the int4 tensor-core kernel needs a GPU of compute capability 8.0 or later"
    return unavailable()


@functools.lru_cache(maxsize=None)
def compiled(name: str, device: int):
    """The kernel `name` of csrc/int4_mma.cu (a template instance such as
    "int4_mma_matvec<2, 1>") for GPU `device`, compiled by NVRTC on first use (under 2 s)
    and loaded into that GPU's context."""
    with torch.cuda.device(device):
        return torch.cuda._compile_kernel(SOURCE.read_text(), name)


@functools.lru_cache(maxsize=None)
def unavailable() -> Optional[str]:
    """Why the kernels cannot be compiled here, or None where they can. A template
    instance is compiled too: older PyTorch compiles plain kernels but cannot name one."""
    try:
        for name in ("int4_mma_dequantize", "int4_mma_matvec<1, 1>"):
            compiled(name, torch.cuda.current_device())
    except Exception as error:  # noqa: BLE001 (no NVRTC, an old driver: use tinygemm)
        return f"the int4 tensor-core kernel did not compile ({type(error).__name__}: {error})"
    return None


def mma_layout(packed: torch.Tensor) -> torch.Tensor:
    """quantize.py's (n, k/2) codes, two per byte, as the kernel's (n/16, k/64, 32, 16)
    bytes: for tile T, chunk C and lane 4 g + t, the codes of rows 16 T + g and 16 T + g + 8
    at inputs 64 C + 16 t .. + 15, word s (4 bytes) holding inputs + 4 s .. + 4 s + 3 in the
    nibble slots the kernel's header lists: slot = h + 2 (e // 2) + 4 (e % 2) for row
    g + 8 h and input + 4 s + e."""
    codes = unpack_int4(packed)
    n, k = codes.shape
    # (tile, h, g, chunk, t, s, e // 2, e % 2) -> (tile, chunk, g, t, s, e % 2, e // 2, h)
    slots = codes.view(n // 16, 2, 8, k // 64, 4, 4, 2, 2).permute(0, 3, 2, 4, 5, 7, 6, 1)
    slots = slots.reshape(n // 16, k // 64, 32, 4, 8)
    nibbles = slots[..., 0::2] | (slots[..., 1::2] << 4)  # even slot in the low nibble
    return nibbles.reshape(n // 16, k // 64, 32, 16).contiguous()


def scale_pairs(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """(n, groups) scales and zeros as the kernel's (n/16, groups, 16, 2) bfloat16 pairs."""
    n, groups = scales.shape
    pairs = torch.stack([scales, zeros], dim=-1).to(torch.bfloat16)
    return pairs.view(n // 16, 16, groups, 2).transpose(1, 2).contiguous()


def prepare(layer, dtype) -> None:
    layer.weight = mma_layout(layer.weight)
    layer.register_buffer("scale_pairs", scale_pairs(layer.scales, layer.zeros))
    del layer.scales, layer.zeros


def launch_config(tiles: int, m: int, sms: int) -> Tuple[int, int, int]:
    """(tiles of 16 rows per block, slices of 8 rows per block, warps per block) for a
    product of `tiles` tiles by `m` rows on a GPU of `sms` multiprocessors. Several tiles
    per warp share each activation load and put more loads in flight; two slices share
    each conversion of the codes (more rows take more blocks, which read the same tiles
    from L2); the warps split the inputs, as many as it takes to give every
    multiprocessor ~10 warps or more. Swept on the H200 at every 7B shape for 1, 16 and
    32 rows (docs/quantization.md)."""
    if m <= 8:
        slices = 1
        per_block = 4 if tiles % 4 == 0 and tiles >= 512 else 2 if tiles % 2 == 0 else 1
    else:
        slices, per_block = 2, 2 if tiles % 2 == 0 else 1
    blocks = tiles // per_block * -(-m // (8 * slices))
    return per_block, slices, 16 if blocks <= sms else 8 if blocks <= 2 * sms else 4


@functools.lru_cache(maxsize=None)
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _checked(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    if x.data_ptr() % 16:  # the kernel loads 8 activations at a time
        x = x.clone()
    return x


def product(x: torch.Tensor, weight: torch.Tensor, pairs: torch.Tensor, group: int,
            config: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
    """x (m, k) bfloat16 times the layer whose layout is `weight` and `pairs`, through
    the kernel launched as `config` (tiles, slices, warps; launch_config's by default)."""
    m, k = x.shape
    n = weight.shape[0] * 16
    if k != weight.shape[1] * 64:
        raise ValueError(f"x has {k} inputs per row; the int4 weights take "
                         f"{weight.shape[1] * 64}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    x = _checked(x)
    tiles, slices, warps = config or launch_config(weight.shape[0], m, _sms(x.device))
    with torch.cuda.device(x.device):  # the kernel's context and stream are x's GPU's
        compiled(f"int4_mma_matvec<{tiles}, {slices}>", x.device.index)(
            grid=(weight.shape[0] // tiles * -(-m // (8 * slices)), 1, 1),
            block=(32 * warps, 1, 1), shared_mem=512 * tiles * slices * warps,
            args=[x, weight, pairs, out, m, n, k, group])
    return out


# The product as an operator torch.compile can trace around.
@torch.library.custom_op("llama::int4_mma_matvec", mutates_args=())
def int4_mma_matvec(x: torch.Tensor, weight: torch.Tensor, pairs: torch.Tensor,
                    group: int) -> torch.Tensor:
    return product(x, weight, pairs, group)


@int4_mma_matvec.register_fake
def _(x, weight, pairs, group):
    return x.new_empty(x.shape[0], weight.shape[0] * 16)


@torch.library.custom_op("llama::int4_mma_dequantize", mutates_args=())
def int4_mma_dequantize(weight: torch.Tensor, pairs: torch.Tensor, group: int) -> torch.Tensor:
    tiles, chunks = weight.shape[:2]
    n, k = tiles * 16, chunks * 64
    out = torch.empty(n, k, dtype=torch.bfloat16, device=weight.device)
    loads = tiles * chunks * 32
    with torch.cuda.device(weight.device):
        compiled("int4_mma_dequantize", weight.device.index)(
            grid=(-(-loads // 256), 1, 1), block=(256, 1, 1),
            args=[weight, pairs, out, n, k, group])
    return out


@int4_mma_dequantize.register_fake
def _(weight, pairs, group):
    tiles, chunks = weight.shape[:2]
    return weight.new_empty(tiles * 16, chunks * 64, dtype=torch.bfloat16)


def matmul(x: torch.Tensor, layer) -> torch.Tensor:
    # Decided while tracing (shapes are fixed per captured step), so no branch at run time.
    if x.shape[0] > MAX_ROWS:
        weight = int4_mma_dequantize(layer.weight, layer.scale_pairs, layer.group_size)
        return torch.nn.functional.linear(x, weight)
    return int4_mma_matvec(x, layer.weight, layer.scale_pairs, layer.group_size)
