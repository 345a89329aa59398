"""Matrix products with quantized weights (quantize.py's formats), one implementation per
device and mode, chosen once at build time (`select_kernel`) and installed on every
QuantizedLinear of the model (`use_kernel`), which converts the stored layout into the
kernel's own where it has one.

| kernel       | modes      | where            | what                                          |
|--------------|------------|------------------|-----------------------------------------------|
| plain        | int8, int4 | every device     | dequantize to the activation dtype, F.linear  |
| cpu          | int8, int4 | CPU              | aten._weight_int8pack_mm / _int4pack_mm_for_cpu |
| cpu_native   | int8, int4 | CPU, C++ compiler | csrc/matvec.cpp up to 4 rows; more: plain     |
| tinygemm     | int4       | CUDA, bfloat16   | aten._weight_int4pack_mm (tensor-core tiles); |
|              |            |                  | more rows: dequantized, then F.linear         |
| cuda_int4    | int4       | CUDA, bfloat16   | int4_mma.py: csrc/int4_mma.cu up to 64 rows;  |
|              |            |                  | more rows: dequantized, then F.linear         |
| triton       | int8, int4 | CUDA (Triton)    | the stored layout: triton_matvec for one int8 |
|              |            |                  | row, _quantized_matmul below otherwise        |
| cuda_int8    | int8       | CUDA (Triton)    | triton (int8's default on CUDA)               |

cpu_native is the default on CPUs where its C++ source compiles (native_kernels): ATen's
quantized kernels are slower than float32 there. cuda_int8 is int8's default on CUDA, in
eager, CUDA-graph and compiled steps alike: the plain path writes a dequantized copy of
every weight at every step, and even under torch.compile, where inductor turns the plain
expression for one row into a matrix-vector kernel that converts the weights as it reads
them, triton_matvec decodes 7B 25% faster (313.8 against 250.7 tok/s on an H200); for more
rows inductor writes the dequantized weights out first (docs/quantization.md). cuda_int4
is int4's default on CUDA with bfloat16 where NVRTC compiles it (tinygemm otherwise, and
for the layers it refuses): 7B decodes 422.4 tok/s against tinygemm's 376.8 on an H200,
and at batch 32 its products take 93% of bf16's time where tinygemm's take 4x.
"""

import ctypes
import functools
import math
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from . import int4_mma
from .quantize import QuantizedLinear, check_mode, plain_matmul, quantized_layers, unpack_int4

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


@dataclass(frozen=True)
class Kernel:
    name: str
    modes: tuple
    matmul: Callable  # (x (M, K), layer) -> (M, N) in x's dtype
    prepare: Callable  # (layer, dtype): the layer's buffers into the kernel's layout, once
    refuses: Callable  # (layer, dtype) -> why this kernel cannot take the layer, or None
    fallback: str = "plain"  # the kernel for the layers this one refuses


def _cast_scales(layer: QuantizedLinear, dtype: torch.dtype) -> None:
    """Scales (and zeros) in the activation dtype, so no call converts them again."""
    for name in ("scales", "zeros"):
        if hasattr(layer, name):
            setattr(layer, name, getattr(layer, name).to(dtype))


def _no_limits(layer, dtype) -> Optional[str]:
    return None


def _cpu_activations(dtype) -> Optional[str]:
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the CPU kernels take float32/bfloat16/float16 activations, not {dtype}"
    return None


def _cpu_dtype(layer, dtype) -> Optional[str]:
    reason = _cpu_activations(dtype)
    if reason is None and layer.mode == "int4" and layer.out_features % 16:
        reason = f"the CPU int4 kernel needs out_features % 16 == 0 ({layer.out_features})"
    return reason


def _cpu_int8_matmul(x, layer):
    return torch.ops.aten._weight_int8pack_mm(x.contiguous(), layer.weight, layer.scales)


