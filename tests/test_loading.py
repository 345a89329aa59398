"""Loading: strict checks with clear errors, resharding on load, plain-python builds."""

import argparse
import collections
import hashlib
import json
import math
import os
import re
import shutil

import pytest
import torch

from conftest import build


def test_builds_without_torchrun_and_twice_in_one_process(make_model):
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ
    folder, _, _ = make_model()
    first, second = build(folder), build(folder)
    tokens = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(first.model.forward(tokens, 0), second.model.forward(tokens, 0))
    assert first.model.output.weight.dtype == torch.float32  # CPU default: float32


def test_dtype_argument(make_model):
    folder, _, _ = make_model()
    gen = build(folder, dtype=torch.bfloat16)
    assert gen.model.output.weight.dtype == torch.bfloat16
    assert gen.model.layers[0].attention.cache.k.dtype == torch.bfloat16
    assert gen.model.forward(torch.tensor([[1, 2]]), 0).dtype == torch.float32


def test_two_shards_load_on_one_process(make_model):
    one, _, _ = make_model(shards=1)
    two, _, _ = make_model(shards=2)
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(5))
    assert torch.equal(build(one).model.forward(tokens, 0), build(two).model.forward(tokens, 0))


def copy_of(folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def edit_shard(folder, fn):
    path = folder / "consolidated.00.pth"
    state = torch.load(path)
    fn(state)
    torch.save(state, path)


def test_missing_tensor_is_named(make_model, tmp_path):
    folder = copy_of(make_model()[0], tmp_path)
    edit_shard(folder, lambda s: s.pop("layers.1.feed_forward.w3.weight"))
    with pytest.raises(ValueError, match=r"missing keys \['layers.1.feed_forward.w3.weight'\]"):
        build(folder)


def test_unexpected_tensor_is_named_but_rope_freqs_is_fine(make_model, tmp_path):
    folder = copy_of(make_model()[0], tmp_path)
    assert "rope.freqs" in torch.load(folder / "consolidated.00.pth")
    edit_shard(folder, lambda s: s.update({"layers.0.attention.bias": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected keys \['layers.0.attention.bias'\]"):
        build(folder)


def test_wrong_shape_is_named(make_model, tmp_path):
    folder = copy_of(make_model()[0], tmp_path)
    edit_shard(folder, lambda s: s.update({"norm.weight": torch.ones(65)}))
    with pytest.raises(ValueError, match=r"norm.weight has shape \(65,\)"):
        build(folder)


def test_params_and_tokenizer_mismatch(make_model, tmp_path, plain_tokenizer_path):
    folder = copy_of(make_model()[0], tmp_path)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "n_layers": 3}))
    with pytest.raises(ValueError, match=r"missing keys \['layers.2"):
        build(folder)
    (folder / "params.json").write_text(json.dumps({**params, "max_tokens": 3}))
    with pytest.raises(ValueError, match="unknown key.*max_tokens"):
        build(folder)
    (folder / "params.json").write_text(json.dumps({**params, "vocab_size": 1000}))
    with pytest.raises(ValueError, match="vocab_size 1000 but the tokenizer has 512"):
        build(folder)


def test_tokenizer_vocab_must_match_embedding(make_model, tmp_path):
    folder = copy_of(make_model()[0], tmp_path)
    edit_shard(folder, lambda s: s.update(
        {"tok_embeddings.weight": s["tok_embeddings.weight"][:256]}))
    with pytest.raises(ValueError, match="embeds 256 tokens but the tokenizer has 512"):
        build(folder)


def test_missing_files(tmp_path, make_model):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="params.json"):
        build(tmp_path)
    folder = copy_of(make_model()[0], tmp_path)
    (folder / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint files \(consolidated.NN.pth\)"):
        build(folder)
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        build(make_model()[0], tokenizer_path=str(tmp_path / "missing.model"))


def test_shards_of_different_models(make_model, tmp_path):
    folder = copy_of(make_model(shards=2)[0], tmp_path)
    other = make_model(shards=2, n_kv_heads=4)[0]
    shutil.copy(other / "consolidated.01.pth", folder / "consolidated.01.pth")
    with pytest.raises(ValueError, match="shards disagree on the shape"):
        build(folder)


def test_damaged_files_are_named(make_model, tmp_path):
    folder = copy_of(make_model()[0], tmp_path)
    params = (folder / "params.json").read_text()
    (folder / "params.json").write_text(params[:-5])
    with pytest.raises(ValueError, match=r"params.json is not valid JSON.*download"):
        build(folder)
    (folder / "params.json").write_text("null")
    with pytest.raises(ValueError, match=r"params.json holds a NoneType, not a JSON object"):
        build(folder)
    (folder / "params.json").write_text(params)
    shard = folder / "consolidated.00.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a cut-off download
    with pytest.raises(ValueError, match=r"consolidated.00.pth cannot be read.*incomplete"):
        build(folder)
    torch.save({"x": torch.zeros(2)}, shard, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"consolidated.00.pth cannot be read.*zip format"):
        build(folder)


def test_missing_shard_is_suggested(make_model, tmp_path):
    folder = copy_of(make_model(shards=2)[0], tmp_path)
    (folder / "consolidated.01.pth").unlink()
    with pytest.raises(ValueError, match=r"or the folder lacks shards \(it holds 1/2 of"):
        build(folder)


def test_cache_sizes_in_params_json_are_ignored_with_a_warning(make_model, tmp_path):
    folder = copy_of(make_model()[0], tmp_path)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "max_seq_len": 4096,
                                                    "max_batch_size": 32}))
    with pytest.warns(UserWarning, match="max_seq_len=4096, which is ignored: cache sizes"):
        gen = build(folder, max_seq_len=48, max_batch_size=2)
    assert (gen.model.params.max_seq_len, gen.model.params.max_batch_size) == (48, 2)


