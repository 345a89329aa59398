"""Weight-only quantization: 8-bit and 4-bit weights for the model's linear layers.

Formats (one storage layout for every device; kernels.py-style fast paths convert it to
their own layout once, at build time, see quant_kernels.py):

- int8: per output channel, symmetric. `w[n, k] ~= weight[n, k] * scales[n]`, weight
  int8 in [-127, 127], scales (N,).
- int4: groups of `group_size` consecutive inputs of one output channel, asymmetric.
  `w[n, k] ~= (code[n, k] - 8) * scales[n, g] + zeros[n, g]` with g = k // group_size and
  code in [0, 15]; `zeros` is the value that code 8 stands for (PyTorch's int4 kernels
  read scales and zeros this way). Two codes per byte along the input dimension, the
  even input in the high nibble: weight is uint8 (N, K / 2), the layout that PyTorch's
  CUDA packing (`_convert_weight_to_int4pack`) takes and that a Triton kernel unpacks
  with two shifts. scales and zeros are (N, K / group_size).

Scales and zeros are stored in bfloat16 whatever the model dtype: the GPU int4 kernel
takes them so, they cost half of float32's bytes (a sixteenth of int4 weights' size at
group 128), and the codes are computed against the rounded values, so rounding them adds
no error beyond the quantization step itself. They convert exactly to float32 and, at
any scale a trained weight has, to float16.

Every row is quantized on its own, so quantizing rows one by one, a rank's slice of
them, or wq/wk/wv before fusing them into wqkv gives the same bytes as quantizing the
whole matrix: pieces concatenate along dim 0. A rank of a row-parallel layer holds some
columns of every row: its int4 groups lie within them (the rank's width must be a
multiple of the group size), and its int8 scales are the whole rows' (the ranks agree on
them, QuantizedLinear.quantized), so the pieces are the whole matrix's, sliced, and a
model computes the same at every model-parallel size.
"""

from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fairscale
from fairscale.nn.model_parallel.initialize import get_model_parallel_group
from torch import nn

from .distributed import all_gather_last_dim, all_reduce, model_parallel_world_size

MODES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128
SCALE_DTYPE = torch.bfloat16
# Layers that Llama.build leaves in the model dtype: the output projection, whose int4
# error shows in every logit while it is a small share of a step's bytes (measured in
# docs/quantization.md).
KEPT = ("output",)
ROWS_PER_CHUNK = 2048  # rows quantized at once: bounds the float32 temporaries
_TINY = torch.finfo(SCALE_DTYPE).tiny  # the scale of an all-zero row or group


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {MODES} "
                         "(or None for unquantized weights)")
    return mode


def check_group_size(in_features: int, group_size: int) -> None:
    if group_size < 2 or group_size % 2:
        raise ValueError(f"int4 group_size must be a positive even number, got {group_size}")
    if in_features % group_size:
        divisors = [g for g in (256, 128, 64, 32) if in_features % g == 0]
        hint = (f"use group_size={divisors[0]}" if divisors else
                "quantize this layer as int8 or leave it unquantized (skip)")
        raise ValueError(
            f"int4 needs each layer's input width (per model-parallel rank) to be a multiple "
            f"of group_size, but {in_features} is not a multiple of {group_size}: {hint}")


def _in_row_chunks(weight: torch.Tensor, quantize_rows, outputs):
    """Fill `outputs` (tensors with one row per weight row) chunk by chunk, so that the
    float32 temporaries stay small whatever the matrix size."""
    for start in range(0, weight.shape[0], ROWS_PER_CHUNK):
        rows = slice(start, start + ROWS_PER_CHUNK)
        for out, piece in zip(outputs, quantize_rows(weight[rows].float())):
            out[rows] = piece
    return outputs


def quantize_int8(weight: torch.Tensor, absmax: Optional[torch.Tensor] = None):
    """(weight int8 (N, K), scales (N,)) with weight[n] * scales[n] ~= the input row.
    absmax: each row's largest magnitude, when `weight` holds only some of each row's
    inputs (a rank's slice of a row-parallel layer) and the scale is the whole row's."""
    n, k = weight.shape
    device = weight.device
    if absmax is None:
        absmax = row_absmax(weight)
    outputs = (torch.empty(n, k, dtype=torch.int8, device=device),
               torch.empty(n, dtype=SCALE_DTYPE, device=device))
    for start in range(0, n, ROWS_PER_CHUNK):  # bounds the float32 temporaries
        rows = slice(start, start + ROWS_PER_CHUNK)
        outputs[0][rows], outputs[1][rows] = _int8_rows(weight[rows].float(), absmax[rows])
    return outputs


