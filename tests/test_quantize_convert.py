"""Pre-quantized folders: `python -m llama.convert quantize` writes them (checklist and
params.json included) and Llama.build loads them as they are, computing what quantizing
while loading computes, at MP=1 and MP=2; mismatched requests are refused."""

import json
import os
from pathlib import Path

import pytest
import torch

import conftest
from conftest import build
from llama import checkpoint, convert
from llama import quantize as q

SHAPE = dict(dim=256, n_heads=4, n_kv_heads=2, multiple_of=256)  # see test_quantize_model
PROMPTS = ["def fib(n):", "import re\n"]
WORKER = Path(__file__).with_name("mp_worker.py")


def tokens():
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def folders(make_model, tmp_path_factory):
    """{(mode, mp): pre-quantized folder} of one tiny checkpoint, and its folder."""
    source, _, _ = make_model(**SHAPE)
    out = tmp_path_factory.mktemp("quantized")
    made = {}
    for mode, bits in (("int8", 8), ("int4", 4)):
        for mp in (1, 2):
            made[mode, mp] = out / f"{mode}-mp{mp}"
            convert.main(["quantize", "--ckpt_dir", str(source), "--out_dir",
                          str(made[mode, mp]), "--bits", str(bits), "--mp", str(mp)])
    return source, made


@pytest.mark.parametrize("mode", q.MODES)
def test_folder_loads_as_quantizing_while_loading(folders, mode):
    source, made = folders
    folder = made[mode, 1]
    assert sorted(p.name for p in folder.iterdir()) == [
        "checklist.chk", "consolidated.00.pth", "params.json", "tokenizer.model"]
    for line in (folder / "checklist.chk").read_text().splitlines():
        digest, name = line.split("  ")
        assert checkpoint.md5(folder / name) == digest
    params = json.loads((folder / "params.json").read_text())
    group = 128 if mode == "int4" else None
    assert params["quantization"] == {"mode": mode, "group_size": group, "mp": 1,
                                      "skip": ["output"]}
    stored = torch.load(folder / "consolidated.00.pth", weights_only=True)
    # Fused names, quantized pieces; the output projection as stored.
    assert stored["layers.0.attention.wqkv.weight"].dtype in (torch.int8, torch.uint8)
    assert stored["output.weight"].dtype == torch.float32 and "output.scales" not in stored
    got = build(folder)  # quantize=None: the folder's mode
    want = build(source, quantize=mode)
    assert torch.equal(got.model.forward(tokens(), 0), want.model.forward(tokens(), 0))
    assert {layer.kernel for layer in q.quantized_layers(got.model).values()} == {"cpu_native"}
    same = build(folder, quantize=mode)  # asking for the folder's own mode is fine
    assert torch.equal(same.model.forward(tokens(), 0), want.model.forward(tokens(), 0))


def test_two_process_folders_equal_one_process(folders, tmp_path):
    source, made = folders
    names = os.pathsep.join(str(made[mode, 2]) for mode in q.MODES)
    conftest.run_torchrun(WORKER, 2, names, tmp_path / "out.pt", "prequantized")
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    for mode in q.MODES:
        gen = build(source, quantize=mode)
        want = gen.model.forward(tokens(), 0)
        result = got[str(made[mode, 2])]
        assert ((result["logits"] - want).norm() / want.norm()).item() < 1e-5, mode
        assert result["greedy"] == gen.text_completion(PROMPTS, temperature=0, max_gen_len=16)


def test_mismatched_requests_are_refused(folders):
    _, made = folders
    with pytest.raises(ValueError, match=r"int4-mp1 holds int4 weights \(params.json\), not "
                                         r"int8; pass quantize='int4' or None"):
        build(made["int4", 1], quantize="int8")
    with pytest.raises(ValueError, match=r"quantized for 2 model-parallel process\(es\), and "
                                         r"this run has 1; .*quantize \.\.\. --mp 1"):
        build(made["int8", 2])
    with pytest.raises(ValueError, match="unknown quantization 'fp8'"):
        build(made["int8", 1], quantize="fp8")
    with pytest.raises(ValueError, match=r"holds pre-quantized weights.*convert the original"):
        convert.reshard(str(made["int8", 1]), str(made["int8", 1].parent / "again"), 2)


def test_bad_conversions_write_nothing(make_model, tmp_path, capsys):
    tiny, _, _ = make_model()  # dim 64: int4 groups of 128 do not fit
    with pytest.raises(SystemExit):
        convert.main(["quantize", "--ckpt_dir", str(tiny), "--out_dir", str(tmp_path / "a"),
                      "--bits", "4"])
    assert "layers.0.attention.wqkv.weight at --mp 1: int4 needs" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--bits must be 8 or 4, got 3"):
        convert.quantize(str(tiny), str(tmp_path / "b"), 3)
    assert list(tmp_path.iterdir()) == []
    convert.quantize(str(tiny), str(tmp_path / "c"), 4, group_size=64)  # groups that fit
    gen = build(tmp_path / "c")
    assert {layer.group_size for layer in q.quantized_layers(gen.model).values()} == {64}
