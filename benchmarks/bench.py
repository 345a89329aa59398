"""Speed benchmark of Code Llama inference (issue #5): prefill latency, decode tokens/s,
peak memory and the memory-bandwidth roofline, next to Hugging Face `transformers`.

Random weights with the real shapes are made on the device (`Llama.from_preset`), so no
checkpoint is needed; `--ckpt_dir` loads a real one. Examples:

    python benchmarks/bench.py --preset 7b --prefill_lens 512,4096,16384 --batch_sizes 1,32
    python benchmarks/bench.py --preset 7b --long --prefill_lens none --batch_sizes none
    torchrun --nproc_per_node 2 benchmarks/bench.py --preset 13b --peers none
    python benchmarks/bench.py --device cpu --preset tiny --prefill_lens 32 --gen_len 8

Only rank 0 prints and writes `--out`; every rank runs the same work. Our decode speed is
timed from the first to the last step yielded by `Llama.decode_steps` (prefill excluded);
HF's from its first to its last streamed token, so both cover the same interval.
"""

import gc
import hashlib
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama import Llama  # noqa: E402
from llama.hf import hf_config  # noqa: E402
from llama.decode import COMPILE_SETTINGS, check_inductor_settings  # noqa: E402

GiB = 2**30
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
PEERS = ("hf_eager", "hf_static")
RANK0 = int(os.environ.get("RANK", 0)) == 0
WORLD = int(os.environ.get("WORLD_SIZE", 1))


def say(*args):
    if RANK0:
        print(*args, flush=True)


def as_list(value, cast=int):
    """fire gives 512 or (512, 4096) or "none"; return a list."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return []
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    return [cast(v) for v in value]


class Clock:
    """Marks on the device timeline: CUDA events (after a synchronize unless told not to),
    or perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self, sync: bool = True):
        if not self.cuda:
            return time.perf_counter()
        if sync:
            torch.cuda.synchronize()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000

    def median(self, fn, repeats: int, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(max(1, repeats)):
            start = self.mark()
            fn()
            times.append(self.seconds(start, self.mark()))
        return statistics.median(times)

    def reset_peak(self):
        if self.cuda:  # free what the last scenario left, so that peaks are its own
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self):
        return torch.cuda.max_memory_allocated() / GiB if self.cuda else None


def measure_bandwidth(device, clock: Clock, gib: float, repeats: int = 10) -> float:
    """Bytes/s of a large device-to-device copy, counting the bytes read and written."""
    n = int(gib * GiB)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    seconds = clock.median(lambda: dst.copy_(src), repeats, warmup=2)
    return 2 * n / seconds


def decode_figures(args, elem: int, batch: int, context: int, steps: int, seconds: float,
                   bandwidth: float, world: int) -> dict:
    """tokens/s, and the bandwidth roofline of one step: this rank's weights (all but the
    input embedding table) plus the KV cache read, at the mean context of the timed steps
    (step k reads context + k positions of every row). `world`: GPUs sharing the model."""
    weight_bytes = (args.num_params() - args.vocab_size * args.dim) * elem / world
    mean_context = context + (steps + 1) / 2
    kv_bytes = (2 * args.n_layers * args.kv_heads * args.head_dim * mean_context * batch
                * elem / world)
    step_bytes = weight_bytes + kv_bytes
    roofline = batch * bandwidth / step_bytes
    tps = batch * steps / seconds
    return {"tokens_per_s": tps, "ms_per_step": 1000 * seconds / steps, "steps": steps,
            "decode_s": seconds, "bytes_per_step_gb": step_bytes / 1e9,
            "achieved_gb_per_s": step_bytes * steps / seconds / 1e9,
            "roofline_tokens_per_s": roofline, "roofline_pct": 100 * tps / roofline}


