"""The public names and signatures of Meta's reference, where code written for it looks
for them, and how `Llama.configure` treats options it is not given."""

import inspect

import pytest
import numpy as np
import torch

import llama
import llama.generation
from llama import Llama

REFERENCE_CONSTANTS = {
    "B_INST": "[INST]",
    "E_INST": "[/INST]",
    "B_SYS": "<<SYS>>\n",
    "E_SYS": "\n<</SYS>>\n\n",
    "SPECIAL_TAGS": ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<step>"],
    "UNSAFE_ERROR": "Error: special tags are not allowed as part of the prompt.",
}

# Leading parameters and defaults of the reference's methods. Ours may add parameters after
# them, and defaults where the reference has none (REQUIRED).
REQUIRED = inspect.Parameter.empty
REFERENCE_SIGNATURES = {
    "build": [("ckpt_dir", REQUIRED), ("tokenizer_path", REQUIRED), ("max_seq_len", REQUIRED),
              ("max_batch_size", REQUIRED), ("model_parallel_size", None)],
    "generate": [("prompt_tokens", REQUIRED), ("max_gen_len", REQUIRED), ("temperature", 0.6),
                 ("top_p", 0.9), ("logprobs", False), ("echo", False), ("stop_token", None)],
    "text_completion": [("prompts", REQUIRED), ("temperature", 0.6), ("top_p", 0.9),
                        ("max_gen_len", None), ("logprobs", False), ("echo", False)],
    "text_infilling": [("prefixes", REQUIRED), ("suffixes", REQUIRED), ("temperature", 0.6),
                       ("top_p", 0.9), ("max_gen_len", None), ("logprobs", False),
                       ("suffix_first", False)],
    "chat_completion": [("dialogs", REQUIRED), ("temperature", 0.6), ("top_p", 0.9),
                        ("max_gen_len", None), ("logprobs", False)],
}


def test_reference_names_import_from_llama_generation():
    for name, value in REFERENCE_CONSTANTS.items():
        assert getattr(llama.generation, name) == value, name
        assert name in llama.generation.__all__, name  # so that `import *` brings it too
    for name in ("Llama", "sample_top_p", "Role", "Message", "Dialog", "CompletionPrediction",
                 "InfillingPrediction", "ChatPrediction", "dialog_prompt_tokens",
                 "infilling_prompt_tokens"):
        assert hasattr(llama.generation, name), name
    assert llama.generation.sample_top_p is llama.sample_top_p
    probs = torch.tensor([[0.1, 0.7, 0.2]])
    assert llama.generation.sample_top_p(probs, 0.5).tolist() == [[1]]  # only the top token


def test_reference_signatures():
    for method, expected in REFERENCE_SIGNATURES.items():
        params = list(inspect.signature(getattr(Llama, method)).parameters.values())
        if params[0].name == "self":
            params = params[1:]
        assert [p.name for p in params[:len(expected)]] == [name for name, _ in expected], method
        for param, (name, default) in zip(params, expected):
            if default is not REQUIRED:
                assert param.default == default, (method, name)


def test_configure_keeps_options_it_is_not_given():
    gen = Llama.from_preset("tiny", max_seq_len=32, max_batch_size=2, device="cpu",
                            dtype=torch.float32)
    engine = gen.engine
    assert gen.settings == dict(decode="eager", prefill_chunk=16384, symmetric_memory=False,
                                draft=None, draft_tokens=4)  # no CUDA graphs off CUDA
    assert engine.compiled_prefill is None
    gen.configure(decode="compiled")
    compiled, decoder = engine.compiled_prefill, engine.decoder
    assert compiled is not None
    gen.configure(prefill_chunk=np.int64(8))  # changes the chunk only; numpy ints are fine
    assert gen.prefill_chunk == 8 and gen.settings["decode"] == "compiled"
    assert type(gen.settings["prefill_chunk"]) is int
    assert engine.compiled_prefill is compiled and engine.decoder is decoder  # not rebuilt
    gen.configure(decode="eager")
    assert engine.compiled_prefill is None and gen.prefill_chunk == 8
    with pytest.warns(DeprecationWarning, match="decode="):
        gen.configure(compile=True)
    assert gen.settings["decode"] == "compiled"


