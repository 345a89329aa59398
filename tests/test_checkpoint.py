"""Loading any shard count on any world size, Hugging Face folders, memory, clear errors."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, build, hf_model, run_torchrun
from llama import checkpoint
from llama.checkpoint import load_folder
from llama.hf import ffn_params
from llama.model import ModelArgs

WORKER = Path(__file__).with_name("convert_worker.py")
TOKENS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(11))


def logits(folder, **kw):
    return build(folder, **kw).model.forward(TOKENS, 0)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_every_copy_of_a_model_loads_at_mp_2(make_model, make_hf_model, tmp_path):
    """1, 2 and 4 Meta shards and a Hugging Face copy in several safetensors files, loaded
    by 2 processes, give the logits of one process (the q/k RoPE permutation is undone on
    each rank's half of the heads)."""
    folders = [make_model(shards=n)[0] for n in (1, 2, 4)]
    folders.append(make_hf_model(max_shard_size="100KB")[0])
    run_torchrun(WORKER, 2, tmp_path / "out.pt", *folders)
    got = torch.load(tmp_path / "out.pt")
    want = logits(folders[0])
    for folder in folders:
        assert rel_err(got[str(folder)], want) < 1e-5, folder
        assert torch.equal(got[str(folder)], got[str(folders[0])]), folder


def test_hf_folder_loads_like_meta(make_model, make_hf_model):
    meta, args, _ = make_model()
    hf, _, _ = make_hf_model(max_shard_size="100KB")
    assert len(list(hf.glob("*.safetensors"))) > 1
    assert torch.equal(logits(hf), logits(meta))
    params, _, tokenizer = load_folder(hf, 0, 1)
    assert tokenizer == hf / "tokenizer.model"
    assert params["rope_theta"] == 1e6 and params["n_kv_heads"] == 2
    assert ModelArgs(**params).ffn_hidden_dim == args.ffn_hidden_dim


def test_hf_folder_saved_by_transformers(make_model, tmp_path):
    """A folder written by save_pretrained (one model.safetensors, no index, no kept
    params.json): everything comes from config.json."""
    meta, args, state = make_model(rope_theta=5e5, n_kv_heads=4)  # not HF's default
    hf_model(args, state).save_pretrained(tmp_path)
    shutil.copy(meta / "tokenizer.model", tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert rel_err(logits(tmp_path), logits(meta)) < 1e-6


def test_both_formats_in_one_folder_prefers_pth(make_model, make_hf_model, tmp_path):
    folder = tmp_path / "both"
    shutil.copytree(make_model()[0], folder)
    other = make_hf_model(seed=1)[0]  # different weights
    for f in other.iterdir():
        if f.name != "tokenizer.model":
            shutil.copy(f, folder)
    assert torch.equal(logits(folder), logits(make_model()[0]))


@pytest.mark.parametrize("dim, intermediate", [
    (4096, 11008), (5120, 13824), (8192, 22016), (8192, 28672),  # 7B, 13B, 34B, 70B
    (4096, 14336), (64, 192), (64, 17), (64, 1000), (96, 255), (3, 1), (2048, 5632),
])
def test_ffn_params_reproduce_intermediate_size(dim, intermediate):
    params = ffn_params(dim, intermediate, "config.json")
    assert ModelArgs(dim=dim, **params).ffn_hidden_dim == intermediate
    if intermediate in (11008, 13824, 22016):
        assert params == {"multiple_of": 256}


def test_released_widths_with_every_integer():
    for intermediate in range(1, 600):
        params = ffn_params(200, intermediate, "config.json")
        assert ModelArgs(dim=200, **params).ffn_hidden_dim == intermediate


# ---- memory ---------------------------------------------------------------------------

def rss_file_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"RssFile:\s+(\d+)", status).group(1)) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_resharding_keeps_no_file_pages_resident(tmp_path):
    """Cutting columns out of a mapped shard reads every page of it; those pages are given
    back once copied, so the process holds only the rank's copy."""
    g = torch.Generator().manual_seed(0)
    full = torch.randn(4096, 4096, generator=g)  # 64 MiB
    for i, part in enumerate(full.chunk(2, dim=1)):
        torch.save({"tok_embeddings.weight": part.clone()}, tmp_path / f"consolidated.0{i}.pth")
    src = checkpoint.open_meta(tmp_path)
    before = rss_file_mb()
    got = src.read("tok_embeddings.weight", 0, 1)
    assert rss_file_mb() - before < 8
    assert torch.equal(got, full)
    assert torch.equal(src.read("tok_embeddings.weight", 1, 4), full[:, 1024:2048])


def mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_parameters_are_private_copies(make_model, tmp_path):
    """One shard on one process in the checkpoint's dtype, where the parameters could be
    the mapped file itself: they are copies, so rewriting the file changes nothing."""
    folder = tmp_path / "model"
    shutil.copytree(make_model()[0], folder)
    shard = folder / "consolidated.00.pth"
    gen = build(folder, dtype=torch.float32)
    before = gen.model.forward(TOKENS, 0)
    assert str(shard) not in mapped_files()
    with open(shard, "r+b") as f:  # in place: the same file, other bytes
        f.write(b"\0" * shard.stat().st_size)
    assert torch.equal(gen.model.forward(TOKENS, 0), before)


TRUNCATE = """
import os, sys, torch
from llama import Llama
gen = Llama.build(sys.argv[1], max_seq_len=16, max_batch_size=1, device="cpu",
                  dtype=torch.float32)
os.truncate(os.path.join(sys.argv[1], "consolidated.00.pth"), 0)
print(gen.model.forward(torch.tensor([[1, 2, 3]]), 0).isfinite().all().item())
"""


def test_truncating_the_checkpoint_under_a_running_model(make_model, tmp_path):
    """A mapped parameter whose file shrinks kills the process with SIGBUS when read."""
    folder = tmp_path / "model"
    shutil.copytree(make_model()[0], folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", TRUNCATE, str(folder)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.strip().endswith("True")


# ---- errors ------------------------------------------------------------------------------

def hf_copy(make_hf_model, tmp_path, **kw):
    dst = tmp_path / "hf"
    shutil.copytree(make_hf_model(**kw)[0], dst)
    return dst


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        config.pop(key)
    path.write_text(json.dumps(config))


def test_folder_without_any_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected params.json.*or config.json"):
        load_folder(tmp_path, 0, 1)
    (tmp_path / "config.json").write_text(json.dumps(
        dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=192, vocab_size=512)))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors weights in"):
        build(tmp_path)


def test_hf_index_naming_a_missing_file(make_hf_model, tmp_path):
    folder = hf_copy(make_hf_model, tmp_path, max_shard_size="100KB")
    second = sorted(folder.glob("*.safetensors"))[1]
    second.unlink()
    with pytest.raises(FileNotFoundError, match=f"names {second.name}, which is not in"):
        build(folder)


@pytest.mark.parametrize("changes, error", [
    (dict(intermediate_size=None), r"lacks the required key\(s\) \['intermediate_size'\]"),
    (dict(model_type="mistral"), "'mistral' model; only Llama"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "asks for RoPE scaling 'linear'"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}), "RoPE scaling 'llama3'"),
    (dict(tie_word_embeddings=True), "asks for tie_word_embeddings=true, which Code Llama"),
    (dict(num_hidden_layers=3), r"missing keys \['layers.2"),
    (dict(num_attention_heads=8), r"k_proj.weight has 32 rows but config.json's 2 heads of 8"),
    (dict(vocab_size=1000), "vocab_size 1000 but the tokenizer has 512"),
])
def test_hf_config_errors(make_hf_model, tmp_path, changes, error):
    folder = hf_copy(make_hf_model, tmp_path)
    edit_config(folder, **changes)
    with pytest.raises(ValueError, match=error):
        build(folder)


def test_hf_tensor_of_another_model(make_hf_model, tmp_path):
    from safetensors.torch import save_file
    folder = hf_copy(make_hf_model, tmp_path)
    (folder / "model.safetensors.index.json").unlink()
    save_file({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)},
              str(folder / "extra.safetensors"))
    with pytest.raises(ValueError, match="q_proj.bias, which is not a weight of LlamaForCausalLM"):
        build(folder)


def test_hf_folder_without_tokenizer(make_hf_model, tmp_path):
    folder = hf_copy(make_hf_model, tmp_path)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        build(folder)


def test_world_size_that_does_not_divide_the_heads(make_model, make_hf_model):
    for folder, name in ((make_model()[0], "params.json"), (make_hf_model()[0], "config.json")):
        with pytest.raises(ValueError, match=f"{name}: 4 attention heads do not split over 3 "
                                             f"model-parallel processes; this model runs on "
                                             f"1 or 2 process"):
            load_folder(folder, 0, 3)


