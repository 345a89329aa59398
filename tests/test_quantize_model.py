"""Quantized models through Llama.build (CPU, float32): the logits of a model holding the
dequantized weights, generation, bad requests, and MP=2 equal to MP=1 (gloo)."""

from pathlib import Path

import pytest
import torch

import conftest
from conftest import TINY, build, write_checkpoint
from llama import quantize as q

# Every input width a multiple of the 128-wide int4 groups, whole or split over 2 ranks:
# dim 256 (wo: 128 per rank), feed-forward 768 (384 per rank).
SHAPE = dict(dim=256, n_heads=4, n_kv_heads=2, multiple_of=256)
PROMPTS = ["def fib(n):", "import re\n"]
WORKER = Path(__file__).with_name("mp_worker.py")


def relative_error(got, want):
    return ((got - want).norm() / want.norm()).item()


def dequantized_state(state: dict, n_layers: int, mode: str) -> dict:
    """`state` with every weight that Llama.build quantizes replaced by what its pieces
    stand for: quantized as the model holds it (wq|wk|wv and w1|w3 stacked), dequantized,
    split back into Meta's weights. The output projection stays (quantize.KEPT)."""
    out = dict(state)
    for i in range(n_layers):
        p = f"layers.{i}."
        for names in (["attention.wq", "attention.wk", "attention.wv"], ["attention.wo"],
                      ["feed_forward.w1", "feed_forward.w3"], ["feed_forward.w2"]):
            keys = [f"{p}{name}.weight" for name in names]
            whole = torch.cat([state[k] for k in keys])
            back = q.dequantize_weight(q.quantize_weight(whole, mode), mode)
            out.update(zip(keys, back.split([state[k].shape[0] for k in keys])))
    return out


def tokens():
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("mode", q.MODES)
def test_quantized_model_equals_the_dequantized_weights(make_model, tokenizer_path, tmp_path,
                                                        mode):
    folder, args, state = make_model(**SHAPE)
    gen = build(folder, quantize=mode)
    layers = q.quantized_layers(gen.model)
    assert len(layers) == 4 * args.n_layers and "output" not in layers
    # On the CPU: the native kernels (for decoding's few rows; these 48 take others).
    assert {layer.kernel for layer in layers.values()} == {"cpu_native"}
    ref_folder = write_checkpoint(tmp_path / "dequantized", {**TINY, **SHAPE},
                                  dequantized_state(state, args.n_layers, mode), 1,
                                  tokenizer_path)
    ref = build(ref_folder)
    got, want = gen.model.forward(tokens(), 0), ref.model.forward(tokens(), 0)
    assert relative_error(got, want) < 1e-3
    # The check can tell: the unquantized model is much further away.
    unquantized = build(folder).model.forward(tokens(), 0)
    assert relative_error(unquantized, want) > 3e-3
    greedy = gen.text_completion(PROMPTS, temperature=0, max_gen_len=16)
    assert greedy == ref.text_completion(PROMPTS, temperature=0, max_gen_len=16)
    assert all(g["generation"] for g in greedy)


def test_sampling_with_quantized_weights(make_model):
    folder, _, _ = make_model(**SHAPE)
    gen = build(folder, quantize="int4")
    for out in gen.text_completion(PROMPTS, temperature=0.8, max_gen_len=8, logprobs=True):
        assert out["generation"] and len(out["tokens"]) == len(out["logprobs"]) == 8


def test_unknown_quantization_names_the_choices(make_model):
    folder, _, _ = make_model(**SHAPE)
    with pytest.raises(ValueError, match=r"unknown quantization 'int3'; choose one of "
                                         r"\('int8', 'int4'\)"):
        build(folder, quantize="int3")


def test_int4_on_widths_the_groups_do_not_tile(make_model):
    folder, _, _ = make_model()  # dim 64
    with pytest.raises(ValueError, match=r"int4 quantizes groups of 128 inputs, but layer "
                                         r"layers.0.attention.wqkv takes 64 inputs.*use "
                                         r"quantize='int8'.*--bits 4 --group_size 64 --mp 1"):
        build(folder, quantize="int4")
    build(folder, quantize="int8")  # per-row scales fit any width


def test_model_parallel_quantized_equals_one_process(make_model, tmp_path):
    """Each rank quantizes its own slice (int4 groups of wo and w2 stop at the split):
    two processes compute what one does."""
    folder, _, _ = make_model(**SHAPE)
    conftest.run_torchrun(WORKER, 2, folder, tmp_path / "out.pt", "quantize")
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    for mode in q.MODES:
        gen = build(folder, quantize=mode)
        want = gen.model.forward(tokens(), 0)
        assert relative_error(got[mode]["logits"], want) < 1e-5, mode
        assert got[mode]["greedy"] == gen.text_completion(PROMPTS, temperature=0,
                                                          max_gen_len=16)
