"""The benchmark suite on CPU with the tiny preset: the speed benchmark end to end, its
arguments and figures, and the correctness checks (check_gpu, check_mp, compare_mp)."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench, check_gpu, check_mp, common, compare_mp, measure
from llama.model import PRESETS

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--device", "cpu", "--preset", "tiny"]


@pytest.fixture
def one_thread():
    """Tiny models on a busy machine: more threads only add overhead."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def positive(x):
    return isinstance(x, (int, float)) and x > 0


def test_bench_runs_end_to_end_and_writes_only_its_out_file(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "results" / "r.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", *TINY, "--prefill_lens", "16",
         "--batch_sizes", "1,3", "--prompt_len", "6", "--gen_len", "8", "--ragged", "--long",
         "--long_len", "96", "--long_gen_len", "4", "--repeats", "2", "--decode_repeats", "1",
         "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # nothing else in the cwd
    res = json.loads(out.read_text())
    assert res["config"]["device"] == "cpu" and res["config"]["dtype"] == "float32"
    assert positive(res["bandwidth_gb_per_s"])
    scen = res["scenarios"]
    assert list(scen) == ["prefill L=16", "decode b=1", "decode b=3",
                          "ragged b=3", "long prefill L=96", "long decode ctx=96"]
    assert scen["ragged b=3"]["prompt_lens"] == [3, 7, 12]
    for name, s in scen.items():
        impls = {"ours": s["ours"], **s["peers"]}
        assert set(impls) == ({"ours", "hf_eager"} if s["kind"] == "prefill"
                              else {"ours", "hf_eager", "hf_static"}), name
        for who, r in impls.items():
            assert "error" not in r, (name, who, r)
            if s["kind"] == "prefill":
                assert positive(r["latency_ms"]) and positive(r["tokens_per_s"])
                continue
            assert r["steps"] == s["gen_len"] - 1, (name, who)  # first token to last
            for key in ("tokens_per_s", "ms_per_step", "ttft_ms", "achieved_gb_per_s",
                        "bytes_per_step_gb", "roofline_tokens_per_s", "roofline_pct"):
                assert positive(r[key]), (name, who, key)
            assert r["tokens_per_s"] == pytest.approx(s["batch"] * r["steps"] / r["decode_s"])
            assert r["peak_mem_gib"] is None  # CPU: not measured
    table = proc.stdout[proc.stdout.index("scenario  "):]
    assert "decode b=3" in table and "tok/s" in table and "% of" in table


def test_bench_without_out_writes_no_file(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    res = bench.main([*TINY, "--prefill_lens", "8", "--batch_sizes", "2", "--prompt_len", "4",
                      "--gen_len", "3", "--peers", "none", "--repeats", "1",
                      "--decode", "eager", "--prefill_chunk", "4"])
    assert list(tmp_path.iterdir()) == []
    assert set(res["scenarios"]) == {"prefill L=8", "decode b=2"}
    assert res["scenarios"]["decode b=2"]["ours"]["steps"] == 2
    assert res["config"]["configure"] == common.configure_kwargs("eager", 4)
    assert "decode b=2" in capsys.readouterr().out


def test_quantized_runs_record_their_kernels(tmp_path, monkeypatch, capsys, one_thread):
    """Which matrix-product kernel each quantized layer ran (quant_kernels picks them
    per device and layer, with fallbacks) is part of the results."""
    monkeypatch.chdir(tmp_path)
    res = bench.main([*TINY, "--prefill_lens", "8", "--batch_sizes", "1", "--prompt_len", "4",
                      "--gen_len", "3", "--peers", "none", "--repeats", "1",
                      "--quantize", "int8"])
    layers = 4 * PRESETS["tiny"]["n_layers"]  # wqkv, wo, w13, w2; the output stays
    for scenario in res["scenarios"].values():
        kernels = scenario["ours"]["quant_kernels"]
        assert sum(kernels.values()) == layers and set(kernels) <= {"cpu_native", "cpu"}
    assert f"quantized layers: {layers} on " in capsys.readouterr().out
    plain = bench.main([*TINY, "--prefill_lens", "none", "--batch_sizes", "1",
                        "--prompt_len", "4", "--gen_len", "3", "--peers", "none",
                        "--repeats", "1"])
    assert "quant_kernels" not in plain["scenarios"]["decode b=1"]["ours"]


@pytest.mark.parametrize("module", [bench, check_gpu, check_mp, compare_mp])
def test_help_describes_the_options(module, capsys):
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "python -m benchmarks." in text and "--" in text
    if module is bench:
        for option in ("--decode", "--prefill_lens", "--peers", "--out", "default: 1,32"):
            assert option in text


@pytest.mark.parametrize("argv, message", [
    (["--gen_len", "1"], "--gen_len must be at least 2"),
    (["--batch_sizes", "4,0"], "0 is not positive"),
    (["--prefill_lens", "1k"], "'1k' is not a whole number"),
    (["--peers", "hf_eager,vllm"], "unknown name(s) ['vllm']"),
    (["--dtype", "float64"], "invalid choice: 'float64'"),
    (["--decode", "fast"], "invalid choice: 'fast'"),
])
def test_bench_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as done:
        bench.parse_args(argv)
    assert done.value.code == 2
    assert message in capsys.readouterr().err


def test_list_arguments():
    assert common.int_list("512,4096") == [512, 4096]
    assert common.int_list(" 1, 32 ") == [1, 32]
    assert common.int_list("none") == common.int_list("") == []
    assert common.name_list("hf_eager, hf_static") == ["hf_eager", "hf_static"]
    assert common.names_from(("a", "b"))("b,a") == ["b", "a"]
    for bad in ("0", "-3", "x", "2.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            common.int_list(bad)


@pytest.mark.parametrize("mode", ["eager", "compiled"])  # "graphs" needs CUDA
def test_each_decode_mode_reaches_the_generator(mode):
    from llama import Llama
    gen = Llama.from_preset("tiny", max_seq_len=16, max_batch_size=1, device="cpu")
    gen.configure(**common.configure_kwargs(mode, prefill_chunk=8))
    assert gen.settings["decode"] == mode and gen.prefill_chunk == 8
    with pytest.raises(ValueError, match="unknown"):
        common.configure_kwargs("fast")


def test_a_failing_peer_is_reported_not_fatal(tmp_path, capsys, monkeypatch, one_thread):
    class FakeHF:
        device = "cpu"

    def fail(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (pretend)")

    monkeypatch.setattr(measure, "hf_build", lambda *a: FakeHF())
    monkeypatch.setattr(measure, "hf_decode_once", fail)
    monkeypatch.setattr(measure, "hf_prefill", fail)
    monkeypatch.setitem(sys.modules, "transformers", type("M", (), {"__version__": "x"}))
    scen = bench.main([*TINY, "--prefill_lens", "8", "--batch_sizes", "1", "--prompt_len", "4",
                       "--gen_len", "3", "--repeats", "1"])["scenarios"]
    assert "out of memory" in scen["decode b=1"]["peers"]["hf_static"]["error"]
    assert "out of memory" in scen["prefill L=8"]["peers"]["hf_eager"]["error"]
    assert positive(scen["decode b=1"]["ours"]["tokens_per_s"])
    assert "decode b=1 / hf_static failed: RuntimeError" in capsys.readouterr().out


def test_roofline_bytes_of_7b():
    """Bytes of one decode step: the weights less the input embedding, plus the KV read."""
    from llama import ModelArgs
    args = ModelArgs.from_name("7b")
    fig = measure.decode_figures(args, 2, batch=1, context=15, steps=1, seconds=0.01,
                                 bandwidth=4e12, world=1)  # the one step reads 16 positions
    weights = (6_738_546_688 - 32016 * 4096) * 2
    kv = 2 * 32 * 32 * 128 * 16 * 2
    assert fig["bytes_per_step_gb"] * 1e9 == pytest.approx(weights + kv)
    assert fig["roofline_tokens_per_s"] == pytest.approx(4e12 / (weights + kv))
    half = measure.decode_figures(args, 2, 1, 15, 1, 0.01, 4e12, world=2)
    assert half["bytes_per_step_gb"] == pytest.approx(fig["bytes_per_step_gb"] / 2)


# ---- the correctness checks ------------------------------------------------------------

def test_check_gpu_float32_agrees_exactly(capsys, one_thread):
    check_gpu.main(["--device", "cpu", "--prompts", "3", "--gen_len", "16",
                    "--long_prompt", "60"])
    out = capsys.readouterr().out
    assert "OK: float32 on cpu" in out and "[16, 16, 16] of 16" in out
    assert "sampling follows each call's settings: True" in out


@pytest.mark.parametrize("baked", [False, True])
def test_check_gpu_sees_whether_captured_steps_follow_each_calls_sampling(
        monkeypatch, baked, one_thread):
    """Through GraphedDecoder (its graph swapped for re-running the step on the CPU), the
    check passes when each call's settings are used, and fails when the first sampling
    settings stick."""
    from conftest import replayed_decoder
    monkeypatch.setattr(check_gpu, "renew_steps",
                        lambda gen: setattr(gen.engine, "decoder", replayed_decoder(gen.model, baked)))
    report = check_gpu.run(device="cpu", prompts=3, gen_len=16, long_prompt=60)
    assert report["sampling_follows_each_call"] is not baked
    assert report["ok"] is not baked


def test_check_gpu_bfloat16_near_ties_and_a_real_mismatch(one_thread):
    report = check_gpu.run(device="cpu", dtype="bfloat16", prompts=3, gen_len=16,
                           long_prompt=100)
    assert report["ok"], report
    assert 1e-4 < report["logits_rel_err"] < 5e-2  # bf16 rounding, not a bug
    for row in report["prompts"]:
        if row["agreeing_tokens"] < 16:
            assert row["test_token"] in row["float32_top2"]

    from llama.checkpoint import load_into

    def broken_load(model, state, source, device, dtype):  # a bug in the fast path
        state = dict(state)
        key = "layers.0.attention.wq.weight"
        state[key] = state[key].flip(0)
        return load_into(model, state, source, device, dtype)

    bad = check_gpu.run(device="cpu", dtype="bfloat16", prompts=2, gen_len=4, long_prompt=8,
                        load=broken_load)
    assert not bad["ok"] and bad["logits_rel_err"] > 5e-2


def test_check_mp_passes_equal_runs_and_fails_a_mismatch(tmp_path, capsys, one_thread):
    ckpt = tmp_path / "ck"
    check_mp.main(["write", "--out_dir", str(ckpt), "--preset", "tiny", "--n_layers", "1"])
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for out in (a, b):
        check_mp.main(["run", "--ckpt_dir", str(ckpt), "--out", str(out), "--gen_len", "4",
                       "--dtype", "float32"])
    assert check_mp.compare(str(a), str(b))
    wrong = json.loads(b.read_text())
    wrong["logits"] = [row[::-1] for row in wrong["logits"]]  # other top-1 tokens
    b.write_text(json.dumps(wrong))
    with pytest.raises(SystemExit) as done:
        check_mp.main(["compare", str(a), str(b)])
    assert done.value.code == 1 and "MISMATCH" in capsys.readouterr().out


def test_compare_mp_summary():
    runs = [(1, 100.0), (2, 160.0), (2, 150.0), (1, 95.0), (1, 105.0), (2, 170.0)]
    summary = compare_mp.summarize(runs)
    assert summary["medians"] == {1: 100.0, 2: 160.0}
    assert summary["ratio_of_medians"] == pytest.approx(1.6)
    # Only neighbours of different sizes pair up, always MP=2 over MP=1.
    assert summary["pair_ratios"] == pytest.approx([1.6, 150 / 95, 170 / 105])
    with pytest.raises(ValueError, match="two world sizes"):
        compare_mp.summarize([(2, 150.0), (2, 160.0)])


def test_compare_mp_runs_the_bench_it_reads(monkeypatch):
    """The arguments compare_mp gives each run are bench's, for the one scenario it reads,
    and a real MP=1 run on the CPU gives its speed."""
    opts = compare_mp.parser().parse_args(["--preset", "tiny", "--device", "cpu",
                                           "--gen_len", "4", "--decode_repeats", "1",
                                           "--decode", "eager"])
    for world in (1, 2):
        parsed = bench.parse_args(compare_mp.bench_args(opts, world))
        assert [s.name for s in measure.plan(parsed)] == [compare_mp.SCENARIO]
        assert parsed.peers == [] and parsed.decode == "eager"
        assert parsed.symmetric_memory is (world == 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert positive(compare_mp.run_bench(1, compare_mp.bench_args(opts, 1), "cpu", 300))