# Rows up to which cpu_native multiplies: each row reads every weight once, which suits
# decoding. Larger products (prefill) dequantize and go to the BLAS library: a 256-token
# prefill of a 1B model takes 9.4 s so in int8 against 171 s through ATen's int8 kernel
# (float32: 5 s).
NATIVE_MAX_ROWS = 4


@functools.lru_cache(maxsize=None)
def native_kernels() -> Tuple[Optional[object], Optional[str]]:
    """(the module compiled from csrc/matvec.cpp, None): built for this CPU's vector
    extensions the first time a process asks (torch.utils.cpp_extension: about 40 s, then
    cached per machine, so later processes only load it); or (None, why) where it cannot
    be built, such as without a C++ compiler or ninja."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    # -ffast-math lets the compiler vectorise the conversions and sums better (1.3x on
    # this project's AVX2 test machine); the kernels only multiply and add.
    flags = ["-O3", "-ffast-math"] + (["-mavx2", "-mfma"] if "avx" in capability else [])
    # Loading a cached build takes well under a second; a first build about 40 s, which
    # should not look like a hang.
    notice = threading.Timer(2.0, lambda: print(
        "compiling the CPU kernels for quantized weights (once per machine)...",
        file=sys.stderr, flush=True))
    notice.start()
    try:
        from torch.utils import cpp_extension
        module = cpp_extension.load(
            name=f"llama_matvec_{capability}", extra_cflags=flags, verbose=False,
            sources=[str(Path(__file__).parent / "csrc" / "matvec.cpp")])
    except Exception as error:  # noqa: BLE001 (any build failure: use ATen's kernels)
        return None, f"the C++ CPU kernels did not build ({type(error).__name__}: {error})"
    finally:
        notice.cancel()
    return module, None


# native_kernels' products as operators torch.compile can trace around.
@torch.library.custom_op("llama::int8_matvec", mutates_args=())
def int8_matvec(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return native_kernels()[0].int8_matvec(x, weight, scales)


@int8_matvec.register_fake
def _(x, weight, scales):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("llama::int4_matvec", mutates_args=())
def int4_matvec(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor, group: int) -> torch.Tensor:
    return native_kernels()[0].int4_matvec(x, weight, scales, zeros, group)


@int4_matvec.register_fake
def _(x, weight, scales, zeros, group):
    return x.new_empty(x.shape[0], weight.shape[0])


def _native_refuses(layer, dtype) -> Optional[str]:
    return _cpu_activations(dtype) or native_kernels()[1]


def _native_matmul(x, layer):
    # Decided while tracing (shapes are fixed per compiled step), so no branch at run time.
    if x.shape[0] > NATIVE_MAX_ROWS:
        return plain_matmul(x, layer)
    x32 = x.float().contiguous()
    if layer.mode == "int8":
        out = int8_matvec(x32, layer.weight, layer.scales.float())
    else:
        out = int4_matvec(x32, layer.weight, layer.scales.float(), layer.zeros.float(),
                          layer.group_size)
    return out.to(x.dtype)


def _scales_and_zeros(layer: QuantizedLinear, dtype: torch.dtype) -> None:
    """Replace scales and zeros (N, G) by the (G, N, 2) pairs PyTorch's int4 kernels read."""
    pairs = torch.stack([layer.scales.t(), layer.zeros.t()], dim=-1).to(dtype).contiguous()
    del layer.scales, layer.zeros
    layer.register_buffer("scales_and_zeros", pairs)


def _cpu_int4_prepare(layer, dtype):
    codes = unpack_int4(layer.weight).to(torch.int32)
    layer.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    _scales_and_zeros(layer, dtype)


def _cpu_int4_matmul(x, layer):
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), layer.weight,
                                                      layer.group_size, layer.scales_and_zeros)


def _cpu_prepare(layer, dtype):
    (_cast_scales if layer.mode == "int8" else _cpu_int4_prepare)(layer, dtype)


def _cpu_matmul(x, layer):
    return (_cpu_int8_matmul if layer.mode == "int8" else _cpu_int4_matmul)(x, layer)


