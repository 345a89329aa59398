"""Quantized weights (llama/quantize.py) and their matrix-product kernels
(llama/quant_kernels.py): round-trip error bounds, the packed layout, every CPU kernel
against dequantize-then-multiply, the module swap on a tree of model-parallel layers,
loading tensor by tensor, bad input. The Triton kernel runs in Triton's interpreter
(tests/quant_kernels_worker.py); the GPU kernels in benchmarks/quant_gpu.py."""

import json
import os
import subprocess
import sys
import time
import weakref
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

from llama import distributed, int4_mma
from llama import quant_kernels as qk
from llama import quantize as q
from llama.model import ColumnParallelLinear, RowParallelLinear

ROOT = Path(__file__).resolve().parent.parent


def weights(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k ** 0.5


def relative_error(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def test_int8_round_trip_within_half_a_step():
    w = weights(300, 96)
    w[7] = 0  # an all-zero row must not divide by zero
    codes, scales = q.quantize_int8(w)
    assert codes.dtype == torch.int8 and scales.dtype == torch.bfloat16
    assert codes.abs().max() <= 127
    step = scales.float()[:, None]
    assert ((q.dequantize_int8(codes, scales) - w).abs() <= step / 2 + 1e-7).all()
    # The scale is the row's largest magnitude over 127 (to bfloat16's precision).
    want = w.abs().amax(1) / 127
    assert torch.allclose(scales.float()[want > 0], want[want > 0], rtol=2 ** -8)
    assert (q.dequantize_int8(codes, scales)[7] == 0).all()


def test_int4_round_trip_within_half_a_step():
    w = weights(64, 512) + 0.05  # groups that are not centred on zero
    packed, scales, zeros = q.quantize_int4(w, 128)
    assert packed.shape == (64, 256) and packed.dtype == torch.uint8
    assert scales.shape == zeros.shape == (64, 4)
    back = q.dequantize_int4(packed, scales, zeros)
    step = scales.float().repeat_interleave(128, dim=1)
    # Half a step, plus what bfloat16 zeros may shift the grid by.
    slack = 2 ** -8 * zeros.float().abs().repeat_interleave(128, dim=1)
    assert ((back - w).abs() <= step / 2 + slack + 1e-7).all()
    # Each group's grid spans its own range: the step is (max - min) / 15.
    groups = w.unflatten(1, (4, 128))
    want = (groups.amax(2) - groups.amin(2)) / 15
    assert torch.allclose(scales.float(), want, rtol=2 ** -8)


def test_int4_packs_two_codes_per_byte_even_input_high():
    codes = torch.tensor([[1, 2, 15, 0], [7, 8, 9, 10]], dtype=torch.uint8)
    packed = q.pack_int4(codes)
    assert packed.tolist() == [[0x12, 0xF0], [0x78, 0x9A]]
    assert torch.equal(q.unpack_int4(packed), codes)
    # The dequantized value of code c is (c - 8) * scale + zero.
    scales = torch.tensor([[0.5], [2.0]], dtype=torch.bfloat16)
    zeros = torch.tensor([[1.0], [-1.0]], dtype=torch.bfloat16)
    want = (codes.float() - 8) * scales.float() + zeros.float()
    assert torch.equal(q.dequantize_int4(packed, scales, zeros), want)


@pytest.mark.parametrize("mode", q.MODES)
def test_rows_and_rank_slices_quantize_independently(mode, monkeypatch):
    """What loading relies on: wq/wk/wv quantized apart concatenate to the fused wqkv's
    pieces, a rank's column slice of a row-parallel weight gives that slice's pieces, and
    the chunking over rows changes nothing."""
    a, b = weights(40, 256, 1), weights(24, 256, 2)
    whole = q.quantize_weight(torch.cat([a, b]), mode)
    parts = [q.quantize_weight(t, mode) for t in (a, b)]
    for name in whole:
        assert torch.equal(whole[name], torch.cat([p[name] for p in parts]))
    monkeypatch.setattr(q, "ROWS_PER_CHUNK", 7)
    chunked = q.quantize_weight(torch.cat([a, b]), mode)
    assert all(torch.equal(whole[name], chunked[name]) for name in whole)
    # Rank 1 of MP=2 of a row-parallel layer: columns 128..255. int4 groups lie within
    # them; int8 takes the whole rows' largest magnitudes.
    whole_a = q.quantize_weight(a, mode)
    if mode == "int4":
        rank = q.quantize_weight(a[:, 128:], mode)
        assert torch.equal(rank["weight"], whole_a["weight"][:, 64:])
        assert torch.equal(rank["scales"], whole_a["scales"][:, 1:])
    else:
        rank = q.quantize_weight(a[:, 128:], mode, absmax=q.row_absmax(a))
        assert torch.equal(rank["weight"], whole_a["weight"][:, 128:])
        assert torch.equal(rank["scales"], whole_a["scales"])
        assert not torch.equal(q.quantize_weight(a[:, 128:], mode)["scales"], rank["scales"])


def test_int4_width_not_a_multiple_of_the_group_size():
    with pytest.raises(ValueError, match=r"192 is not a multiple of 128.*use group_size=64"):
        q.quantize_int4(weights(8, 192), 128)
    with pytest.raises(ValueError, match="quantize this layer as int8 or leave it"):
        q.quantize_weight(weights(8, 90), "int4", 128)
    with pytest.raises(ValueError, match="even"):
        q.quantize_int4(weights(8, 96), 3)


def test_unknown_mode_names_the_choices():
    for call in (lambda: q.quantize_weight(weights(4, 32), "int3"),
                 lambda: q.quantize(nn.Sequential(), "fp8"),
                 lambda: qk.select_kernel("cpu", "int2", torch.float32)):
        with pytest.raises(ValueError, match=r"unknown quantization .*'int8', 'int4'"):
            call()
    with pytest.raises(ValueError, match=r"unknown kernel 'tinygemm' for int8; choose one of"):
        qk.select_kernel("cuda", "int8", torch.bfloat16, "tinygemm")


def layer_with(mode, n, k, group_size=64, seed=0):
    layer = q.QuantizedLinear(k, n, mode, group_size)
    layer.load_pieces(q.quantize_weight(weights(n, k, seed), mode, group_size))
    return layer


@pytest.mark.parametrize("kernel", ["plain", "cpu"])  # the Triton kernel: in the interpreter
@pytest.mark.parametrize("mode", q.MODES)
@pytest.mark.parametrize("dtype, limit", [(torch.float32, 1e-3),
                                          # weights and output rounded to bfloat16
                                          (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("rows", [1, 5])
def test_cpu_kernels_equal_dequantize_then_multiply(kernel, mode, dtype, limit, rows):
    layer = layer_with(mode, 96, 256)
    want_weight = q.dequantize_weight(dict(layer.named_buffers()), mode)
    assert qk.use_kernel(layer, qk.select_kernel("cpu", mode, dtype, kernel), dtype) == {}
    assert layer.kernel == kernel
    x = torch.randn(2, rows, 256, generator=torch.Generator().manual_seed(3)).to(dtype)
    got = layer(x)
    assert got.shape == (2, rows, 96) and got.dtype == dtype
    assert relative_error(got, x.float() @ want_weight.t()) < limit


@pytest.mark.parametrize("mode", q.MODES)
@pytest.mark.parametrize("dtype, limit", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_native_cpu_kernels(mode, dtype, limit):
    # 192 inputs: int8 rows of 12 blocks of 16 and int4 groups of 64 inputs (32 bytes,
    # two blocks); 200 for int8 leaves a remainder. Up to 4 rows natively, then others'.
    k = 200 if mode == "int8" else 192
    layer = layer_with(mode, 96, k)
    want_weight = q.dequantize_weight(dict(layer.named_buffers()), mode)
    assert qk.use_kernel(layer, qk.KERNELS["cpu_native"], dtype) == {}
    spy = mock.Mock(wraps=qk.native_kernels()[0])
    with mock.patch.object(qk, "native_kernels", lambda: (spy, None)):
        for rows in (1, 3, 4, 5):
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype)
            got = layer(x)
            assert got.dtype == dtype and got.shape == (rows, 96)
            assert relative_error(got, x.float() @ want_weight.t()) < limit
    assert getattr(spy, f"{mode}_matvec").call_count == 3  # rows 1, 3 and 4


def test_native_cpu_kernels_unavailable_fall_back(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("no C++ compiler")
    qk.native_kernels.cache_clear()
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    try:
        assert qk.native_kernels()[0] is None and "no C++ compiler" in qk.native_kernels()[1]
        assert qk.select_kernel("cpu", "int8", torch.float32).name == "cpu"
        layer = layer_with("int8", 16, 64)
        assert "did not build" in qk.KERNELS["cpu_native"].refuses(layer, torch.float32)
    finally:
        qk.native_kernels.cache_clear()


def test_native_cpu_kernels_say_when_they_compile(monkeypatch, capsys):
    from torch.utils import cpp_extension

    module = object()
    for seconds, says in ((0.0, False), (2.5, True)):  # loading a build, making one
        monkeypatch.setattr(cpp_extension, "load",
                            lambda seconds=seconds, **kwargs: time.sleep(seconds) or module)
        qk.native_kernels.cache_clear()
        try:
            assert qk.native_kernels() == (module, None)
        finally:
            qk.native_kernels.cache_clear()
        assert ("compiling the CPU kernels" in capsys.readouterr().err) == says


def test_tinygemm_refuses_rocm_layouts(monkeypatch):
    layer = layer_with("int4", 48, 128)
    assert "runs on CUDA GPUs, not cpu" in qk.KERNELS["tinygemm"].refuses(layer, torch.bfloat16)
    # ROCm's _weight_int4pack_mm packs another layout than the one tinygemm_dequantize reads.
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert "CUDA build's layout" in qk.KERNELS["tinygemm"].refuses(layer, torch.bfloat16)


@pytest.mark.skipif(qk.triton is None, reason="Triton is not installed")
def test_launch_settings():
    wqkv = q.QuantizedLinear(4096, 12288, "int8", 128, device="meta")
    wo = q.QuantizedLinear(4096, 4096, "int8", 128, device="meta")
    # One row: inputs split until 16 programs per SM (132 SMs: 384 tiles x 8).
    assert qk.launch_config(1, wqkv, 132) == qk.LaunchConfig(1, 32, 128, 8)
    # Batches: 128-input steps, split only while the tiles give fewer than one per SM;
    # float32 activations keep 64-input steps (shared memory of smaller GPUs).
    assert qk.launch_config(32, wqkv, 132) == qk.LaunchConfig(32, 64, 128, 1)
    assert qk.launch_config(32, wo, 132) == qk.LaunchConfig(32, 64, 128, 4)
    assert qk.launch_config(32, wo, 132, element_size=4).block_k == 64


def test_cpu_default_kernels_and_fallbacks():
    assert qk.select_kernel("cpu", "int8", torch.float32).name == "cpu_native"
    assert qk.select_kernel("cpu", "int4", torch.float32).name == "cpu_native"
    # The int4 tensor-core kernel where NVRTC compiles it (CUDA builds), else tinygemm.
    assert qk.select_kernel("cuda", "int4", torch.bfloat16).name == (
        "tinygemm" if int4_mma.unavailable() else "cuda_int4")
    assert qk.select_kernel("cuda", "int4", torch.float16).name == "plain"
    assert qk.select_kernel("cuda", "int8", torch.bfloat16).name == (
        "plain" if qk.triton is None else "cuda_int8")
    assert qk.select_kernel("mps", "int4", torch.float16).name == "plain"
    # The CPU int4 kernel needs out_features % 16 == 0: that layer takes the plain path.
    tree = nn.ModuleDict({"odd": layer_with("int4", 40, 128), "even": layer_with("int4", 48, 128)})
    want = {name: q.dequantize_weight(dict(layer.named_buffers()), "int4")
            for name, layer in tree.items()}
    fallbacks = qk.use_kernel(tree, qk.select_kernel("cpu", "int4", torch.float32, "cpu"),
                              torch.float32)
    assert list(fallbacks) == ["odd"] and "% 16" in fallbacks["odd"]
    assert (tree["odd"].kernel, tree["even"].kernel) == ("plain", "cpu")
    x = torch.randn(3, 128)
    for name, layer in tree.items():
        assert relative_error(layer(x), x @ want[name].t()) < 1e-3


def test_refused_layers_go_down_the_fallback_chain(monkeypatch):
    """A kernel's refused layers take its fallback kernel, and that one's refused ones
    the next, down to the plain path."""
    def refusing(limit):
        return lambda layer, dtype: (f"needs out_features <= {limit}"
                                     if layer.out_features > limit else None)
    kernels = dict(qk.KERNELS)
    kernels["first"] = replace(qk.KERNELS["plain"], name="first", refuses=refusing(32),
                               fallback="second")
    kernels["second"] = replace(qk.KERNELS["plain"], name="second", refuses=refusing(48))
    monkeypatch.setattr(qk, "KERNELS", kernels)
    tree = nn.ModuleDict({str(n): layer_with("int4", n, 128) for n in (32, 48, 64)})
    fallbacks = qk.use_kernel(tree, kernels["first"], torch.float32)
    assert [tree[n].kernel for n in ("32", "48", "64")] == ["first", "second", "plain"]
    assert fallbacks == {"48": "needs out_features <= 32; second instead",
                         "64": "needs out_features <= 32; second instead; then "
                               "needs out_features <= 48; plain instead"}


@pytest.fixture(scope="module")
def one_process_group():
    distributed.initialize(1, torch.device("cpu"))


class Block(nn.Module):
    """Parallel layers as the model builds them: a column-parallel projection into a
    wider layer, a row-parallel one back, and a gathered output head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        init = nn.init.normal_
        self.up = ColumnParallelLinear(64, 192, bias=False, gather_output=False, init_method=init)
        self.down = RowParallelLinear(192, 64, bias=False, input_is_parallel=True,
                                      init_method=init)
        self.output = ColumnParallelLinear(64, 80, bias=False, init_method=init)
        with torch.no_grad():
            for layer in (self.up, self.down, self.output):
                layer.weight /= layer.weight.shape[1] ** 0.5

    def forward(self, x):
        return self.output(x + self.down(torch.nn.functional.silu(self.up(x))))


@pytest.mark.parametrize("mode, limit", [("int8", 0.02), ("int4", 0.2)])
def test_transform_swaps_parallel_layers(one_process_group, mode, limit):
    model = Block()
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
        pieces = {name: q.quantize_weight(getattr(model, name).weight, mode, 64)
                  for name in ("up", "down")}
    q.quantize(model, mode, group_size=64, skip=["output"])
    assert type(model.output) is ColumnParallelLinear  # skipped
    assert isinstance(model.up, q.QuantizedLinear) and isinstance(model.down, q.QuantizedLinear)
    assert (model.up.gather_output, model.up.reduce_output) == (False, False)
    assert (model.down.gather_output, model.down.reduce_output) == (False, True)
    # Only the skipped layer keeps a full-precision weight.
    assert [name for name, _ in model.named_parameters()] == ["output.weight"]
    for name, layer_pieces in pieces.items():
        for piece, value in layer_pieces.items():
            assert torch.equal(getattr(getattr(model, name), piece), value)
    with torch.no_grad():
        got = model(x)
    assert relative_error(got, want) < limit
    q.quantize(model, mode, group_size=64)  # now the gathered head too
    assert model.output.gather_output and not model.output.reduce_output
    assert model.output(x).shape == (2, 3, 80)


def test_transform_releases_each_weight_as_it_goes(one_process_group, monkeypatch):
    """Quantizing in place must never hold two full-precision weights it has replaced:
    each is freed when its layer is swapped, so peak memory grows by one layer."""
    model = Block()
    replaced, alive_at_each_swap = [], []
    replacing = q.QuantizedLinear.replacing

    def spy(layer, *args):
        alive_at_each_swap.append(sum(ref() is not None for ref in replaced))
        replaced.append(weakref.ref(layer.weight))
        return replacing(layer, *args)

    monkeypatch.setattr(q.QuantizedLinear, "replacing", spy)
    q.quantize(model, "int8")
    assert alive_at_each_swap == [0, 0, 0]
    assert all(ref() is None for ref in replaced)


def test_transform_refuses_before_touching_any_layer(one_process_group):
    model = Block()
    with pytest.raises(ValueError, match=r"layer up: .*64 is not a multiple of 128"):
        q.quantize(model, "int4", group_size=128)
    assert type(model.up) is ColumnParallelLinear
    with pytest.raises(ValueError, match=r"skip names no module.*'outptu'"):
        q.quantize(model, "int8", skip=["outptu"])


@pytest.mark.parametrize("mode", q.MODES)
def test_loading_tensor_by_tensor_into_an_empty_skeleton(one_process_group, mode):
    full = Block()
    state = full.state_dict()
    want = q.quantize(Block(), mode, group_size=64)
    skeleton = Block()
    q.quantize(skeleton, mode, group_size=64, empty=True)
    for key, tensor in state.items():
        entries = q.quantized_entries(skeleton, key, tensor)
        assert len(entries) == (3 if mode == "int4" else 2)  # every layer is quantized
        skeleton.load_state_dict(entries, strict=False)
    assert skeleton.state_dict().keys() == want.state_dict().keys()
    for key, value in want.state_dict().items():
        assert torch.equal(skeleton.state_dict()[key], value), key
    # A quantized (integer) piece passes through; a wrongly shaped weight is refused.
    piece = want.up.weight
    assert q.quantized_entries(skeleton, "up.weight", piece) == {"up.weight": piece}
    with pytest.raises(ValueError, match=r"up.weight: expected a full-precision \(192, 64\)"):
        q.quantized_entries(skeleton, "up.weight", torch.zeros(64, 192))
    other = q.quantized_entries(skeleton, "norm.weight", state["up.weight"])
    assert other.keys() == {"norm.weight"}


def test_skeleton_on_the_meta_device_takes_no_memory(one_process_group):
    layer = q.QuantizedLinear.replacing(
        nn.Linear(256, 64, bias=False, device="meta"), "int4", 128, empty=True)
    assert all(b.device.type == "meta" for b in layer.buffers())
    pieces = q.quantize_weight(weights(64, 256), "int4", 128)
    layer.load_pieces(pieces)
    assert layer.weight is pieces["weight"]
    with pytest.raises(ValueError, match=r"weight: expected \(64, 128\) torch.uint8"):
        layer.load_pieces({**pieces, "weight": pieces["weight"][:, :64]})


def test_cuda_int8_runs_the_triton_kernels_for_every_step(monkeypatch):
    layer = layer_with("int8", 48, 128)
    calls = []

    def triton_matmul(x, layer):
        calls.append(x.shape[0])
        return qk.plain_matmul(x, layer)
    monkeypatch.setattr(qk, "triton_matmul", triton_matmul)
    one, two = torch.randn(1, 128), torch.randn(2, 128)
    matmul = qk.KERNELS["cuda_int8"].matmul
    for compiling in (False, True):  # eager and CUDA graphs, then under torch.compile
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        for x in (one, two):
            assert torch.equal(matmul(x, layer), qk.plain_matmul(x, layer))
    assert calls == [1, 2, 1, 2]


@pytest.mark.skipif(qk.triton is None, reason="Triton is not installed")
def test_triton_kernel_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "quant_kernels_worker.py")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    cases = json.loads(done.stdout.splitlines()[-1])
    # tinygemm's packed layout (built here as PyTorch's CUDA op builds it) turned back into
    # the dequantized matrix: the stored layout's up to float32 rounding (a misplaced code
    # is off by a scale step), for 2, 4 and 8 inner tiles.
    unpacked = cases.pop("tinygemm_dequantize")
    assert len(unpacked) == 3
    for case, result in unpacked.items():
        assert result["shape_ok"] and result["difference"] < 1e-5, (case, result)
    assert len(cases) == 20
    for case, result in cases.items():
        assert result["shape_ok"], case
        assert result["error"] < result["limit"], (case, result)


def test_a_quantized_model_is_not_quantized_again():
    from llama import Llama
    model = Llama.from_preset("tiny", 16, 1, device="cpu").model
    q.quantize(model, "int4", 64, skip=["output"])
    with pytest.raises(ValueError, match="quantized already .*holds int4, groups of 64"):
        q.quantize(model, "int8")
    assert not isinstance(model.output, q.QuantizedLinear)  # nothing was touched