def random_prompts(lens, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def ragged_lens(batch: int, prompt_len: int):
    """Prompt lengths spread evenly from prompt_len/2 to 2*prompt_len."""
    lo, hi = max(1, prompt_len // 2), 2 * prompt_len
    return [lo + (hi - lo) * i // max(1, batch - 1) for i in range(batch)]


# ---- ours -------------------------------------------------------------------------------

def ours_prefill(gen: Llama, clock: Clock, length: int, repeats: int, warmup: int) -> dict:
    prompt = random_prompts([length], gen.model.vocab_size, length)

    def once():  # what generation does before its first token (chunks, compiled or not)
        return gen.prefill(prompt, 0.0, 1.0, None)

    clock.reset_peak()
    seconds = clock.median(once, repeats, warmup)
    return {"latency_ms": 1000 * seconds, "tokens_per_s": length / seconds,
            "peak_mem_gib": clock.peak_gib()}


def ours_decode_once(gen: Llama, clock: Clock, prompts, gen_len: int):
    """One greedy generation: (steps after the first token, their seconds, seconds to the
    first token, a fingerprint of the tokens made, to compare variants' outputs)."""
    call = clock.mark()
    first = None
    made = []
    for step in gen.decode_steps(prompts, gen_len, temperature=0.0, top_p=0.9, stop_ids=set()):
        if first is None:
            first = clock.mark()
        made.append([None if s is None else s[0] for s in step])
    end = clock.mark()
    fingerprint = hashlib.sha1(json.dumps(made).encode()).hexdigest()[:12]
    return len(made) - 1, clock.seconds(first, end), clock.seconds(call, first), fingerprint


def timed_decodes(run_once, clock: Clock, repeats: int, warmup: int):
    """Median run of `run_once() -> (steps, decode seconds, ttft seconds[, fingerprint])`
    and peak memory."""
    clock.reset_peak()
    for _ in range(warmup):
        run_once()
    runs = sorted((run_once() for _ in range(max(1, repeats))), key=lambda r: r[1] / r[0])
    steps, seconds, ttft = runs[len(runs) // 2][:3]
    if steps < 1:
        raise RuntimeError("fewer than two tokens were generated; raise gen_len")
    extra = {"ttft_ms": 1000 * ttft, "peak_mem_gib": clock.peak_gib(),
             "runs_ms_per_step": [1000 * r[1] / r[0] for r in runs]}
    if len(runs[0]) > 3:
        extra["tokens_fingerprint"] = sorted({r[3] for r in runs})
    return steps, seconds, extra


# ---- Hugging Face peers -------------------------------------------------------------------

def hf_build(args, max_len: int, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**{**hf_config(args), "max_position_embeddings": max_len})
    with torch.device(device):  # random weights made on the device
        try:
            model = LlamaForCausalLM._from_config(config, dtype=dtype,
                                                  attn_implementation="sdpa")
        except TypeError:  # transformers before `dtype` replaced `torch_dtype`
            model = LlamaForCausalLM._from_config(config, torch_dtype=dtype,
                                                  attn_implementation="sdpa")
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model


def hf_prefill(model, clock: Clock, length: int, repeats: int, warmup: int) -> dict:
    ids = torch.tensor(random_prompts([length], model.config.vocab_size, length),
                       device=model.device)

    def once():
        with torch.no_grad():
            return model(input_ids=ids, use_cache=True, logits_to_keep=1).logits

    clock.reset_peak()
    seconds = clock.median(once, repeats, warmup)
    return {"latency_ms": 1000 * seconds, "tokens_per_s": length / seconds,
            "peak_mem_gib": clock.peak_gib()}


def hf_decode_once(model, clock: Clock, prompts, gen_len: int, static: bool):
    from transformers.generation.streamers import BaseStreamer

    class Marks(BaseStreamer):  # put(): the prompt, then each new token of every row
        def __init__(self):
            self.marks = []

        def put(self, value):
            self.marks.append(clock.mark(sync=False))

        def end(self):
            self.marks.append(clock.mark())

    width = max(len(p) for p in prompts)  # left padding, HF's convention for generation
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                        device=model.device)
    extra = {"cache_implementation": "static"} if static else {}
    streamer = Marks()
    call = clock.mark()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=gen_len, do_sample=False,
                   streamer=streamer, **extra)
    marks = streamer.marks  # [prompt, token 1, ..., token n, end]
    return len(marks) - 3, clock.seconds(marks[1], marks[-1]), clock.seconds(call, marks[1])


# ---- the scenarios ------------------------------------------------------------------------

def use_inductor_settings(settings: Optional[dict] = None) -> None:
    """Set torch._inductor.config `settings` (dotted names) for everything this process
    compiles from now on (for good: the process's global config); not those of
    decode.COMPILE_SETTINGS, which decode steps always use (benchmarks/inductor_settings.py
    varies those too)."""
    if not settings:
        return
    import torch._inductor.config as inductor_config
    check_inductor_settings(settings)
    fixed = sorted(set(settings) & set(COMPILE_SETTINGS))
    if fixed:
        raise ValueError(f"--inductor cannot change {', '.join(fixed)}: decode steps "
                         f"always compile with {COMPILE_SETTINGS}; compare such "
                         f"settings with benchmarks/inductor_settings.py")
    inductor_config.load_config(dict(settings))


def main(preset: str = "7b", ckpt_dir: str = None, device: str = None, dtype: str = None,
         prefill_lens="512,4096,16384", batch_sizes="1,32", prompt_len: int = 16,
         gen_len: int = 256, ragged: bool = False, long: bool = False,
         long_len: int = 100_000, long_gen_len: int = 32, peers="hf_eager,hf_static",
         repeats: int = 5, decode_repeats: int = 3, warmup: int = 1,
         bandwidth_gib: float = None, check: bool = False, seed: int = 1,
         configure: dict = None, inductor: dict = None, out: str = "results.json"):
    """Benchmark; see the module docstring. Lists are comma-separated; "none" skips one.
    configure: keyword arguments for `Llama.configure` (how decode steps run), e.g.
    --configure '{"compile": True}' or '{"cuda_graphs": False}' or '{"prefill_chunk": 32768}'.
    inductor: torch._inductor.config settings for everything compiled in this process,
    e.g. --inductor '{"triton.enable_pdl": True}'; not those of decode.COMPILE_SETTINGS,
    which decode steps always use (benchmarks/inductor_settings.py varies those too)."""
    use_inductor_settings(inductor)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dt = torch.float32
    if dtype and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype} is not supported; choose one of {sorted(DTYPES)}")
    dt = DTYPES[dtype] if dtype else dt
    elem = torch.finfo(dt).bits // 8
    sizes = dict(prefill_lens=as_list(prefill_lens), batch_sizes=as_list(batch_sizes),
                 prompt_len=[prompt_len], long_len=[long_len], repeats=[repeats],
                 decode_repeats=[decode_repeats])
    for flag, values in sizes.items():
        if any(v < 1 for v in values):
            raise ValueError(f"--{flag} must be positive, got {values}")
    for flag, value in (("gen_len", gen_len), ("long_gen_len", long_gen_len)):
        if value < 2:  # decode speed is timed from the first token to the last
            raise ValueError(f"--{flag} must be at least 2 (decode speed is timed between "
                             f"the first and the last new token), got {value}")
    peers = [p for p in as_list(peers, str) if p]
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise ValueError(f"unknown peer(s) {sorted(unknown)}; choose from {PEERS} or none")
    clock = Clock(device)
    results = {"config": dict(preset=None if ckpt_dir else preset, ckpt_dir=ckpt_dir,
                              device=str(device), dtype=str(dt).replace("torch.", ""),
                              world_size=WORLD, prompt_len=prompt_len, gen_len=gen_len,
                              repeats=repeats, decode_repeats=decode_repeats, peers=peers,
                              configure=configure, inductor=inductor),
               "env": {"torch": torch.__version__, "python": sys.version.split()[0],
                       "gpu": torch.cuda.get_device_name() if clock.cuda else None},
               "scenarios": {}}
    failures = []

    if check:
        if WORLD > 1:
            say("--check runs in one process only: run benchmarks/check_gpu.py alone")
        else:
            import check_gpu
            results["check"] = check_gpu.run(device=str(device), dtype=str(dt)[6:])
            say(check_gpu.summary(results["check"]))
            if not results["check"]["ok"]:
                failures.append("check")

    gib = bandwidth_gib or (2.0 if clock.cuda else 0.125)
    bandwidth = measure_bandwidth(device, clock, gib)
    clock.reset_peak()
    results["bandwidth_gb_per_s"] = bandwidth / 1e9
    say(f"memory bandwidth: {bandwidth / 1e9:.1f} GB/s (copy of {gib:g} GiB, read + write)")

    # name -> (kind, batch, prompt lengths, gen_len or prefill length)
    plan = [(f"prefill L={n}", "prefill", 1, [n], 0) for n in as_list(prefill_lens)]
    for b in as_list(batch_sizes):
        plan.append((f"decode b={b}", "decode", b, [prompt_len] * b, gen_len))
        if ragged and b > 1:
            plan.append((f"ragged b={b}", "decode", b, ragged_lens(b, prompt_len), gen_len))
    if long:
        plan.append((f"long prefill L={long_len}", "prefill", 1, [long_len], 0))
        plan.append((f"long decode ctx={long_len}", "decode", 1, [long_len], long_gen_len))

    def record(name, who, fn):
        say(f"[{name}] {who} ...")
        try:
            entry = fn()
        except Exception as e:  # report and go on: one failure must not hide the rest
            entry = {"error": f"{type(e).__name__}: {e}"[:800]}
            if RANK0:
                traceback.print_exc()
            if who == "ours":
                failures.append(name)
        scenario = results["scenarios"][name]
        if who == "ours":
            scenario["ours"] = entry
        else:
            scenario["peers"][who] = entry
        clock.reset_peak()
        return entry

    args = None
    for name, kind, batch, lens, new in plan:
        results["scenarios"][name] = {"kind": kind, "batch": batch, "prompt_lens": lens,
                                      "gen_len": new, "peers": {}}
        max_seq_len = max(lens) + new
        reps = min(repeats, 2) if name.startswith("long") else repeats

        def ours():
            nonlocal args
            kw = dict(max_seq_len=max_seq_len, max_batch_size=batch, device=device, dtype=dt)
            gen = (Llama.build(ckpt_dir, seed=seed, **kw) if ckpt_dir
                   else Llama.from_preset(preset, seed=seed, **kw))
            if configure:
                gen.configure(**configure)
            args = gen.model.params
            with torch.inference_mode():
                if kind == "prefill":
                    return ours_prefill(gen, clock, lens[0], reps, warmup)
                prompts = random_prompts(lens, args.vocab_size, seed)
                steps, seconds, extra = timed_decodes(
                    lambda: ours_decode_once(gen, clock, prompts, new), clock,
                    1 if name.startswith("long") else decode_repeats, warmup)
            return {**decode_figures(args, elem, batch, max(lens), steps, seconds, bandwidth,
                                     WORLD), **extra}

        record(name, "ours", ours)

    hf = None
    if peers and args is not None:
        try:
            longest = max(max(lens) + new for _, _, _, lens, new in plan)
            hf = hf_build(args, longest, device, dt)
            results["env"]["transformers"] = sys.modules["transformers"].__version__
        except Exception as e:
            for name in results["scenarios"]:
                for peer in peers:
                    results["scenarios"][name]["peers"][peer] = {
                        "error": f"building the HF model: {type(e).__name__}: {e}"[:800]}
            say(f"HF peers skipped: {type(e).__name__}: {e}")
    for name, kind, batch, lens, new in plan if hf is not None else []:
        reps = min(repeats, 2) if name.startswith("long") else repeats
        for peer in peers:
            if kind == "prefill":
                if peer == "hf_eager":  # prefill is the same eager sdpa forward for both
                    record(name, peer, lambda: hf_prefill(hf, clock, lens[0], reps, warmup))
                continue
            prompts = random_prompts(lens, args.vocab_size, seed)

            def peer_decode():
                steps, seconds, extra = timed_decodes(
                    lambda: hf_decode_once(hf, clock, prompts, new, peer == "hf_static"),
                    clock, 1 if name.startswith("long") else decode_repeats, warmup)
                return {**decode_figures(args, elem, batch, max(lens), steps, seconds,
                                         bandwidth, 1), **extra}

            record(name, peer, peer_decode)
    hf = None
    if peers:
        torch._dynamo.reset()
    clock.reset_peak()
    if WORLD > 1 and peers:
        results["config"]["note"] = f"HF peers run unsharded on 1 device; ours on {WORLD}"

    if RANK0:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))
        print(f"results written to {out}")
        print_table(results)
    if failures:
        say(f"FAILED (ours): {failures}")
        sys.exit(1)