def _tinygemm_refuses(layer, dtype) -> Optional[str]:
    if torch.version.hip is not None:  # ROCm packs 16-row tiles for 64 lanes
        return "tinygemm_dequantize reads the CUDA build's layout of _weight_int4pack_mm"
    if layer.weight.device.type != "cuda":
        return f"_weight_int4pack_mm runs on CUDA GPUs, not {layer.weight.device}"
    if dtype != torch.bfloat16:
        return f"_weight_int4pack_mm takes bfloat16 activations only, not {dtype}"
    if layer.group_size not in (32, 64, 128, 256):
        return f"_weight_int4pack_mm takes group sizes 32..256, not {layer.group_size}"
    if layer.out_features % 8 or layer.in_features % 32:
        return "_weight_int4pack_mm needs out_features % 8 == 0 and in_features % 32 == 0"
    return None


def _tinygemm_prepare(layer, dtype):
    # Inner k-tiles: 16 inputs each, packed side by side for wider loads (8 is the widest).
    inner = next(t for t in (8, 4, 2) if layer.in_features % (16 * t) == 0)
    layer.weight = torch.ops.aten._convert_weight_to_int4pack(layer.weight.contiguous(), inner)
    _scales_and_zeros(layer, dtype)


# Above this many rows tinygemm is slower than dequantizing the weights into a bf16 matrix
# and multiplying with cuBLAS (docs/quantization.md): its kernel is made for a few rows.
TINYGEMM_MAX_ROWS = 16


def _tinygemm_matmul(x, layer):
    # Decided while tracing (shapes are fixed per captured step), so no branch at run time.
    if x.shape[0] > TINYGEMM_MAX_ROWS:
        return torch.nn.functional.linear(x, tinygemm_dequantize(layer.weight,
                                                                 layer.scales_and_zeros,
                                                                 layer.group_size))
    return torch.ops.aten._weight_int4pack_mm(x.contiguous(), layer.weight, layer.group_size,
                                              layer.scales_and_zeros)


def tinygemm_dequantize(packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                        group_size: int) -> torch.Tensor:
    """The (out, in) matrix in scales_and_zeros' dtype that `_convert_weight_to_int4pack`'s
    layout `packed` (out / 8, in / (16 inner), 32, inner / 2) and its (groups, out, 2)
    scales and zeros stand for. One Triton program per 8 output rows."""
    tiles, k_tiles, _, words = packed.shape
    inner = 2 * words
    n, k = 8 * tiles, k_tiles * 16 * inner
    out = torch.empty(n, k, dtype=scales_and_zeros.dtype, device=packed.device)
    _tinygemm_dequantize[(tiles,)](packed, scales_and_zeros, out, n, k, k_tiles,
                                   GROUP=group_size, INNER=inner)
    return out


def _triton_refuses(layer, dtype) -> Optional[str]:
    if triton is None:
        return "Triton is not installed"
    if _block_k(layer) is None:
        return ("the Triton kernel needs in_features (int8) or group_size (int4) to be a "
                "multiple of 16")
    return None


KERNELS = {
    "plain": Kernel("plain", ("int8", "int4"), plain_matmul, _cast_scales, _no_limits),
    "cpu": Kernel("cpu", ("int8", "int4"), _cpu_matmul, _cpu_prepare, _cpu_dtype),
    "cpu_native": Kernel("cpu_native", ("int8", "int4"), _native_matmul, _cast_scales,
                         _native_refuses),
    "tinygemm": Kernel("tinygemm", ("int4",), _tinygemm_matmul, _tinygemm_prepare,
                       _tinygemm_refuses),
    "triton": Kernel("triton", ("int8", "int4"), lambda x, layer: triton_matmul(x, layer),
                     lambda layer, dtype: _triton_prepare(layer, dtype), _triton_refuses),
    "cuda_int4": Kernel("cuda_int4", ("int4",), int4_mma.matmul, int4_mma.prepare,
                        int4_mma.refuses, fallback="tinygemm"),
}
# int8's default on CUDA: the Triton kernels under a name of its own (the int8 mode only).
KERNELS["cuda_int8"] = replace(KERNELS["triton"], name="cuda_int8", modes=("int8",))


