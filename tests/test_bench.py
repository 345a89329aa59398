"""The speed benchmark and the GPU correctness check, run on CPU with the tiny preset."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))


def run_script(*argv, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1",  # tiny models: threads only add overhead
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *map(str, argv)], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture
def one_thread():
    """Tiny models on a busy machine: more threads only add overhead."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def positive(x):
    return isinstance(x, (int, float)) and x > 0


def test_bench_cpu_tiny(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "results.json"
    proc = run_script(BENCH / "bench.py", "--device", "cpu", "--preset", "tiny",
                      "--prefill_lens", "16", "--batch_sizes", "1,3", "--prompt_len", "6",
                      "--gen_len", "8", "--ragged", "--long", "--long_len", "96",
                      "--long_gen_len", "4", "--peers", "hf_eager,hf_static", "--repeats", "2",
                      "--decode_repeats", "1", "--check", "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["config"]["device"] == "cpu" and res["config"]["dtype"] == "float32"
    assert positive(res["bandwidth_gb_per_s"])
    check = res["check"]  # float32 on CPU against itself: every token agrees
    assert check["ok"] and check["logits_rel_err"] == 0
    assert all(r["agreeing_tokens"] == check["gen_len"] for r in check["prompts"])
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
            assert r["tokens_per_s"] == pytest.approx(
                s["batch"] * r["steps"] / r["decode_s"])
            assert r["roofline_pct"] == pytest.approx(
                100 * r["tokens_per_s"] / r["roofline_tokens_per_s"])
            assert r["peak_mem_gib"] is None  # CPU: not measured
    table = proc.stdout[proc.stdout.index("scenario  "):]
    assert "decode b=3" in table and "tok/s" in table and "% of" in table


def test_bench_in_process_without_peers(tmp_path, capsys, one_thread):
    import torch._inductor.config as inductor_config
    import bench
    out = tmp_path / "r.json"
    with inductor_config.patch({"triton.enable_pdl": False}):  # restored afterwards
        bench.main(device="cpu", preset="tiny", prefill_lens="8", batch_sizes=2,
                   prompt_len=4, gen_len=3, peers="none", repeats=1, out=str(out),
                   inductor={"triton.enable_pdl": True})
        assert inductor_config.triton.enable_pdl  # --inductor took effect
    scen = json.loads(out.read_text())["scenarios"]
    assert set(scen) == {"prefill L=8", "decode b=2"}
    assert scen["decode b=2"]["peers"] == {} and scen["decode b=2"]["ours"]["steps"] == 2
    assert "results written to" in capsys.readouterr().out


@pytest.mark.parametrize("bad, message", [
    (dict(gen_len=1), "--gen_len must be at least 2"),
    (dict(dtype="float64"), "--dtype float64 is not supported"),
    (dict(batch_sizes="0"), "--batch_sizes must be positive"),
    (dict(prefill_lens="0"), "--prefill_lens must be positive"),
    (dict(inductor={"triton.enable_pdll": True}), "no setting triton.enable_pdll"),
    (dict(inductor={"coordinate_descent_tuning": False}),
     "cannot change coordinate_descent_tuning"),
])
def test_bad_sizes_are_refused(tmp_path, bad, message):
    import bench
    with pytest.raises(ValueError, match=message):
        bench.main(**{**dict(device="cpu", preset="tiny", peers="none",
                             out=str(tmp_path / "r.json")), **bad})


def test_a_failing_peer_is_reported_not_fatal(tmp_path, capsys, monkeypatch, one_thread):
    import bench

    class FakeHF:
        device = "cpu"

    def fail(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (pretend)")

    monkeypatch.setattr(bench, "hf_build", lambda *a: FakeHF())
    monkeypatch.setattr(bench, "hf_decode_once", fail)
    monkeypatch.setattr(bench, "hf_prefill", fail)
    monkeypatch.setitem(sys.modules, "transformers", type("M", (), {"__version__": "x"}))
    out = tmp_path / "r.json"
    bench.main(device="cpu", preset="tiny", prefill_lens=8, batch_sizes=1, prompt_len=4,
               gen_len=3, peers="hf_eager,hf_static", repeats=1, out=str(out))
    scen = json.loads(out.read_text())["scenarios"]
    assert "out of memory" in scen["decode b=1"]["peers"]["hf_static"]["error"]
    assert "out of memory" in scen["prefill L=8"]["peers"]["hf_eager"]["error"]
    assert positive(scen["decode b=1"]["ours"]["tokens_per_s"])
    assert "decode b=1 / hf_static failed: RuntimeError" in capsys.readouterr().out


def test_roofline_bytes_of_7b():
    """Bytes of one decode step: the weights less the input embedding, plus the KV read."""
    from bench import decode_figures
    from llama import ModelArgs
    args = ModelArgs.from_name("7b")
    fig = decode_figures(args, 2, batch=1, context=15, steps=1, seconds=0.01,
                         bandwidth=4e12, world=1)  # the one step reads 16 positions
    weights = (6_738_546_688 - 32016 * 4096) * 2
    kv = 2 * 32 * 32 * 128 * 16 * 2
    assert fig["bytes_per_step_gb"] * 1e9 == pytest.approx(weights + kv)
    assert fig["roofline_tokens_per_s"] == pytest.approx(4e12 / (weights + kv))
    half = decode_figures(args, 2, 1, 15, 1, 0.01, 4e12, world=2)
    assert half["bytes_per_step_gb"] == pytest.approx(fig["bytes_per_step_gb"] / 2)


def test_check_main_float32_agrees_exactly(capsys, one_thread):
    import check_gpu
    check_gpu.main(device="cpu", prompts=3, gen_len=16, long_prompt=60)
    out = capsys.readouterr().out
    assert "OK: float32 on cpu" in out and "[16, 16, 16] of 16" in out
    assert "sampling follows each call's settings: True" in out


@pytest.mark.parametrize("baked", [False, True])
def test_check_sees_whether_captured_steps_follow_each_calls_sampling(monkeypatch, baked,
                                                                      one_thread):
    """Through GraphedDecoder (its graph swapped for re-running the step on the CPU), the
    check passes when each call's settings are used, and fails when the first sampling
    settings stick."""
    import check_gpu
    from conftest import replayed_decoder
    monkeypatch.setattr(check_gpu, "renew_steps",
                        lambda gen: setattr(gen, "graphed", replayed_decoder(gen.model, baked)))
    report = check_gpu.run(device="cpu", prompts=3, gen_len=16, long_prompt=60)
    assert report["sampling_follows_each_call"] is not baked
    assert report["ok"] is not baked


def test_check_bfloat16_near_ties_and_a_real_mismatch(monkeypatch, one_thread):
    import check_gpu
    report = check_gpu.run(device="cpu", dtype="bfloat16", prompts=3, gen_len=16,
                           long_prompt=100)
    assert report["ok"], report
    assert 1e-4 < report["logits_rel_err"] < 5e-2  # bf16 rounding, not a bug
    for row in report["prompts"]:
        if row["agreeing_tokens"] < 16:
            assert row["test_token"] in row["float32_top2"]

    def broken_load(model, state, source, device, dtype):  # a bug in the fast path
        state = dict(state)
        key = "layers.0.attention.wq.weight"
        state[key] = state[key].flip(0)
        return load_into(model, state, source, device, dtype)

    load_into = check_gpu.load_into
    monkeypatch.setattr(check_gpu, "load_into", broken_load)
    bad = check_gpu.run(device="cpu", dtype="bfloat16", prompts=2, gen_len=4, long_prompt=8)
    assert not bad["ok"] and bad["logits_rel_err"] > 5e-2


def test_compare_mp_summary():
    import compare_mp
    runs = [(1, 100.0), (2, 160.0), (2, 150.0), (1, 95.0), (1, 105.0), (2, 170.0)]
    summary = compare_mp.summarize(runs)
    assert summary["medians"] == {1: 100.0, 2: 160.0}
    assert summary["ratio_of_medians"] == pytest.approx(1.6)
    # Only neighbours of different sizes pair up, always MP=2 over MP=1.
    assert summary["pair_ratios"] == pytest.approx([1.6, 150 / 95, 170 / 105])
    with pytest.raises(ValueError, match="two world sizes"):
        compare_mp.summarize([(2, 150.0), (2, 160.0)])


def test_compare_mp_alternates_real_runs_on_cpu(tmp_path):
    out = tmp_path / "compare.json"
    proc = run_script(BENCH / "compare_mp.py", "--preset", "tiny", "--device", "cpu",
                      "--nproc", 2, "--rounds", 2, "--gen_len", 6, "--decode_repeats", 1,
                      "--mp1_configure", "{}", "--mp_configure", "{}", "--out", out,
                      "--inductor", '{"triton.enable_pdl": True}', timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [run["world"] for run in result["runs"]] == [1, 2, 2, 1]
    assert [run.get("gpu") for run in result["runs"]] == [0, None, None, 1]  # in turn
    assert set(result["mp1_median_by_gpu"]) == {"0", "1"}
    speeds = [run["tokens_per_s"] for run in result["runs"]]
    assert all(positive(s) for s in speeds)
    assert result["pair_ratios"] == pytest.approx([speeds[1] / speeds[0],
                                                   speeds[2] / speeds[3]])
    assert "ratio" in proc.stdout and "MP=2" in proc.stdout


def test_compare_mp_picks_each_gpu_as_cuda_visible_devices_names_it():
    from compare_mp import nth_gpu
    assert [nth_gpu("", n) for n in (0, 1)] == ["0", "1"]
    assert [nth_gpu("4, 6", n) for n in (0, 1)] == ["4", "6"]
    assert nth_gpu("GPU-3f2a", 0) == "GPU-3f2a"
    with pytest.raises(ValueError, match="GPU 2 of CUDA_VISIBLE_DEVICES='4,6'"):
        nth_gpu("4,6", 2)


def test_compare_mp_runs_mp1_on_the_chosen_gpu(monkeypatch):
    import compare_mp
    seen = []

    def fake_run(command, env, **kwargs):
        seen.append((command, env.get("CUDA_VISIBLE_DEVICES")))
        out = Path(command[command.index("--out") + 1])
        out.write_text(json.dumps({"scenarios": {compare_mp.SCENARIO: {
            "ours": {"tokens_per_s": 100.0}}}}))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(compare_mp.subprocess, "run", fake_run)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    for gpu in (0, 1):
        assert compare_mp.run_bench(1, [], {}, "cuda", 10, gpu) == 100.0
    assert compare_mp.run_bench(2, [], {}, "cuda", 10) == 100.0
    assert [visible for _, visible in seen] == ["5", "7", "5,7"]  # MP=2 keeps both
    assert "torch.distributed.run" in seen[2][0]


def test_compare_mp_passes_inductor_settings_to_bench(tmp_path):
    import compare_mp
    with pytest.raises(RuntimeError, match="no setting no_such_setting"):
        compare_mp.main(preset="tiny", device="cpu", rounds=1, mp1_configure={},
                        inductor={"no_such_setting": 1}, out=str(tmp_path / "c.json"))


def test_host_gap_runs_on_cpu(one_thread):
    import math

    import profile_step
    gaps = profile_step.host_gap(preset="tiny", device="cpu", gen_len=6, repeats=2)
    assert len(gaps) == 2 and all(len(g) == 2 and all(map(math.isfinite, g)) for g in gaps)


def test_ffn_swiglu_variants_agree_on_cpu(one_thread):
    import ffn_swiglu
    rows = ffn_swiglu.main(hidden="96,160", dim=64, layers=2, repeats=2, device="cpu",
                           dtype="float32")
    assert [r["hidden"] for r in rows] == [96, 160]
    for r in rows:  # the same sums in another order
        assert r["max_abs"] > 0.1 and r["max_abs_diff"] < 1e-5 * r["max_abs"]
        assert all(r[f"{name}_us"] > 0 for name in ("inlined", "written", "realized"))
    import torch
    overflowing = {"inlined": lambda h, w13, w2: h * float("inf")}
    with pytest.raises(ValueError, match="not finite"):
        ffn_swiglu.time_width(overflowing, 96, 64, 2, 1, torch.device("cpu"), torch.float32)


def test_agreeing_steps():
    from inductor_settings import agreeing_steps
    assert agreeing_steps([1, 2, 3], [1, 2, 3]) == 3
    assert agreeing_steps([1, 5, 3], [1, 2, 3]) == 1
    assert agreeing_steps([4, 2, 3], [1, 2, 3]) == 0


def test_inductor_settings_compiles_each_variant_on_cpu(one_thread):
    import torch._dynamo
    import inductor_settings
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    variants = [{}, {"coordinate_descent_tuning": False}]
    rows = inductor_settings.main(preset="tiny", variants=variants, context=16, steps=6,
                                  rounds=2, replays=3, device="cpu")
    assert [r["settings"] for r in rows] == variants
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # one per variant
    for r in rows:  # float32 on the CPU: the same tokens from both compilations
        assert r["agreeing_steps"] == 6 and len(r["ms"]) == 2 and all(map(positive, r["ms"]))
    with pytest.raises(ValueError, match="list of dicts"):
        inductor_settings.main(preset="tiny", variants=["triton.enable_pdl"], device="cpu")


@pytest.mark.parametrize("heads", [dict(), dict(n_heads=8, n_kv_heads=2, dim=128)])
def test_one_rank_of_builds_one_ranks_share_in_one_process(one_thread, monkeypatch, heads):
    from inductor_settings import one_rank_of
    import torch
    from llama import Llama
    from llama.checkpoint import split_dim, split_range
    kw = dict(max_seq_len=16, max_batch_size=1, device="cpu", **heads)
    gen, whole = one_rank_of(2, "tiny", **kw), Llama.from_preset("tiny", **kw)
    shapes = {key: tuple(t.shape) for key, t in gen.model.state_dict().items()}
    for key, full in whole.model.state_dict().items():
        dim = split_dim(key)
        if key == "tok_embeddings.weight" or dim is None:
            # Whole, as a rank has its embedding after the gather; norms are replicated.
            assert shapes[key] == tuple(full.shape), key
        else:  # exactly rank 0's part of the whole layer, as a checkpoint shard has it
            start, stop = split_range(full.shape[dim], 2, 0, key, dim)
            part = list(full.shape)
            part[dim] = stop - start
            assert shapes[key] == tuple(part), key
    args, attention = gen.model.params, gen.model.layers[0].attention
    assert (attention.n_local_heads, attention.n_local_kv_heads) == (
        args.n_heads // 2, args.kv_heads // 2)
    assert attention.cache.k.shape[1] == args.kv_heads // 2  # (batch, heads, ...)
    logits = gen.model.forward(torch.tensor([[1, 2, 3]]), 0)
    assert logits.shape == (1, 3, args.vocab_size // 2) and logits.isfinite().all()
    # The world size is patched only while the rank's share is built.
    assert whole.model.layers[0].attention.n_local_heads == args.n_heads
    again = Llama.from_preset("tiny", **kw).model.layers[0].attention
    assert again.n_local_heads == args.n_heads
    with pytest.raises(ValueError, match="at least 1"):
        one_rank_of(0, "tiny", **kw)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="not torchrun"):
        one_rank_of(2, "tiny", **kw)


def test_inductor_settings_times_each_variant_on_each_copy(one_thread, monkeypatch):
    import torch._dynamo
    import inductor_settings
    built, build = [], inductor_settings.one_rank_of

    def recording(world, preset, **kwargs):
        built.append(build(world, preset, **kwargs))
        return built[-1]

    monkeypatch.setattr(inductor_settings, "one_rank_of", recording)
    torch._dynamo.reset()
    variants = [{}, {"coordinate_descent_tuning": False}]
    rows = inductor_settings.main(preset="tiny", variants=variants, context=16, steps=6,
                                  rounds=1, replays=2, device="cpu", rank_of=2, copies=2)
    assert [(r["copy"], r["settings"]) for r in rows] == [
        (0, variants[0]), (0, variants[1]), (1, variants[0]), (1, variants[1])]
    # Two models of one rank's share, each in its own memory...
    assert len(built) == 2
    assert all(g.model.layers[0].attention.n_local_heads == g.model.params.n_heads // 2
               for g in built)
    first, second = (g.model.layers[0].feed_forward.w2.weight for g in built)
    assert first.data_ptr() != second.data_ptr()
    # each of them decoded: its own cache was written
    assert all(g.model.layers[0].attention.cache.k.abs().sum() > 0 for g in built)
    # ...holding the same weights (embedding included): the same tokens everywhere.
    assert all(r["agreeing_steps"] == 6 and len(r["ms"]) == 1 for r in rows)
    with pytest.raises(ValueError, match="at least 1"):
        inductor_settings.main(preset="tiny", device="cpu", copies=0)
    with pytest.raises(ValueError, match="no use for --symmetric_memory"):
        inductor_settings.main(preset="tiny", device="cpu", rank_of=2, symmetric_memory=True)


def test_check_mp_takes_inductor_settings(tmp_path):
    import check_mp
    # Checked before anything is loaded (the checkpoint directory does not even exist).
    with pytest.raises(ValueError, match="no setting no_such_setting"):
        check_mp.run(ckpt_dir=str(tmp_path / "none"), out=str(tmp_path / "o.json"),
                     inductor={"no_such_setting": 1})