def test_hf_training_folder_is_read_as_hugging_face(make_hf_model, make_model, tmp_path):
    """A folder saved by transformers' Trainer holds .pth files that are not shards."""
    folder = hf_copy(make_hf_model, tmp_path)
    torch.save({"python": [1, 2]}, folder / "rng_state.pth")
    torch.save({"lr": 1.0}, folder / "scheduler.pth")
    assert torch.equal(logits(folder), logits(make_model()[0]))


@pytest.mark.parametrize("stray", ["consolidated.00 (1).pth", "consolidated.00.pth.pth",
                                   "consolidated.0.pth"])
def test_stray_copy_of_a_shard_is_named(make_model, tmp_path, stray):
    folder = tmp_path / "model"
    shutil.copytree(make_model()[0], folder)
    shutil.copy(folder / "consolidated.00.pth", folder / stray)
    with pytest.raises(ValueError, match=re.escape(f"{stray} is not a shard name")):
        load_folder(folder, 0, 1)


def test_missing_shard_in_the_middle_is_named(make_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(make_model(shards=4)[0], folder)
    (folder / "consolidated.01.pth").unlink()
    with pytest.raises(FileNotFoundError, match="has consolidated.02.pth but not "
                                                "consolidated.01.pth"):
        load_folder(folder, 0, 1)


def test_damaged_hf_files_are_named(make_hf_model, tmp_path):
    folder = hf_copy(make_hf_model, tmp_path, max_shard_size="100KB")
    index, config = folder / "model.safetensors.index.json", folder / "config.json"
    text = index.read_text()
    index.write_text(text[:-10])
    with pytest.raises(ValueError, match=f"{re.escape(str(index))} is not valid JSON"):
        build(folder)
    index.write_text(text)
    config_text = config.read_text()
    config.write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{re.escape(str(config))} holds a list"):
        build(folder)
    config.write_text(config_text[:20])
    with pytest.raises(ValueError, match=f"{re.escape(str(config))} is not valid JSON"):
        build(folder)
    config.write_text(config_text)
    second = sorted(folder.glob("*.safetensors"))[1]
    second.write_bytes(second.read_bytes()[:second.stat().st_size // 2])  # a cut-off download
    with pytest.raises(ValueError, match=f"{re.escape(str(second))} cannot be read as "
                                         f"safetensors.*incomplete"):
        build(folder)


def test_second_copy_of_a_safetensors_file_is_named(make_hf_model, tmp_path):
    folder = hf_copy(make_hf_model, tmp_path, max_shard_size="100KB")
    (folder / "model.safetensors.index.json").unlink()
    first = sorted(folder.glob("*.safetensors"))[0]
    copy = folder / f"{first.stem} (1).safetensors"
    shutil.copy(first, copy)
    with pytest.raises(ValueError, match=re.escape(f"is in both {copy} and {first}")):
        build(folder)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/x.safetensors", "a/b", ""])
def test_index_cannot_point_outside_its_folder(make_hf_model, tmp_path, name):
    folder = hf_copy(make_hf_model, tmp_path)
    index = folder / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    first = next(iter(content["weight_map"]))
    content["weight_map"][first] = name
    index.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="which is not a file name in"):
        build(folder)


@pytest.mark.parametrize("changes, key", [
    (dict(num_attention_heads=0), "num_attention_heads must be a whole number of at least 1"),
    (dict(hidden_size="64"), "hidden_size must be a whole number of at least 1, got '64'"),
    (dict(num_hidden_layers=-2), "num_hidden_layers must be a whole number"),
    (dict(intermediate_size=1.5), "intermediate_size must be a whole number"),
    (dict(rms_norm_eps=0), "rms_norm_eps must be a finite number above 0"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps must be a finite number above 0"),
    (dict(rope_theta=-1e4), "rope_theta must be a finite number above 0"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 0}), "rope_theta must be"),
    (dict(num_key_value_heads=3), "num_attention_heads=4 is not a multiple of "
                                  "num_key_value_heads=3"),
    (dict(num_attention_heads=3, num_key_value_heads=1), "hidden_size=64 does not split into "
                                                         "num_attention_heads=3 heads"),
])
def test_hf_config_values_that_cannot_work(make_hf_model, tmp_path, changes, key):
    folder = hf_copy(make_hf_model, tmp_path)
    edit_config(folder, **changes)
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'config.json'}: {key}")):
        build(folder)