def select_kernel(device, mode: str, dtype: torch.dtype, name: Optional[str] = None) -> Kernel:
    """The kernel for `mode` weights and `dtype` activations on `device`: `name` if given
    (one of KERNELS), otherwise the default for the device."""
    check_mode(mode)
    device = torch.device(device)
    if name is None:
        name = "plain"
        if device.type == "cpu":
            name = "cpu_native" if native_kernels()[0] is not None else "cpu"
        elif device.type == "cuda" and mode == "int4" and dtype == torch.bfloat16:
            name = "tinygemm" if int4_mma.unavailable() else "cuda_int4"
        elif device.type == "cuda" and mode == "int8" and triton is not None:
            name = "cuda_int8"
    if name not in KERNELS or mode not in KERNELS[name].modes:
        choices = [k for k, kernel in KERNELS.items() if mode in kernel.modes]
        raise ValueError(f"unknown kernel {name!r} for {mode}; choose one of {choices}")
    return KERNELS[name]


def use_kernel(model: nn.Module, kernel: Kernel, dtype: torch.dtype) -> Dict[str, str]:
    """Install `kernel` on every QuantizedLinear of `model` (after loading and after any
    .to(dtype): the kernel's layout is what the buffers hold from then on). Layers it
    cannot take go to its fallback kernel (in the end the plain path, which takes any);
    returns {layer name: why, and which kernel it got} for those."""
    fallbacks = {}
    for name, layer in quantized_layers(model).items():
        chosen, reasons = kernel, []
        reason = kernel.refuses(layer, dtype)
        while reason:  # ends: the plain path takes every layer
            chosen = KERNELS[chosen.fallback]
            reasons.append(f"{reason}; {chosen.name} instead")
            reason = chosen.refuses(layer, dtype)
        if reasons:
            fallbacks[name] = "; then ".join(reasons)
        chosen.prepare(layer, dtype)
        layer.matmul, layer.kernel = chosen.matmul, chosen.name
        if layer.weight.device.type == "cpu":
            # Repacking frees temporaries of a few megabytes between weights that stay;
            # glibc keeps such holes in its heap unless asked to return them.
            _trim_host_heap()
    return fallbacks


def _glibc_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


_MALLOC_TRIM = _glibc_malloc_trim()


def _trim_host_heap() -> None:
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# --- Triton: dequantize inside the product, reading the stored layout --------------------

# Above this many rows a product is bound by arithmetic, not by reading the weights: the
# weights are dequantized once and the product goes to the vendor's matrix multiply.
DEQUANTIZE_ABOVE_ROWS = 256


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int  # programs sharing one output tile, each over a slice of the inputs
    num_warps: int = 4
    num_stages: int = 3


def _block_k(layer: QuantizedLinear) -> Optional[int]:
    """Inputs per step: a power of two from 16 to 128 within one int4 group."""
    width = layer.group_size if layer.mode == "int4" else layer.in_features
    return next((b for b in (128, 64, 32, 16) if width % b == 0), None)


def launch_config(m: int, layer: QuantizedLinear, sms: int,
                  element_size: int = 2) -> LaunchConfig:
    """Tile sizes for an (m, in) x (in, out) product with activations of `element_size`
    bytes on a GPU of `sms` multiprocessors: one row per program for decoding one
    sequence, tensor-core tiles of 16-64 rows for batches. Programs share out the inputs
    (split) until there are enough of them: 16 per SM for one row, where a program's few
    loads in flight must be multiplied to keep the memory busy, one per SM for tiles of
    many rows. Swept on an H200 at 7B shapes (docs/quantization.md)."""
    block_k = _block_k(layer)
    if m == 1:
        block_m, block_n, wanted = 1, 32, 16 * sms
    else:
        block_m, block_n, wanted = min(64, max(16, triton.next_power_of_2(m))), 64, sms
        if element_size > 2:  # three stages of float32 64 x 128 tiles: past 99 KB of
            block_k = min(64, block_k)  # shared memory on sm_86/89 GPUs
    tiles = triton.cdiv(layer.out_features, block_n) * triton.cdiv(m, block_m)
    steps = layer.in_features // block_k
    split = 1
    while tiles * split < wanted and steps // (2 * split) >= 4:
        split *= 2
    return LaunchConfig(block_m, block_n, block_k, split)


