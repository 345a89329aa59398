"""The runs of the speed benchmark (bench.py, its command line, which imports this
module once its arguments are read): ours and the Hugging Face peers, the figures of each
scenario, and the table they make."""

import argparse
import collections
import hashlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import List, NamedTuple, Optional

import torch

from benchmarks import common, speculation
from benchmarks.common import GiB, say
from benchmarks.timing import Timer
from llama import Llama
from llama import distributed, memory, quantize
from llama.hf import hf_config
from llama.prompts import completion_prompt_tokens
from llama.sampling import Sampling
from llama.tokenizer import Tokenizer

WORLD = int(os.environ.get("WORLD_SIZE", 1))


class Scenario(NamedTuple):
    name: str
    kind: str  # "prefill" or "decode"
    batch: int
    prompt_lens: List[int]
    new: int  # tokens to generate (decode) or 0 (prefill)
    text: Optional[str] = None  # the prompt's text (code edit), else random tokens

    @property
    def long(self) -> bool:
        return self.name.startswith("long")


def plan(opts: argparse.Namespace) -> List[Scenario]:
    scenarios = [Scenario(f"prefill L={n}", "prefill", 1, [n], 0) for n in opts.prefill_lens]
    for b in opts.batch_sizes:
        scenarios.append(Scenario(f"decode b={b}", "decode", b, [opts.prompt_len] * b,
                                  opts.gen_len))
        if opts.ragged and b > 1:
            scenarios.append(Scenario(f"ragged b={b}", "decode", b,
                                      ragged_lens(b, opts.prompt_len), opts.gen_len))
    if opts.long:
        scenarios.append(Scenario(f"long prefill L={opts.long_len}", "prefill", 1,
                                  [opts.long_len], 0))
        scenarios.append(Scenario(f"long decode ctx={opts.long_len}", "decode", 1,
                                  [opts.long_len], opts.long_gen_len))
    if opts.edit_file:
        text = speculation.edit_prompt(opts.edit_file)
        tokenizer = Tokenizer(str(Path(opts.ckpt_dir) / "tokenizer.model"))
        length = len(completion_prompt_tokens(tokenizer, text))
        scenarios.append(Scenario(f"code edit {Path(opts.edit_file).name}", "decode", 1,
                                  [length], opts.gen_len, text))
    return scenarios


