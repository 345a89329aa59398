"""Where the GPU time of one prefill and one decode step goes, kernel by kernel (torch
profiler), for a preset with random weights. Prints the kernels with the most CUDA time.

    python benchmarks/profile_step.py kernels --preset 7b --prefill_len 16384 --top 25
    python benchmarks/profile_step.py prefill_compiled --lens 16384 --profile
    python benchmarks/profile_step.py decode_graph --preset 7b --context 512
    torchrun --nproc_per_node 2 benchmarks/profile_step.py decode_graph --preset 13b \
        --symmetric_memory True
    python benchmarks/profile_step.py host_gap --preset 7b --configure '{"compile": True}'

`prefill_compiled` times a prefill forward pass eagerly and compiled with torch.compile
(dynamic shapes, so one compilation serves every prompt length); with --profile it also
lists the compiled pass's kernels. `decode_graph` profiles replays of the decode step as
generation runs it (a CUDA graph, compiled unless --compile False). `host_gap` measures
how much of a generated token's time the GPU spends waiting for the host.
"""

import os
import sys
import time
from pathlib import Path

import fire
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama import Llama  # noqa: E402


def table(fn, top: int, label: str) -> str:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.device_time_total for e in events)
    lines = [f"== {label}: {total / 1000:.2f} ms of kernels"]
    for e in sorted(events, key=lambda e: -e.device_time_total)[:top]:
        lines.append(f"{e.device_time_total / 1000:9.3f} ms {100 * e.device_time_total / total:5.1f}% "
                     f"x{e.count:<5d} {e.key[:110]}")
    return "\n".join(lines)


def main(preset: str = "7b", prefill_len: int = 16384, decode_ctx: int = 512, top: int = 25):
    gen = Llama.from_preset(preset, max_seq_len=max(prefill_len, decode_ctx) + 1,
                            max_batch_size=1, device="cuda")
    model = gen.model
    tokens = torch.randint(0, model.vocab_size, (1, prefill_len), device="cuda")
    one = tokens[:, :1]
    with torch.inference_mode():
        def prefill():
            hidden = model.forward_hidden(tokens, 0, kv_len=prefill_len)
            return model.output(hidden[:, -1])

        def decode():
            hidden = model.forward_hidden(one, decode_ctx - 1, kv_len=decode_ctx)
            return model.output(hidden[:, -1])

        print(table(prefill, top, f"{preset} prefill of {prefill_len} tokens (eager)"))
        print(table(decode, top, f"{preset} eager decode step at context {decode_ctx}"))


def prefill_compiled(preset: str = "7b", lens="16384", repeats: int = 3, profile: bool = False,
                     top: int = 25):
    lens = [int(x) for x in (lens if isinstance(lens, (tuple, list)) else str(lens).split(","))]
    gen = Llama.from_preset(preset, max_seq_len=max(lens) + 1, max_batch_size=1, device="cuda")
    model = gen.model
    compiled = torch.compile(model.forward_hidden, dynamic=True)

    def ms(fn):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - t0) / repeats

    # no_grad rather than inference_mode for the compiled function (pytorch#180823).
    with torch.no_grad():
        for n in lens:
            tokens = torch.randint(0, model.vocab_size, (1, n), device="cuda")
            eager = ms(lambda: model.forward_hidden(tokens, 0, kv_len=n))
            t0 = time.perf_counter()
            compiled(tokens, 0, kv_len=n)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            fast = ms(lambda: compiled(tokens, 0, kv_len=n))
            diff = (compiled(tokens, 0, kv_len=n).float()
                    - model.forward_hidden(tokens, 0, kv_len=n).float()).abs().max().item()
            print(f"{preset} prefill {n}: eager {eager:.1f} ms, compiled {fast:.1f} ms "
                  f"(first call {first:.1f} s), max |hidden diff| {diff:.3g}", flush=True)
            if profile:
                print(table(lambda: compiled(tokens, 0, kv_len=n), top,
                            f"{preset} compiled prefill of {n} tokens"), flush=True)


def decode_graph(preset: str = "7b", context: int = 512, compile: bool = True,
                 symmetric_memory: bool = False, replays: int = 10, top: int = 30):
    gen = Llama.from_preset(preset, max_seq_len=context + 1, max_batch_size=1, device="cuda")
    gen.configure(compile=compile, symmetric_memory=symmetric_memory)
    tokens = torch.zeros(1, dtype=torch.long, device="cuda")
    positions = torch.full((1,), context - 1, dtype=torch.long, device="cuda")

    def steps():
        for _ in range(replays):
            gen.graphed(tokens, positions, context, 0.0, 1.0)

    result = table(steps, top, f"{preset} decode step at context {context} ({replays} "
                               f"replays, {'compiled' if compile else 'eager'} graph, "
                               f"symmetric_memory={symmetric_memory})")
    # Under torchrun every rank profiles its own GPU; the tables come in rank order, since
    # the ranks differ in where they wait for each other.
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    for r in range(world):
        if r == rank:
            print(f"-- rank {rank}\n{result}" if world > 1 else result, flush=True)
        if world > 1:
            torch.distributed.barrier()


def host_gap(preset: str = "7b", configure: dict = None, gen_len: int = 128,
             repeats: int = 3, device: str = "cuda"):
    """How long the GPU waits for the host per generated token: time per token yielded by
    Llama.decode_steps with launch_ahead on and off, against the same decode step replayed
    back to back at a fixed position with no host work in between (the GPU never waits).
    `configure`: Llama.configure options, e.g. {"compile": True, "symmetric_memory": True}.
    Prints ms per token (rank 0 under torchrun) and returns, per repeat, the host's share
    per token (ms) with and without launching ahead."""
    gen = Llama.from_preset(preset, max_seq_len=gen_len + 32, max_batch_size=1,
                            device=device)
    gen.configure(**(configure or {}))
    prompt = [list(range(1, 17))]
    sync = torch.cuda.synchronize if gen.model.rope.is_cuda else (lambda: None)
    tokens = torch.zeros(1, dtype=torch.long, device=device)
    middle = 16 + gen_len // 2
    positions = torch.full((1,), middle, dtype=torch.long, device=device)

    def yielded(ahead: bool) -> float:
        gen.configure(launch_ahead=ahead)
        marks = [time.perf_counter() for _ in gen.decode_steps(prompt, gen_len, 0.0, 1.0,
                                                                set())]
        return (marks[-1] - marks[1]) / (len(marks) - 2)  # from the first step on

    def back_to_back() -> float:
        sync()
        start = time.perf_counter()
        for _ in range(gen_len):
            if gen.graphed is not None:  # straight from the graph: no host copies at all
                gen.graphed(tokens, positions, middle + 1, 0.0, 1.0)
            else:
                gen.step(tokens, [middle], 0.0, 1.0)
        sync()
        return (time.perf_counter() - start) / gen_len

    for _ in gen.decode_steps(prompt, 8, 0.0, 1.0, set()):  # graph capture, compilation
        pass
    back_to_back()
    gaps = []
    for _ in range(repeats):
        ahead, one_at_a_time, tight = yielded(True), yielded(False), back_to_back()
        gaps.append((1000 * (ahead - tight), 1000 * (one_at_a_time - tight)))
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"{preset}: ms per token yielded, launching ahead {1000 * ahead:.3f}, one "
                  f"step at a time {1000 * one_at_a_time:.3f}; steps back to back "
                  f"{1000 * tight:.3f} ms", flush=True)
    return gaps


if __name__ == "__main__":
    fire.Fire({"kernels": main, "prefill_compiled": prefill_compiled,
               "decode_graph": decode_graph, "host_gap": host_gap})
