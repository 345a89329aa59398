"""python -m llama.convert: Meta <-> Hugging Face round trips, resharding, errors."""

import collections
import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, build
from llama import conversion, convert
from llama.checkpoint import IGNORED_KEYS, open_meta

TOKENS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))


def full_state(folder):
    """A Meta folder's tensors, joined from its shards (rope.freqs left out)."""
    return {k: part.load() for k, part in open_meta(folder).rank_state(0, 1).items()}


def assert_same_tensors(got, want):
    want = {k: v for k, v in want.items() if k not in IGNORED_KEYS}
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def check_checklist(folder):
    lines = (folder / "checklist.chk").read_text().splitlines()
    names = sorted(p.name for p in folder.iterdir() if p.name != "checklist.chk")
    assert [line.split("  ")[1] for line in lines] == names
    for line in lines:
        digest, name = line.split("  ")
        assert hashlib.md5((folder / name).read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("shards, mp", [(1, 1), (2, 2), (2, 1), (1, 2)])
def test_meta_hf_meta_round_trip_is_bit_exact(make_model, tmp_path, shards, mp):
    meta, _, state = make_model(shards=shards)
    convert.to_hf(meta, tmp_path / "hf", max_shard_size="100KB")
    convert.from_hf(tmp_path / "hf", tmp_path / "back", mp=mp)
    back = tmp_path / "back"
    assert sorted(p.name for p in back.glob("*.pth")) == [f"consolidated.0{r}.pth"
                                                          for r in range(mp)]
    assert_same_tensors(full_state(back), state)
    original = json.loads((meta / "params.json").read_text())
    written = json.loads((back / "params.json").read_text())
    assert list(written.items()) == list(original.items())  # same keys, values and order
    assert (back / "tokenizer.model").read_bytes() == (meta / "tokenizer.model").read_bytes()
    check_checklist(back)


def test_params_json_like_7b_survives(make_model, tmp_path):
    """Meta's 7B params.json has neither vocab_size nor n_kv_heads."""
    folder = tmp_path / "meta"
    shutil.copytree(make_model(n_kv_heads=4)[0], folder)
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32,
              "ffn_dim_multiplier": 1.0, "norm_eps": 1e-05, "rope_theta": 1000000}
    (folder / "params.json").write_text(json.dumps(params, indent=4))  # Meta's layout
    convert.to_hf(folder, tmp_path / "hf")
    convert.from_hf(tmp_path / "hf", tmp_path / "back")
    back = (tmp_path / "back" / "params.json").read_text()
    assert back == json.dumps(params, indent=4)
    assert list(json.loads(back).items()) == list(params.items())  # same keys, order, values


def test_hf_output_loads_in_transformers(make_model, tmp_path):
    from transformers import LlamaForCausalLM
    meta, args, _ = make_model()
    out = tmp_path / "hf"
    convert.to_hf(meta, out, max_shard_size="150KB", max_position_embeddings=4096)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 1e6 and config["max_position_embeddings"] == 4096
    assert config["num_key_value_heads"] == 2 and config["vocab_size"] == 512
    assert config["intermediate_size"] == args.ffn_hidden_dim
    assert config["torch_dtype"] == "float32"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == files and len(files) > 2
    largest = 512 * 64 * 4  # an embedding: alone in its file when over the limit
    assert all((out / f).stat().st_size < max(150_000, largest) + 10_000 for f in files)
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    theirs = model(TOKENS).logits
    ours = build(meta).model.forward(TOKENS, 0)
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5


def test_default_max_position_embeddings(make_model, tmp_path):
    convert.to_hf(make_model()[0], tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["max_position_embeddings"] == 16384


def test_from_hf_of_a_folder_saved_by_transformers(make_model, tmp_path):
    """No kept params.json: params.json is derived from config.json and the weights come
    back exactly."""
    from conftest import hf_model
    meta, args, state = make_model(n_kv_heads=4)
    hf_model(args, state).save_pretrained(tmp_path / "hf")
    shutil.copy(meta / "tokenizer.model", tmp_path / "hf")
    convert.from_hf(tmp_path / "hf", tmp_path / "back", mp=2)
    assert_same_tensors(full_state(tmp_path / "back"), state)
    params = json.loads((tmp_path / "back" / "params.json").read_text())
    assert "n_kv_heads" not in params and params["vocab_size"] == 512
    assert torch.equal(build(tmp_path / "back").model.forward(TOKENS, 0),
                       build(meta).model.forward(TOKENS, 0))


def test_edited_config_wins_over_the_kept_params(make_model, tmp_path):
    convert.to_hf(make_model()[0], tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "rope_theta": 5e5}))
    convert.from_hf(tmp_path / "hf", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "params.json").read_text())["rope_theta"] == 5e5