@pytest.mark.parametrize("changes, message", [
    (dict(norm_eps=0), "norm_eps must be a finite number above 0, got 0"),
    (dict(norm_eps=-1e-5), "norm_eps must be a finite number above 0"),
    (dict(norm_eps=float("nan")), "norm_eps must be a finite number above 0, got nan"),
    (dict(rope_theta=0), "rope_theta must be a finite number above 0"),
    (dict(rope_theta=float("inf")), "rope_theta must be a finite number above 0"),
    (dict(ffn_dim_multiplier=0), "ffn_dim_multiplier must be a finite number above 0"),
    (dict(n_heads=0), "n_heads must be a whole number of at least 1, got 0"),
    (dict(multiple_of=0), "multiple_of must be a whole number of at least 1"),
    (dict(n_layers=-1), "n_layers must be a whole number of at least 1"),
    (dict(n_layers=True), "n_layers must be a whole number of at least 1, got True"),
    (dict(dim="64"), "dim must be a whole number of at least 1, got '64'"),
    (dict(dim=64.0), "dim must be a whole number of at least 1, got 64.0"),
    (dict(n_kv_heads=0), "n_kv_heads must be a whole number of at least 1"),
    (dict(vocab_size=0), "vocab_size must be a whole number of at least 1"),
    (dict(norm_eps="1e-5"), "norm_eps must be a finite number above 0, got '1e-5'"),
    (dict(n_heads=3, n_kv_heads=None), "dim=64 does not split into n_heads=3 heads"),
    (dict(n_heads=64, n_kv_heads=None), "dim=64 does not split into n_heads=64 heads of one "
                                        "even width"),
    (dict(n_kv_heads=3), "n_heads=4 is not a multiple of n_kv_heads=3"),
])
def test_params_that_load_but_cannot_work(make_model, tmp_path, changes, message):
    folder = copy_of(make_model()[0], tmp_path)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, **changes}))
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'params.json'}: {message}")):
        build(folder)


def test_non_finite_weights_are_named(make_model, tmp_path):
    folder = copy_of(make_model()[0], tmp_path)
    edit_shard(folder, lambda s: s["layers.1.attention.wv.weight"].__setitem__((3, 5), math.nan))
    with pytest.raises(ValueError, match="layers.1.attention.wv.weight holds NaN or infinite"):
        build(folder)
    edit_shard(folder, lambda s: s["layers.1.attention.wv.weight"].__setitem__((3, 5), 1e6))
    with pytest.raises(ValueError, match="layers.1.attention.wv.weight exceeds the range of "
                                         "torch.float16"):
        build(folder, dtype=torch.float16)
    build(folder, dtype=torch.bfloat16)  # 1e6 is a bfloat16 number


def write_checklist(folder):
    names = sorted(p.name for p in folder.iterdir())
    lines = [f"{hashlib.md5((folder / n).read_bytes()).hexdigest()}  {n}" for n in names]
    (folder / "checklist.chk").write_text("\n".join(lines) + "\n")


def test_checklist_catches_an_edited_or_stale_small_file(make_model, tmp_path,
                                                         plain_tokenizer_path):
    folder = copy_of(make_model()[0], tmp_path)
    write_checklist(folder)
    build(folder)
    params = (folder / "params.json").read_text()
    (folder / "params.json").write_text(params.replace("1000000.0", "500000.0"))
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'params.json'} differs from the "
                                                   f"file checklist.chk lists")):
        build(folder)
    (folder / "params.json").write_text(params)
    shutil.copy(plain_tokenizer_path, folder / "tokenizer.model")  # another model's
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'tokenizer.model'} differs")):
        build(folder)


def test_empty_or_damaged_tokenizer_is_named(make_model, tmp_path):
    folder = copy_of(make_model()[0], tmp_path)
    path = folder / "tokenizer.model"
    for content in (b"", b"not a sentencepiece model"):
        path.write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(f"{path} cannot be read as a "
                                                       f"SentencePiece model")):
            build(folder)


def test_unsafe_pickle_is_refused_without_torch_advice(make_model, tmp_path):
    folder = copy_of(make_model()[0], tmp_path)
    edit_shard(folder, lambda s: s.update({"args": argparse.Namespace(lr=1.0)}))
    with pytest.raises(ValueError, match="holds Python objects besides tensors") as error:
        build(folder)
    assert "weights_only" not in str(error.value)
    assert error.value.__suppress_context__  # torch's advice is not shown beneath either


def test_entry_that_is_not_a_tensor_is_named(make_model, tmp_path):
    folder = copy_of(make_model()[0], tmp_path)
    edit_shard(folder, lambda s: s.update({"counts": collections.Counter("ab")}))
    with pytest.raises(ValueError, match="consolidated.00.pth holds counts, a Counter, "
                                         "where a tensor belongs"):
        build(folder)


def test_shard_that_is_not_a_state_dict_is_named(make_model, tmp_path):
    folder = copy_of(make_model()[0], tmp_path)
    torch.save([torch.zeros(2)], folder / "consolidated.00.pth")
    with pytest.raises(ValueError, match="consolidated.00.pth holds a list, not a state dict"):
        build(folder)
