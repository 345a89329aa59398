"""Matrix-vector products of decoding steps as Triton kernels, with the RMSNorm before
them and the residual add or SwiGLU after them done inside the same kernel.

Why: a decoding step at batch 1 reads every weight once and does almost no arithmetic, so
its speed is the speed at which the matrix-vector products stream the weights. Vendor
GEMV kernels reach ~90% of the copy bandwidth on an H200, and between them a step runs
small kernels (RMSNorm, residual adds, SwiGLU) whose launch gaps add up over 32 layers.
Here each program streams BLOCK_N whole weight rows and keeps the few input rows in
registers, so the norm (whose scale needs the sum of squares of the input, which every
program reads in full anyway) and the elementwise work after the product cost no extra
kernel. benchmarks/matvec.py measures these kernels against cuBLAS.

Rounding differs from the unfused layers in bf16/fp16: the normalised input and the
product are not rounded to the model dtype before the next operation (everything stays
float32 until the output is stored), which is closer to the float32 result.
"""

from typing import List, Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the layers use F.linear
    triton = None

# Launch settings, chosen by benchmarks/matvec.py on an H200 (benchmarks/RESULTS.md).
BLOCK_N = 8  # weight rows per program
BLOCK_K = 512  # input features per loop iteration (divided by the padded row count)
NUM_WARPS = 4
NUM_STAGES = 3
SUM_EACH_STEP = False
# At most this many input rows (batch rows of a decoding step) go through the kernels;
# beyond it the products start to be compute-bound and cuBLAS's GEMM kernels win.
MAX_ROWS = 4