def triton_matmul(x: torch.Tensor, layer: QuantizedLinear,
                  config: Optional[LaunchConfig] = None) -> torch.Tensor:
    """x (M, K) @ dequantized(layer)^T -> (M, N) in x's dtype, float32 accumulation."""
    m, k = x.shape
    if config is None and m == 1 and layer.mode == "int8":
        return triton_matvec(x, layer)
    if m > DEQUANTIZE_ABOVE_ROWS and config is None:
        return plain_matmul(x, layer)
    if config is None:
        config = launch_config(m, layer, layer.sms, x.element_size())
    n = layer.out_features
    x = x.contiguous()
    steps = k // config.block_k
    k_per_split = math.ceil(steps / config.split_k) * config.block_k
    if config.split_k == 1:
        out = torch.empty(1, m, n, dtype=x.dtype, device=x.device)
    else:  # float32 partial sums, added below
        out = torch.empty(config.split_k, m, n, dtype=torch.float32, device=x.device)
    int4 = layer.mode == "int4"
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), config.split_k)
    _quantized_matmul[grid](
        x, layer.weight, layer.scales, layer.zeros if int4 else layer.scales, out,
        m, n, k, k_per_split, layer.weight.stride(0), layer.scales.stride(0),
        INT4=int4, GROUP=layer.group_size if int4 else 1, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, IEEE=x.dtype == torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out[0] if config.split_k == 1 else out.sum(0).to(x.dtype)


# triton_matvec's tile: 8 whole rows per program, 512 inputs per step. Swept on an H200 at
# 7B shapes (docs/quantization.md): one program per 8 rows already gives 512-2,752
# programs, so the inputs need no splitting and no second pass to add partial sums.
MATVEC_ROWS, MATVEC_INPUTS = 8, 512


def triton_matvec(x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
    """One row x (1, K) @ dequantized(layer)^T -> (1, N) in x's dtype."""
    n, k = layer.weight.shape
    x = x.contiguous()
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    block_k = min(MATVEC_INPUTS, triton.next_power_of_2(k))
    # In the sweep, 8 warps per program were best up to 8,192 outputs, 4 above.
    warps = 8 if n <= 8192 else 4
    _int8_rows_matvec[(triton.cdiv(n, MATVEC_ROWS),)](
        x, layer.weight, layer.scales, out, n, k, layer.weight.stride(0),
        BLOCK_N=MATVEC_ROWS, BLOCK_K=block_k, num_warps=warps, num_stages=1)
    return out


def _triton_prepare(layer: QuantizedLinear, dtype: torch.dtype) -> None:
    _cast_scales(layer, dtype)
    # Asked once here, not in every (compiled, graph-captured) call.
    device = layer.weight.device
    layer.sms = (torch.cuda.get_device_properties(device).multi_processor_count
                 if device.type == "cuda" else 1)


if triton is not None:

    @triton.jit
    def _tinygemm_dequantize(packed_ptr, sz_ptr, out_ptr, N, K, k_tiles,
                             GROUP: tl.constexpr, INNER: tl.constexpr):
        """Rows 8 p .. 8 p + 7 of the matrix, p = program_id(0), one block of 16 INNER
        inputs at a time. The layout of a block (PyTorch's int4mm.cu): 32 lanes of
        INNER / 2 words; lane t holds row t // 4, and nibble j of word w (from the low
        end) is input 32 w + 16 (j // 2 % 2) + 8 (j % 2) + 2 (t % 4) + j // 4. The
        nibbles are put in row order in registers, so each row is stored contiguously."""
        WORDS: tl.constexpr = INNER // 2
        WIDTH: tl.constexpr = 16 * INNER
        tile = tl.program_id(0)
        lane = tl.arange(0, 32)[:, None]
        word = tl.arange(0, WORDS)[None, :]
        shift = 4 * tl.arange(0, 8)[None, None, :]
        row = tile * 8 + tl.arange(0, 8)[:, None]
        col = tl.arange(0, WIDTH)[None, :]
        for block in range(0, k_tiles):
            words = tl.load(packed_ptr + ((tile * k_tiles + block) * 32 + lane) * WORDS + word)
            codes = (words[:, :, None] >> shift) & 15  # (lane, word, j)
            # (row, t % 4, word, j // 4, j // 2 % 2, j % 2) -> input order within a row
            codes = tl.reshape(codes, (8, 4, WORDS, 2, 2, 2))
            codes = tl.reshape(tl.permute(codes, (0, 2, 4, 5, 1, 3)), (8, WIDTH))
            k = block * WIDTH + col
            pair = sz_ptr + ((k // GROUP) * N + row) * 2
            value = ((codes - 8).to(tl.float32) * tl.load(pair).to(tl.float32)
                     + tl.load(pair + 1).to(tl.float32))
            tl.store(out_ptr + row * K + k, value.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _quantized_matmul(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, k_per_split,
                          stride_wn, stride_sn, INT4: tl.constexpr, GROUP: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        """One (BLOCK_M, BLOCK_N) tile of out[split] = x[:, slice] @ w[:, slice]^T over
        the inputs of program_id(2)'s slice. int4: the codes go through the product, and
        each group's scale and zero apply to its partial sums (a group holds whole
        steps); int8: the row scale applies at the end. BLOCK_M == 1: products and sums
        on the vector units (a matrix-vector product); otherwise tensor-core dots."""
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < M, rn < N
        k_start = tl.program_id(2) * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_ok[:, None], other=0.0)
            if INT4:
                rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                packed = tl.load(w_ptr + rn[:, None] * stride_wn + rb[None, :],
                                 mask=n_ok[:, None], other=0)
                # High nibble: input 2j, low nibble: input 2j + 1 (quantize.pack_int4).
                w = tl.interleave(packed >> 4, packed & 15).to(tl.float32)
            else:
                w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :],
                            mask=n_ok[:, None], other=0).to(tl.float32)
            if BLOCK_M == 1:
                part = tl.sum(x.to(tl.float32) * w, axis=1)[None, :]
            elif IEEE:
                part = tl.dot(x, tl.trans(w), input_precision="ieee")
            else:  # codes are small integers: exact in any float dtype
                part = tl.dot(x, tl.trans(w.to(x.dtype)))
            if INT4:
                # sum_k x (c - 8) s + x z = s * sum_k x c + (z - 8 s) * sum_k x
                g = k0 // GROUP
                scale = tl.load(s_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
                zero = tl.load(z_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
                x_sum = tl.sum(x.to(tl.float32), axis=1)
                acc += part * scale[None, :] + x_sum[:, None] * (zero - 8.0 * scale)[None, :]
            else:
                acc += part
        if not INT4:
            acc *= tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + tl.program_id(2) * M * N + rm[:, None] * N + rn[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _int8_rows_matvec(x_ptr, w_ptr, s_ptr, out_ptr, N, K, stride_wn,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[n] = s[n] * sum_k x[k] w[n, k] for the BLOCK_N rows of program_id(0), each
        over all its inputs. The products are summed element by element into a
        (BLOCK_N, BLOCK_K) float32 tile and reduced across it once at the end, so the
        loop only loads, converts and multiplies."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0)
            x = tl.load(x_ptr + rk, mask=k_ok, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        out = tl.sum(acc, axis=1) * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rn, out.to(out_ptr.dtype.element_ty), mask=n_ok)