@pytest.mark.parametrize("bad, match", [
    (dict(decode="graphs"), "needs a CUDA device"), (dict(decode="fast"), "one of eager"),
    (dict(prefill_chunk=2.5), "prefill_chunk"), (dict(prefill_chunk=0), "prefill_chunk"),
    (dict(symmetric_memory="yes"), "symmetric_memory")])
def test_invalid_configure_values_are_refused(bad, match):
    gen = Llama.from_preset("tiny", max_seq_len=32, max_batch_size=2, device="cpu",
                            dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        gen.configure(**bad)
    assert gen.settings == dict(decode="eager", prefill_chunk=16384, symmetric_memory=False,
                                draft=None, draft_tokens=4)
    assert gen.generate([[1, 2]], max_gen_len=2, temperature=0)[0][0]  # still works


def test_a_failed_configure_changes_nothing(monkeypatch):
    gen = Llama.from_preset("tiny", max_seq_len=32, max_batch_size=2, device="cpu",
                            dtype=torch.float32)

    def unsupported(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported here")

    monkeypatch.setattr(torch, "compile", unsupported)
    with pytest.raises(RuntimeError, match="not supported"):
        gen.configure(decode="compiled", prefill_chunk=8)
    assert gen.settings["decode"] == "eager" and gen.engine.compiled_prefill is None
    assert gen.prefill_chunk == 16384
    monkeypatch.undo()
    gen.configure(decode="compiled")  # a retry does the work instead of finding nothing to change
    assert gen.engine.compiled_prefill is not None


def test_bad_sizes_and_flat_token_lists_get_clear_errors():
    for seq_len, batch in ((16.5, 1), (16, "2"), (16, 0)):
        with pytest.raises(ValueError, match="must be a whole number of at least 1"):
            Llama.from_preset("tiny", seq_len, batch, device="cpu")
    gen = Llama.from_preset("tiny", 16, 2, device="cpu")
    with pytest.raises(ValueError, match="list of token-id lists"):
        gen.generate([1, 2, 3], max_gen_len=2)  # more ints than max_batch_size rows


def test_device_and_dtype_are_taken_by_name_or_refused_clearly():
    gen = Llama.from_preset("tiny", 16, 1, device="cpu", dtype="bfloat16")
    assert gen.model.tok_embeddings.weight.dtype == torch.bfloat16
    assert gen.model.rope.device == torch.device("cpu")
    for dtype in ("bf17", torch.int8, torch.float64):
        with pytest.raises(ValueError, match="is not supported; use one of float32, "
                                             "bfloat16, float16"):
            Llama.from_preset("tiny", 16, 1, device="cpu", dtype=dtype)
    with pytest.raises(ValueError, match="device 'tpu' is not a device; use cpu, cuda"):
        Llama.from_preset("tiny", 16, 1, device="tpu")


def test_stream_arguments_are_checked_when_called(make_model):
    from conftest import build
    gen = build(make_model()[0])
    with pytest.raises(ValueError, match="temperature"):
        gen.stream_completion("def f():", temperature="hot")
    with pytest.raises(ValueError, match="stop"):
        gen.stream_infilling("a", "b", stop=[""])
    with pytest.raises(ValueError, match="max_gen_len"):
        gen.stream_chat_completion([{"role": "user", "content": "hi"}], max_gen_len=-1)


def test_compiling_a_decode_step_is_announced(capsys):
    gen = Llama.from_preset("tiny", 32, 2, device="cpu").configure(decode="compiled")
    gen.generate([[1, 2, 3]], max_gen_len=3, temperature=0)
    assert "compiling the decode step for 1 row(s), greedy" in capsys.readouterr().err
    gen.generate([[1, 2, 3]], max_gen_len=3, temperature=0)  # compiled once: no word
    assert "compiling" not in capsys.readouterr().err


def test_stop_token_must_be_one_token_id():
    gen = Llama.from_preset("tiny", 16, 1, device="cpu")
    for bad in ("\n", [13, 2], True, 2.0):
        with pytest.raises(ValueError, match="stop_token must be one token id"):
            gen.generate([[1, 5]], max_gen_len=2, stop_token=bad)
    tokens, _ = gen.generate([[1, 5]], max_gen_len=4, temperature=0)
    stop = tokens[0][1]
    stopped, _ = gen.generate([[1, 5]], max_gen_len=4, temperature=0, stop_token=stop)
    assert stopped[0] == tokens[0][:tokens[0].index(stop)]