def usable(x: torch.Tensor) -> bool:
    """Whether matvec runs for input x (..., features): CUDA, Triton, few rows."""
    return (triton is not None and x.is_cuda and x.dim() >= 1
            and x.numel() // max(x.shape[-1], 1) <= MAX_ROWS)


def matvec(x: torch.Tensor, weight: torch.Tensor, norm_weight=None, eps: float = 0.0,
           residual=None, swiglu: bool = False, block_n: int = BLOCK_N,
           block_k: int = BLOCK_K, num_warps: int = NUM_WARPS,
           num_stages: int = NUM_STAGES, sum_each_step: bool = SUM_EACH_STEP) -> torch.Tensor:
    """x @ weight.T for x (..., K) with at most MAX_ROWS rows and weight (N, K), with:

    norm_weight: RMSNorm x first (x / rms(x) * norm_weight, rms over the last dim, eps
        added to the mean square);
    swiglu: weight holds the gate rows then as many up rows (w1 and w3 stacked, as
        FeedForward.fuse makes them); returns silu(gate) * up, (..., N // 2);
    residual: (..., N) added to the result.

    The result has x's dtype; accumulation is float32.
    """
    features = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != features or weight.stride(1) != 1:
        raise ValueError(f"matvec needs a contiguous (N, {features}) weight, got "
                         f"{tuple(weight.shape)} with strides {weight.stride()}")
    n_out = weight.shape[0] // 2 if swiglu else weight.shape[0]
    rows = x.reshape(-1, features)
    if residual is not None:
        residual = residual.reshape(rows.shape[0], n_out)
    out = torch.ops.llama.matvec(rows, weight, norm_weight, eps, residual, swiglu,
                                 [block_n, block_k, num_warps, num_stages, int(sum_each_step)])
    return out.view(*x.shape[:-1], n_out)


# A custom operator, so that torch.compile treats the kernel as one opaque call instead of
# tracing into its launch at each of the ~130 call sites of a decode step.
@torch.library.custom_op("llama::matvec", mutates_args=())
def _matvec_op(x: torch.Tensor, weight: torch.Tensor, norm_weight: Optional[torch.Tensor],
               eps: float, residual: Optional[torch.Tensor], swiglu: bool,
               launch: List[int]) -> torch.Tensor:
    block_n, block_k, num_warps, num_stages, sum_each_step = launch
    x = x.contiguous()
    rows, features = x.shape
    n_out = weight.shape[0] // 2 if swiglu else weight.shape[0]
    rows_pad = triton.next_power_of_2(rows)
    out = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    res = residual.contiguous() if residual is not None else out
    block_k = max(16, min(block_k // rows_pad, triton.next_power_of_2(features)))
    _matvec[(triton.cdiv(n_out, block_n),)](
        x, weight, norm_weight if norm_weight is not None else weight, res, out, n_out,
        weight.stride(0),
        K=features, EPS=eps, ROWS=rows, ROWS_PAD=rows_pad, BLOCK_N=block_n, BLOCK_K=block_k,
        NORM=norm_weight is not None, RESIDUAL=residual is not None, SWIGLU=swiglu,
        SUM_EACH_STEP=bool(sum_each_step), num_warps=num_warps, num_stages=num_stages,
    )
    return out


@_matvec_op.register_fake
def _matvec_shape(x, weight, norm_weight, eps, residual, swiglu, launch):
    n_out = weight.shape[0] // 2 if swiglu else weight.shape[0]
    return x.new_empty(x.shape[0], n_out)


if triton is not None:

    @triton.jit
    def _matvec(x_ptr, w_ptr, norm_ptr, res_ptr, out_ptr, n_out, stride_w,
                K: tl.constexpr, EPS: tl.constexpr, ROWS: tl.constexpr,
                ROWS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                NORM: tl.constexpr, RESIDUAL: tl.constexpr, SWIGLU: tl.constexpr,
                SUM_EACH_STEP: tl.constexpr):
        """Outputs [program_id * BLOCK_N, + BLOCK_N) of every input row (x, the residual
        and the output are contiguous (ROWS, K) / (ROWS, n_out) matrices)."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, ROWS_PAD)
        n_ok = n < n_out
        # Products are summed over K once, after the loop: a sum per iteration would make
        # the threads that share a row exchange partial sums at every step.
        if SUM_EACH_STEP:
            acc = tl.zeros([ROWS_PAD, BLOCK_N], dtype=tl.float32)
            acc_up = tl.zeros([ROWS_PAD, BLOCK_N], dtype=tl.float32)
        else:
            acc = tl.zeros([ROWS_PAD, BLOCK_N, BLOCK_K], dtype=tl.float32)
            acc_up = tl.zeros([ROWS_PAD, BLOCK_N, BLOCK_K], dtype=tl.float32)
        squares = tl.zeros([ROWS_PAD, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            x = tl.load(x_ptr + r[:, None] * K + k[None, :],
                        mask=(r < ROWS)[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            if NORM:
                squares += x * x
                x = x * tl.load(norm_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            w = tl.load(w_ptr + n[:, None] * stride_w + k[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if SUM_EACH_STEP:
                acc += tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], 2)
            else:
                acc += x[:, None, :] * w.to(tl.float32)[None, :, :]
            if SWIGLU:
                u = tl.load(w_ptr + (n + n_out)[:, None] * stride_w + k[None, :],
                            mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                if SUM_EACH_STEP:
                    acc_up += tl.sum(x[:, None, :] * u.to(tl.float32)[None, :, :], 2)
                else:
                    acc_up += x[:, None, :] * u.to(tl.float32)[None, :, :]
        if SUM_EACH_STEP:
            y = acc
            up = acc_up
        else:
            y = tl.sum(acc, 2)
            up = tl.sum(acc_up, 2)
        if NORM:
            # The norm is linear in x up to this per-row scale: apply it to the sums.
            scale = tl.rsqrt(tl.sum(squares, 1) / K + EPS)
            y = y * scale[:, None]
        if SWIGLU:
            if NORM:
                up = up * scale[:, None]
            y = y * tl.sigmoid(y) * up
        keep = (r < ROWS)[:, None] & n_ok[None, :]
        if RESIDUAL:
            y += tl.load(res_ptr + r[:, None] * n_out + n[None, :], mask=keep,
                         other=0.0).to(tl.float32)
        tl.store(out_ptr + r[:, None] * n_out + n[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=keep)