def test_kept_params_that_cannot_work_are_replaced(make_model, tmp_path):
    convert.to_hf(make_model()[0], tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    config["codellama_params"]["multiple_of"] = 0
    path.write_text(json.dumps(config))
    convert.from_hf(tmp_path / "hf", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "params.json").read_text())["multiple_of"] > 0


def test_reshard_1_2_1_is_bit_exact(make_model, tmp_path):
    meta, _, state = make_model()
    convert.reshard(meta, tmp_path / "mp2", mp=2)
    convert.reshard(tmp_path / "mp2", tmp_path / "mp1", mp=1)
    one = torch.load(tmp_path / "mp1" / "consolidated.00.pth")
    original = torch.load(meta / "consolidated.00.pth")
    assert list(one) == list(original)  # rope.freqs included, same order
    assert all(torch.equal(one[k], original[k]) for k in original)
    halves = [torch.load(tmp_path / "mp2" / f"consolidated.0{r}.pth") for r in range(2)]
    assert halves[0]["layers.0.attention.wo.weight"].shape == (64, 32)
    for name in ("params.json", "tokenizer.model"):
        assert (tmp_path / "mp1" / name).read_bytes() == (meta / name).read_bytes()
    check_checklist(tmp_path / "mp2")
    assert_same_tensors(full_state(tmp_path / "mp2"), state)


def test_cli_spellings(make_model, tmp_path, capsys):
    """fire takes to_hf and to-hf, --ckpt_dir and --ckpt-dir; each command says where it
    wrote."""
    meta = make_model()[0]
    convert.main(["to-hf", "--ckpt-dir", str(meta), "--out-dir", str(tmp_path / "hf")])
    convert.main(["from_hf", "--hf_dir", str(tmp_path / "hf"), "--out_dir",
                  str(tmp_path / "back"), "--mp", "2"])
    convert.main(["reshard", str(tmp_path / "back"), str(tmp_path / "one"), "--mp=1"])
    assert_same_tensors(full_state(tmp_path / "one"), make_model()[2])
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {tmp_path / name}" for name in ("hf", "back", "one")]


# ---- errors ------------------------------------------------------------------------------

def test_output_folder_must_be_new_or_empty(make_model, tmp_path):
    meta = make_model()[0]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    for run in (lambda: convert.to_hf(meta, tmp_path / "out"),
                lambda: convert.reshard(meta, tmp_path / "out", mp=2),
                lambda: convert.to_hf(meta, meta)):
        with pytest.raises(FileExistsError, match="is not empty; choose a new --out_dir"):
            run()


def test_mp_that_does_not_divide(make_model, make_hf_model, tmp_path):
    with pytest.raises(ValueError, match="4 attention heads do not split over 3"):
        convert.reshard(make_model()[0], tmp_path / "a", mp=3)
    with pytest.raises(ValueError, match="2 key/value heads do not split over 4"):
        convert.from_hf(make_hf_model()[0], tmp_path / "b", mp=4)
    for bad in (0, True):  # `--mp` given without a value reaches us as True
        with pytest.raises(ValueError, match="--mp must be a positive whole number"):
            convert.reshard(make_model()[0], tmp_path / "c", mp=bad)
    for bad in (0, -5, "abc"):
        with pytest.raises(ValueError, match="--max_position_embeddings must be a positive"):
            convert.to_hf(make_model()[0], tmp_path / "d", max_position_embeddings=bad)
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_tokenizer_that_does_not_match_the_embedding(make_model, tmp_path):
    folder = tmp_path / "meta"
    shutil.copytree(make_model()[0], folder)
    path = folder / "consolidated.00.pth"
    state = torch.load(path)
    for key in ("tok_embeddings.weight", "output.weight"):
        state[key] = state[key][:256].clone()
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"tokenizer.model has 512 pieces but the weights in "
                                         r".* embed 256 tokens"):
        convert.to_hf(folder, tmp_path / "hf")
    with pytest.raises(ValueError, match="tokenizer.model has 512 pieces"):
        convert.reshard(folder, tmp_path / "mp2", mp=2)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "vocab_size": 512}))
    with pytest.raises(ValueError, match="says vocab_size 512 but the checkpoint embeds 256"):
        convert.reshard(folder, tmp_path / "mp2", mp=2)