def print_table(results: dict) -> None:
    """One row per figure: ratio > 1 means ours is better (faster or smaller)."""
    rows = [("scenario", "metric", "ours", "best peer", "ratio", "roofline")]

    def fmt(x, unit):
        return "-" if x is None else f"{x:,.1f} {unit}" if x >= 10 else f"{x:.3g} {unit}"

    def add(name, scen, metric, key, unit, higher_better, roofline=False):
        ours = scen.get("ours", {})
        mine = ours.get(key)
        cands = [(v[key], p) for p, v in scen["peers"].items() if v.get(key) is not None]
        best = (max if higher_better else min)(cands) if cands else None
        ratio = "-"
        if best and mine:
            ratio = f"{(mine / best[0]) if higher_better else (best[0] / mine):.2f}x"
        roof = "-"
        if roofline and mine:
            roof = f"{ours['roofline_pct']:.1f}% of {ours['roofline_tokens_per_s']:,.1f} tok/s"
        peer = f"{fmt(best[0], unit)} ({best[1]})" if best else "-"
        if "error" in ours:
            mine, ratio = None, "ours failed"
        elif mine is None and best is None:
            return
        rows.append((name, metric, fmt(mine, unit), peer, ratio, roof))

    for name, scen in results["scenarios"].items():
        if scen["kind"] == "prefill":
            add(name, scen, "latency", "latency_ms", "ms", False)
        else:
            add(name, scen, "decode speed", "tokens_per_s", "tok/s", True, roofline=True)
            add(name, scen, "time to 1st token", "ttft_ms", "ms", False)
        add(name, scen, "peak memory", "peak_mem_gib", "GiB", False)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    print(f"bandwidth {results['bandwidth_gb_per_s']:,.1f} GB/s; ratio > 1: ours better; "
          f"{results['config'].get('note', '')}")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    for name, scen in results["scenarios"].items():
        for who, v in [("ours", scen.get("ours", {}))] + list(scen["peers"].items()):
            if "error" in v:
                print(f"  {name} / {who} failed: {v['error'][:200]}")


if __name__ == "__main__":
    fire.Fire(main)