def row_absmax(weight: torch.Tensor) -> torch.Tensor:
    """Each row's largest magnitude, float32 (N,)."""
    return torch.cat([weight[start:start + ROWS_PER_CHUNK].float().abs().amax(dim=1)
                      for start in range(0, weight.shape[0], ROWS_PER_CHUNK)])


def _int8_rows(w: torch.Tensor, absmax: torch.Tensor):
    scales = (absmax / 127).clamp(min=_TINY).to(SCALE_DTYPE)
    # Against the rounded scale: the largest entry lands within 127.25, so the clamp
    # moves it less than half a step.
    codes = torch.round(w / scales.float()[:, None]).clamp_(-127, 127)
    return codes.to(torch.int8), scales


def dequantize_int8(weight: torch.Tensor, scales: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (weight.float() * scales.float()[:, None]).to(dtype)


def quantize_int4(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE):
    """(packed weight uint8 (N, K/2), scales, zeros (N, K/group_size)); see the module
    docstring for the format. ValueError unless group_size divides K."""
    n, k = weight.shape
    check_group_size(k, group_size)
    device = weight.device
    outputs = (torch.empty(n, k // 2, dtype=torch.uint8, device=device),
               torch.empty(n, k // group_size, dtype=SCALE_DTYPE, device=device),
               torch.empty(n, k // group_size, dtype=SCALE_DTYPE, device=device))
    return _in_row_chunks(weight, lambda w: _int4_rows(w, group_size), outputs)


def _int4_rows(w: torch.Tensor, group_size: int):
    groups = w.unflatten(1, (-1, group_size))
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    scales = ((high - low) / 15).clamp(min=_TINY).to(SCALE_DTYPE)
    zeros = (low + 8 * scales.float()).to(SCALE_DTYPE)
    # Codes against the rounded scales and zeros, so the stored values are the truth.
    lowest = zeros.float() - 8 * scales.float()
    codes = torch.round((groups - lowest[..., None]) / scales.float()[..., None])
    return pack_int4(codes.clamp_(0, 15).to(torch.uint8).flatten(1)), scales, zeros


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes (N, K) in [0, 15] -> uint8 (N, K/2), input 2j in the high nibble of byte j."""
    return (codes[:, 0::2] << 4) | codes[:, 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) -> codes uint8 (N, K); inverse of pack_int4."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).flatten(-2)


def dequantize_int4(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    codes = unpack_int4(weight).float().unflatten(1, (scales.shape[1], -1))
    w = (codes - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.flatten(1).to(dtype)


def quantize_weight(weight: torch.Tensor, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
                    absmax: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """The quantized pieces of one (out, in) weight, on its device, by buffer name of
    QuantizedLinear: {"weight", "scales"} for int8, plus "zeros" for int4. absmax: see
    quantize_int8 (int8 only)."""
    if check_mode(mode) == "int8":
        q, scales = quantize_int8(weight, absmax)
        return {"weight": q, "scales": scales}
    q, scales, zeros = quantize_int4(weight, group_size)
    return {"weight": q, "scales": scales, "zeros": zeros}


def dequantize_weight(pieces: Dict[str, torch.Tensor], mode: str,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) weight that quantize_weight's pieces stand for."""
    if check_mode(mode) == "int8":
        return dequantize_int8(pieces["weight"], pieces["scales"], dtype)
    return dequantize_int4(pieces["weight"], pieces["scales"], pieces["zeros"], dtype)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ w.T with w dequantized to x's dtype first: what a model holding the dequantized
    weights in x's dtype computes. (Scaling the product instead rounds it twice.)"""
    return F.linear(x, weight.to(x.dtype) * scales.to(x.dtype)[:, None])


def int4_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor) -> torch.Tensor:
    return F.linear(x, dequantize_int4(weight, scales, zeros, x.dtype))


def plain_matmul(x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
    """x @ w.T through PyTorch operations only: runs on every device. Under torch.compile
    each becomes kernels that convert the weights as they read them."""
    if layer.mode == "int8":
        return int8_linear(x, layer.weight, layer.scales)
    return int4_linear(x, layer.weight, layer.scales, layer.zeros)


class QuantizedLinear(nn.Module):
    """A model-parallel linear layer (this rank's (out, in) slice, no bias) with quantized
    weights, and the parallel step of the layer it replaces: gather the output over ranks
    (column-parallel with gather_output) or sum it (row-parallel with reduce_output)."""

    def __init__(self, in_features: int, out_features: int, mode: str,
                 group_size: int = DEFAULT_GROUP_SIZE, gather_output: bool = False,
                 reduce_output: bool = False, device=None):
        super().__init__()
        if gather_output and reduce_output:
            raise ValueError("a layer either gathers its output or sums it, not both")
        self.in_features, self.out_features = in_features, out_features
        self.mode = check_mode(mode)
        self.group_size = group_size if mode == "int4" else None
        self.gather_output, self.reduce_output = gather_output, reduce_output
        self.matmul = plain_matmul  # (x, layer) -> y; quant_kernels.use_kernel sets it
        self.kernel = "plain"
        if mode == "int4":
            check_group_size(in_features, group_size)
        shapes = pieces_shapes(out_features, in_features, mode, group_size)
        for name, (shape, dtype) in shapes.items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))

    @classmethod
    def replacing(cls, layer: nn.Module, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
                  empty: bool = False) -> "QuantizedLinear":
        """The quantized counterpart of a Column/RowParallelLinear, on its device: with
        its weight quantized, or with `empty` uninitialised buffers to load into (on the
        meta device when the layer's weight is there)."""
        out_features, in_features = layer.weight.shape
        column = isinstance(layer, fairscale.ColumnParallelLinear)
        new = cls(in_features, out_features, mode, group_size,
                  gather_output=column and layer.gather_output,
                  reduce_output=not column and getattr(layer, "reduce_output", True),
                  device=layer.weight.device)
        if not empty:
            new.load_pieces(new.quantized(layer.weight.detach()))
        return new

    def quantized(self, weight: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The pieces of this rank's (out, in) `weight`, the same at every world size: a
        rank of a row-parallel layer (its output summed over ranks) holds a slice of each
        row, so int8 takes each row's largest magnitude over all ranks (a collective: every
        rank quantizes its layers in the same order); int4 groups lie within a slice."""
        absmax = None
        if self.mode == "int8" and self.reduce_output and model_parallel_world_size() > 1:
            absmax = row_absmax(weight)
            torch.distributed.all_reduce(absmax, torch.distributed.ReduceOp.MAX,
                                         group=get_model_parallel_group())
        return quantize_weight(weight, self.mode, self.group_size or DEFAULT_GROUP_SIZE,
                               absmax)

    def load_pieces(self, pieces: Dict[str, torch.Tensor]) -> None:
        """Take quantize_weight's pieces as this layer's buffers (no copy)."""
        mine = dict(self.named_buffers())
        if set(pieces) != set(mine):
            raise ValueError(f"expected pieces {sorted(mine)}, got {sorted(pieces)}")
        for name, piece in pieces.items():
            if piece.shape != mine[name].shape or piece.dtype != mine[name].dtype:
                raise ValueError(
                    f"{name}: expected {tuple(mine[name].shape)} {mine[name].dtype}, got "
                    f"{tuple(piece.shape)} {piece.dtype} (another mode or group size?)")
            setattr(self, name, piece)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x.reshape(-1, x.shape[-1]), self).unflatten(0, x.shape[:-1])
        if self.gather_output:
            return all_gather_last_dim(y)
        return all_reduce(y) if self.reduce_output else y

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"mode={self.mode}{group}, kernel={self.kernel}")


def pieces_shapes(out_features: int, in_features: int, mode: str,
                  group_size: int = DEFAULT_GROUP_SIZE) -> dict:
    """{buffer name: (shape, dtype)} of a quantized (out, in) weight."""
    if check_mode(mode) == "int8":
        return {"weight": ((out_features, in_features), torch.int8),
                "scales": ((out_features,), SCALE_DTYPE)}
    groups = (out_features, in_features // group_size)
    return {"weight": ((out_features, in_features // 2), torch.uint8),
            "scales": (groups, SCALE_DTYPE), "zeros": (groups, SCALE_DTYPE)}


def quantize(model: nn.Module, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
             skip: Iterable[str] = (), empty: bool = False) -> nn.Module:
    """Replace every fairscale Column/RowParallelLinear in `model` (the model's own
    subclasses included) by a QuantizedLinear, in place; returns the model.

    skip: module names (as in named_modules, e.g. "output") left as they are.
    empty: do not quantize the current weights (placeholders before loading); the new
    layers' buffers are uninitialised, for quantized_entries' pieces to be loaded into.
    Otherwise each weight is quantized on its device and released as its layer goes.
    """
    check_mode(mode)
    # Layers left out before may be quantized now, in the same format only.
    wanted = (mode, group_size if mode == "int4" else None)  # QuantizedLinear's own rule
    for name, layer in quantized_layers(model).items():
        if (layer.mode, layer.group_size) != wanted:
            groups = f", groups of {layer.group_size}" if layer.group_size else ""
            raise ValueError(f"the model is quantized already ({name} holds {layer.mode}"
                             f"{groups}); its other layers can take that format only")
    # Names only: a reference kept to a replaced layer would keep its full-precision
    # weight alive until the end.
    targets = linear_layers(model, skip)
    if mode == "int4":  # refuse before touching any layer
        misfit = int4_misfit(model, group_size, skip)
        if misfit:
            name, width = misfit
            try:
                check_group_size(width, group_size)
            except ValueError as error:
                raise ValueError(f"layer {name}: {error}") from None
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        new = QuantizedLinear.replacing(getattr(parent, child), mode, group_size, empty)
        setattr(parent, child, new)
    return model


def linear_layers(model: nn.Module, skip: Iterable[str] = ()) -> List[str]:
    """Names of the Column/RowParallelLinear layers of `model` that `quantize` replaces
    (all but `skip`); ValueError if `skip` names a module the model lacks."""
    skip = set(skip)
    modules = dict(model.named_modules())
    missing = skip - set(modules)
    if missing:
        raise ValueError(f"skip names no module of the model: {sorted(missing)}")
    linear_types = (fairscale.ColumnParallelLinear, fairscale.RowParallelLinear)
    return [name for name, module in modules.items()
            if isinstance(module, linear_types) and name not in skip]


def int4_misfit(model: nn.Module, group_size: int,
                skip: Iterable[str] = ()) -> Optional[Tuple[str, int]]:
    """(name, input width) of the first layer `quantize` would replace whose input width
    (this rank's) int4 groups of `group_size` do not tile; None if they all fit."""
    for name in linear_layers(model, skip):
        width = model.get_submodule(name).weight.shape[1]
        if group_size < 2 or group_size % 2 or width % group_size:
            return name, width
    return None


def quantized_entries(model: nn.Module, key: str,
                      tensor: torch.Tensor) -> Dict[str, torch.Tensor]:
    """State-dict entries for one checkpoint tensor of a model that `quantize` changed:
    the weight of a QuantizedLinear ("<layer>.weight", full precision) becomes its
    quantized pieces ("<layer>.weight", "<layer>.scales"[, "<layer>.zeros"]), computed
    on the tensor's device; any other tensor is returned as it is. For loading tensor by
    tensor: only one full-precision matrix exists at a time."""
    prefix, _, leaf = key.rpartition(".")
    layer = _submodule_or_none(model, prefix) if leaf == "weight" else None
    if not isinstance(layer, QuantizedLinear) or not tensor.is_floating_point():
        return {key: tensor}  # not a quantized layer's, or already quantized
    expected = (layer.out_features, layer.in_features)
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{key}: expected a full-precision {expected} weight to quantize, "
                         f"got {tuple(tensor.shape)} {tensor.dtype}")
    return {f"{prefix}.{name}": piece for name, piece in layer.quantized(tensor).items()}


def _submodule_or_none(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def quantized_layers(model: nn.Module) -> Dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