def test_params_json_that_does_not_match_the_weights(make_model, tmp_path):
    folder = tmp_path / "meta"
    shutil.copytree(make_model()[0], folder)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "multiple_of": 128}))
    with pytest.raises(ValueError, match=r"feed_forward.w1.weight has shape \(192, 64\)"):
        convert.to_hf(folder, tmp_path / "hf")
    (folder / "params.json").write_text(json.dumps({**params, "n_heads_kv": 2}))
    with pytest.raises(ValueError, match="unknown key.*n_heads_kv"):
        convert.to_hf(folder, tmp_path / "hf")


@pytest.mark.parametrize("size, expected", [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30),
                                            ("500mb", 5 * 10**8), (1000, 1000)])
def test_parse_size(size, expected):
    assert conversion.parse_size(size) == expected


def test_bad_size(make_model, tmp_path):
    with pytest.raises(ValueError, match="max_shard_size '5 gigs' is not a size"):
        convert.to_hf(make_model()[0], tmp_path / "hf", max_shard_size="5 gigs")


# ---- failures while writing, and the command line -------------------------------------------

DEV_FULL = Path("/dev/full")


def test_too_little_space_is_refused_before_writing(make_model, tmp_path, monkeypatch):
    free = collections.namedtuple("usage", "total used free")(10**9, 10**9 - 5000, 5000)
    monkeypatch.setattr(conversion.shutil, "disk_usage", lambda path: free)
    for run in (lambda: convert.to_hf(make_model()[0], tmp_path / "out"),
                lambda: convert.reshard(make_model()[0], tmp_path / "out", mp=2)):
        with pytest.raises(OSError, match=r"the disk mounted at /\S* has 0.00 GB free, and "
                                          r"this conversion writes 0.0\d GB") as error:
            run()
        assert error.value.errno == errno.ENOSPC
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_disk_filling_up_while_writing(make_model, tmp_path, monkeypatch):
    """torch.save reports a full disk as "unexpected pos" and safetensors as its own error:
    both become one message naming the disk, and nothing is left behind."""
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")
    with monkeypatch.context() as m:
        m.setattr("safetensors.torch.save_file", full)
        with pytest.raises(OSError, match=r"the disk mounted at /\S* is full"):
            convert.to_hf(make_model()[0], tmp_path / "hf")
    assert not list(tmp_path.iterdir())
    if not DEV_FULL.exists():
        return
    real_save = conversion.save_torch  # the real torch.save, onto a device always full
    monkeypatch.setattr(conversion, "save_torch",
                        lambda state, path: real_save(state, DEV_FULL))
    with pytest.raises(OSError, match=r"the disk mounted at /\S* is full"):
        convert.reshard(make_model()[0], tmp_path / "mp2", mp=2)
    assert not list(tmp_path.iterdir())