def ragged_lens(batch: int, prompt_len: int) -> List[int]:
    """Prompt lengths spread evenly from prompt_len/2 to 2*prompt_len."""
    lo, hi = max(1, prompt_len // 2), 2 * prompt_len
    return [lo + (hi - lo) * i // max(1, batch - 1) for i in range(batch)]


def random_prompts(lens, vocab: int, seed: int) -> List[List[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def measure_bandwidth(device, timer: Timer, gib: float, repeats: int = 10) -> float:
    """Bytes/s of a large device-to-device copy, counting the bytes read and written."""
    n = int(gib * GiB)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    seconds = timer.median(lambda: dst.copy_(src), repeats, warmup=2)
    return 2 * n / seconds


def decode_figures(args, elem: int, batch: int, context: int, steps: int, seconds: float,
                   bandwidth: float, world: int, quantize: Optional[str] = None) -> dict:
    """tokens/s, and the bandwidth roofline of one step: this rank's weights (all but the
    input embedding table) plus the KV cache read, at the mean context of the timed steps
    (step k reads context + k positions of every row). `world`: GPUs sharing the model;
    `quantize`: the linear layers' format."""
    weight_bytes = (memory.weight_bytes(args, elem, quantize)
                    - args.vocab_size * args.dim * elem) / world
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


def timed_decodes(run_once, timer: Timer, repeats: int, warmup: int):
    """The median run of `run_once() -> (steps, decode s, ttft s[, fingerprint])` by time
    per step: (steps, seconds, extra figures with the peak memory)."""
    timer.reset_peak()
    for _ in range(warmup):
        run_once()
    runs = sorted((run_once() for _ in range(max(1, repeats))), key=lambda r: r[1] / r[0])
    steps, seconds, ttft = runs[len(runs) // 2][:3]
    if steps < 1:
        raise RuntimeError("fewer than two tokens were generated; raise gen_len")
    extra = {"ttft_ms": 1000 * ttft, "peak_mem_gib": timer.peak_gib(),
             "runs_ms_per_step": [1000 * r[1] / r[0] for r in runs]}
    if len(runs[0]) > 3:
        extra["tokens_fingerprint"] = sorted({r[3] for r in runs})
    return steps, seconds, extra


def prefill_figures(seconds: float, length: int, timer: Timer) -> dict:
    return {"latency_ms": 1000 * seconds, "tokens_per_s": length / seconds,
            "peak_mem_gib": timer.peak_gib()}


# ---- ours ----------------------------------------------------------------------------

def build_kw(opts, scenario: Scenario, device, dtype) -> dict:
    return dict(max_seq_len=max(scenario.prompt_lens) + scenario.new,
                max_batch_size=scenario.batch, device=device, dtype=dtype, seed=opts.seed,
                quantize=opts.quantize)


def build_ours(opts, scenario: Scenario, device, dtype) -> Llama:
    kw = build_kw(opts, scenario, device, dtype)
    gen = (Llama.build(opts.ckpt_dir, **kw) if opts.ckpt_dir
           else Llama.from_preset(opts.preset, **kw))
    gen.configure(**common.configure_kwargs(opts.decode, opts.prefill_chunk,
                                            opts.symmetric_memory))
    return gen


def ours_prefill(gen: Llama, timer: Timer, length: int, repeats: int, warmup: int) -> dict:
    prompt = random_prompts([length], gen.model.vocab_size, length)
    timer.reset_peak()
    seconds = timer.median(lambda: gen.engine.prefill(prompt, Sampling(0.0, 1.0), None), repeats, warmup)
    return prefill_figures(seconds, length, timer)


def ours_decode_once(gen: Llama, timer: Timer, prompts, sampling: Sampling):
    """One generation: (tokens per row after the first, their seconds, seconds to
    the first token, a fingerprint of the tokens made, to compare runs' outputs). Rows
    are counted, not steps: with a draft, rows take their tokens in different steps."""
    call = timer.mark()
    first = None
    made = [[] for _ in prompts]
    for step in gen.engine.generate(prompts, sampling):
        if first is None:
            first = timer.mark()
        for row, new in zip(made, step):
            if new is not None:
                row.append(new[0])
    end = timer.mark()
    fingerprint = hashlib.sha1(json.dumps(made).encode()).hexdigest()[:12]
    return (max(map(len, made)) - 1, timer.seconds(first, end), timer.seconds(call, first),
            fingerprint)


def kernels_used(model) -> dict:
    """{matrix-product kernel: number of layers} of a quantized model (quant_kernels.py
    picks them per device and layer), so a run records which kernels it timed."""
    return dict(collections.Counter(layer.kernel
                                    for layer in quantize.quantized_layers(model).values()))


def run_ours(opts, s: Scenario, device, dtype, timer: Timer, bandwidth: float):
    """The scenario's figures and the model's ModelArgs (for the peers' shapes)."""
    gen = build_ours(opts, s, device, dtype)
    args = gen.model.params
    repeats = min(opts.repeats, 2) if s.long else opts.repeats
    kernels = {"quant_kernels": kernels_used(gen.model)} if opts.quantize else {}
    with torch.inference_mode():
        if s.kind == "prefill":
            figures = ours_prefill(gen, timer, s.prompt_lens[0], repeats, opts.warmup)
            return {**figures, **kernels}, args
        prompts = ([completion_prompt_tokens(gen.tokenizer, s.text)] if s.text
                   else random_prompts(s.prompt_lens, args.vocab_size, opts.seed))

        def timed():
            sampling = Sampling(opts.temperature, opts.top_p, s.new)
            return timed_decodes(lambda: ours_decode_once(gen, timer, prompts, sampling),
                                 timer, 1 if s.long else opts.decode_repeats, opts.warmup)
        steps, seconds, extra = timed()
        elem = torch.finfo(dtype).bits // 8
        figures = {**decode_figures(args, elem, s.batch, max(s.prompt_lens), steps, seconds,
                                    bandwidth, WORLD, opts.quantize), **extra, **kernels}
        modes = common.configure_kwargs(opts.decode, opts.prefill_chunk,
                                        opts.symmetric_memory)
        draft = (speculation.make_draft(opts.draft, modes, **build_kw(opts, s, device, dtype))
                 if opts.draft else None)
        if draft is not None:
            figures["draft"] = speculation.drafted(gen, draft, opts.draft_tokens, s.batch,
                                                   timed, figures)
        if opts.verify_widths:
            figures["step_costs"] = speculation.step_costs(
                gen, timer, opts.verify_widths, s.batch, max(s.prompt_lens), opts.repeats,
                draft)
    return figures, args


# ---- Hugging Face peers --------------------------------------------------------------

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


def hf_prefill(model, timer: Timer, length: int, repeats: int, warmup: int) -> dict:
    ids = torch.tensor(random_prompts([length], model.config.vocab_size, length),
                       device=model.device)

    def once():
        with torch.no_grad():
            return model(input_ids=ids, use_cache=True, logits_to_keep=1).logits

    timer.reset_peak()
    return prefill_figures(timer.median(once, repeats, warmup), length, timer)


def hf_decode_once(model, timer: Timer, prompts, gen_len: int, static: bool):
    from transformers.generation.streamers import BaseStreamer

    class Marks(BaseStreamer):  # put(): the prompt, then each new token of every row
        def __init__(self):
            self.marks = []

        def put(self, value):
            self.marks.append(timer.mark(sync=False))

        def end(self):
            self.marks.append(timer.mark())

    width = max(len(p) for p in prompts)  # left padding, HF's convention for generation
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                        device=model.device)
    extra = {"cache_implementation": "static"} if static else {}
    streamer = Marks()
    call = timer.mark()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=gen_len, do_sample=False,
                   streamer=streamer, **extra)
    marks = streamer.marks  # [prompt, token 1, ..., token n, end]
    return len(marks) - 3, timer.seconds(marks[1], marks[-1]), timer.seconds(call, marks[1])


def run_peer(opts, peer: str, model, s: Scenario, args, dtype, timer: Timer,
             bandwidth: float) -> dict:
    repeats = min(opts.repeats, 2) if s.long else opts.repeats
    if s.kind == "prefill":
        return hf_prefill(model, timer, s.prompt_lens[0], repeats, opts.warmup)
    prompts = random_prompts(s.prompt_lens, args.vocab_size, opts.seed)
    steps, seconds, extra = timed_decodes(
        lambda: hf_decode_once(model, timer, prompts, s.new, peer == "hf_static"),
        timer, 1 if s.long else opts.decode_repeats, opts.warmup)
    elem = torch.finfo(dtype).bits // 8
    return {**decode_figures(args, elem, s.batch, max(s.prompt_lens), steps, seconds,
                             bandwidth, 1), **extra}


def peers_of(s: Scenario, peers: List[str]) -> List[str]:
    """Prefill is the same eager SDPA forward for both peers: run it once. The peers
    decode random prompts only."""
    if s.text is not None:
        return []
    return [p for p in peers if p == "hf_eager"] if s.kind == "prefill" else peers


# ---- the run -------------------------------------------------------------------------

def attempt(fn) -> dict:
    """fn()'s figures, or {"error": ...}: one failure must not hide the other figures."""
    try:
        return fn()
    except Exception as e:
        if common.is_rank0():
            traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[:800]}


def run_peers(opts, scenarios: List[Scenario], results: dict, args, device, dtype,
              timer: Timer, bandwidth: float) -> None:
    longest = max(max(s.prompt_lens) + s.new for s in scenarios)
    try:
        model = hf_build(args, longest, device, dtype)
        results["env"]["transformers"] = sys.modules["transformers"].__version__
    except Exception as e:
        say(f"HF peers skipped: {type(e).__name__}: {e}")
        for s in scenarios:
            for peer in peers_of(s, opts.peers):
                results["scenarios"][s.name]["peers"][peer] = {
                    "error": f"building the HF model: {type(e).__name__}: {e}"[:800]}
        return
    for s in scenarios:
        for peer in peers_of(s, opts.peers):
            say(f"[{s.name}] {peer} ...")
            results["scenarios"][s.name]["peers"][peer] = attempt(
                lambda: run_peer(opts, peer, model, s, args, dtype, timer, bandwidth))
            timer.reset_peak()


def new_results(opts, device, dtype, timer: Timer, scenarios: List[Scenario]) -> dict:
    """The results' frame: the configuration, the software and GPU, empty scenarios."""
    return {"config": dict(preset=None if opts.ckpt_dir else opts.preset,
                           ckpt_dir=opts.ckpt_dir, device=str(device),
                           dtype=str(dtype).replace("torch.", ""), world_size=WORLD,
                           prompt_len=opts.prompt_len, gen_len=opts.gen_len,
                           repeats=opts.repeats, decode_repeats=opts.decode_repeats,
                           peers=opts.peers, quantize=opts.quantize,
                           configure=common.configure_kwargs(
                               opts.decode, opts.prefill_chunk, opts.symmetric_memory)),
            "env": {"torch": torch.__version__, "python": sys.version.split()[0],
                    "gpu": torch.cuda.get_device_name() if timer.cuda else None},
            "scenarios": {s.name: {"kind": s.kind, "batch": s.batch,
                                   "prompt_lens": s.prompt_lens, "gen_len": s.new,
                                   "peers": {}} for s in scenarios}}


def run(opts: argparse.Namespace) -> dict:
    """Run the benchmark of bench.py's options; returns the results (also printed, and
    written to --out). Exits with status 1 if one of our scenarios failed."""
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(distributed.local_rank())
    dtype = common.dtype_for(opts.dtype, device)
    timer = Timer(device)
    scenarios = plan(opts)
    results = new_results(opts, device, dtype, timer, scenarios)
    gib = opts.bandwidth_gib or (2.0 if timer.cuda else 0.125)
    bandwidth = measure_bandwidth(device, timer, gib)
    timer.reset_peak()
    results["bandwidth_gb_per_s"] = bandwidth / 1e9
    say(f"memory bandwidth: {bandwidth / 1e9:.1f} GB/s (copy of {gib:g} GiB, read + write)")

    args, failures = None, []
    for s in scenarios:
        say(f"[{s.name}] ours ...")

        def ours():
            nonlocal args
            figures, args = run_ours(opts, s, device, dtype, timer, bandwidth)
            return figures

        results["scenarios"][s.name]["ours"] = entry = attempt(ours)
        if "error" in entry:
            failures.append(s.name)
        timer.reset_peak()
    if opts.peers and args is not None:
        run_peers(opts, scenarios, results, args, device, dtype, timer, bandwidth)
        torch._dynamo.reset()  # the static-cache peer compiled; free its code and graphs
        timer.reset_peak()
        if WORLD > 1:
            results["config"]["note"] = f"HF peers run unsharded on 1 device; ours on {WORLD}"

    common.write_json(opts.out, results)
    if common.is_rank0():
        print_table(results)
    if failures:
        say(f"FAILED (ours): {failures}")
        sys.exit(1)
    return results


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
            draft = scen.get("ours", {}).get("draft")
            if draft:
                rows.append((name, "with draft", fmt(draft["tokens_per_s"], "tok/s"), "-",
                             f"{draft['speedup']:.2f}x plain",
                             f"accepted {100 * draft['acceptance']:.0f}%, "
                             f"same tokens: {draft['same_tokens']}"))
        add(name, scen, "peak memory", "peak_mem_gib", "GiB", False)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    print(f"bandwidth {results['bandwidth_gb_per_s']:,.1f} GB/s; ratio > 1: ours better; "
          f"{results['config'].get('note', '')}")
    kernels = next((s["ours"]["quant_kernels"] for s in results["scenarios"].values()
                    if "quant_kernels" in s.get("ours", {})), None)
    if kernels:
        print("quantized layers: " + ", ".join(f"{n} on {k}" for k, n in kernels.items()))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    for name, scen in results["scenarios"].items():
        for who, v in [("ours", scen.get("ours", {}))] + list(scen["peers"].items()):
            if "error" in v:
                print(f"  {name} / {who} failed: {v['error'][:200]}")