def test_interrupted_conversion_leaves_nothing_and_can_be_rerun(make_model, tmp_path,
                                                               monkeypatch):
    meta, _, state = make_model()
    calls = []

    def interrupted(state, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(state, path)
    real_save = conversion.save_torch
    monkeypatch.setattr(conversion, "save_torch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert.reshard(meta, tmp_path / "mp2", mp=2)
    assert calls[0].parent.name == ".mp2.partial" and not list(tmp_path.iterdir())
    # A killed conversion (no chance to clean up) leaves only the hidden folder.
    (tmp_path / ".mp2.partial").mkdir()
    (tmp_path / ".mp2.partial" / "consolidated.00.pth").write_bytes(b"half")
    monkeypatch.setattr(conversion, "save_torch", real_save)
    convert.reshard(meta, tmp_path / "mp2", mp=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mp2"]
    assert_same_tensors(full_state(tmp_path / "mp2"), state)


def test_output_into_an_existing_empty_folder(make_model, tmp_path):
    (tmp_path / "out").mkdir()
    convert.reshard(make_model()[0], tmp_path / "out", mp=1)
    assert (tmp_path / "out" / "consolidated.00.pth").is_file()


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_written_files_follow_the_umask(make_model, tmp_path, mask):
    meta = tmp_path / "meta"
    shutil.copytree(make_model()[0], meta)
    (meta / "tokenizer.model").chmod(0o600)  # the source's mode is not copied
    old = os.umask(mask)
    try:
        convert.to_hf(meta, tmp_path / "hf", max_shard_size="100KB")
        convert.from_hf(tmp_path / "hf", tmp_path / "back")
    finally:
        os.umask(old)
    for folder in (tmp_path / "hf", tmp_path / "back"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask
        for f in folder.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


def test_to_hf_without_safetensors(make_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"pip install safetensors \(or pip install -e "
                                          r"\"\.\[hf\]\""):
        convert.to_hf(make_model()[0], tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_cli_user_errors_print_one_line(make_model, tmp_path, capsys):
    meta = str(make_model()[0])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for argv, message in [
        (["reshard", meta, str(tmp_path / "a"), "--mp", "3"], "do not split over 3"),
        (["reshard", meta, str(tmp_path / "a"), "--mp", "0"], "--mp must be a positive"),
        (["reshard", meta, str(tmp_path / "a"), "--mp", "two"], "--mp takes int, got 'two'"),
        (["reshard", meta, str(tmp_path / "a")], "--mp is required (see "),
        (["reshard", meta, str(tmp_path / "a"), "2", "--bogus", "1"], "unknown option --bogus"),
        (["to_hf", meta, str(tmp_path / "full")], "is not empty"),
        (["from_hf", str(tmp_path / "nothing"), str(tmp_path / "b")], "config.json not found"),
    ]:
        with pytest.raises(SystemExit) as exit:
            convert.main(argv)
        assert exit.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_cli_internal_errors_keep_their_traceback(make_model, tmp_path, monkeypatch):
    def bug(*args):
        raise KeyError("a bug")
    monkeypatch.setattr(conversion, "write_ranks", bug)
    with pytest.raises(KeyError, match="a bug"):
        convert.main(["reshard", str(make_model()[0]), str(tmp_path / "a"), "--mp", "1"])


@pytest.mark.parametrize("argv", [[], ["convert"], ["--mp", "2"]])
def test_cli_without_a_command_shows_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        convert.main(argv)
    assert exit.value.code == 2
    assert "python -m llama.convert reshard" in capsys.readouterr().err


def test_cli_on_the_demo_model_names_the_process_counts_that_work(tmp_path):
    """The whole process: one line on stderr, no traceback, no [rank0]: prefixes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "llama.convert", "reshard", "--ckpt_dir",
         str(ROOT / "models" / "CodeLlama-demo"), "--out_dir", str(tmp_path / "mp4"), "--mp",
         "4"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "params.json: 6 attention heads do not split over 4" in proc.stderr
    assert "this model runs on 1 or 2 process(es)" in proc.stderr
    assert not (tmp_path / "mp4").exists()


def test_transformers_reads_the_converted_tokenizer_with_bos(make_model, tmp_path):
    """to_hf writes tokenizer_config.json: without it transformers encodes prompts with no
    BOS. Text that does not start with a space gets our ids exactly."""
    from transformers import AutoTokenizer

    from llama.tokenizer import Tokenizer
    meta = make_model()[0]
    convert.to_hf(meta, tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ours = Tokenizer(str(meta / "tokenizer.model"))
    for text in ["def fib(n):\n    return n", "import os\nx = [1, 2]\n", "hello"]:
        assert theirs(text).input_ids == ours.encode(text, bos=True, eos=False)
    assert theirs.model_max_length == 16384
