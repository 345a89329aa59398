"""Batch-1 decode speed at MP=1 against MP=N on one machine, measured as issue #6 asks:
side by side, several processes of each, alternated (MP=1, MP=N, MP=N, MP=1, ...) so that
a drift of the machine's speed during the runs falls on both. Each run is one process (or
one torchrun) of bench.py; the speed of a process varies by several percent between
processes on the same GPUs (benchmarks/RESULTS.md, sixth session), so one pair says little.
Prints every run, the medians, their ratio and the ratio of each neighbouring MP=1/MP=N
pair; writes them to --out with the GPUs' clocks, temperatures and power before each run
(from nvidia-smi, where there is one).

The MP=1 runs take the GPUs of the MP=N runs in turn (`--mp1_on_each_gpu False`: always
the first): an MP=N step waits for the slowest of its GPUs, so comparing it with the first
GPU alone would credit or blame MP=N for a difference between the GPUs. With two GPUs the
MP=1 runs of rounds 1, 2, 3, 4, ... use GPUs 0, 1, 1, 0, ..., so that over four rounds
each GPU runs as often before as after an MP=N run. The MP=1 median of each GPU is printed.

    python benchmarks/compare_mp.py --preset 13b --nproc 2 --rounds 3
    python benchmarks/compare_mp.py --preset tiny --device cpu --nproc 2 --rounds 1 \\
        --mp1_configure '{}' --mp_configure '{}'
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import fire

BENCH = Path(__file__).resolve().parent / "bench.py"
SCENARIO = "decode b=1"


def gpu_state() -> str:
    """nvidia-smi's view of every GPU (clocks, temperature, power), or "" without it."""
    if shutil.which("nvidia-smi") is None:
        return ""
    query = "index,clocks.sm,clocks.mem,temperature.gpu,power.draw"
    done = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                          capture_output=True, text=True)
    return done.stdout.strip()


def summarize(runs):
    """runs: [(world size, tokens/s), ...] in the order run, two world sizes. Returns the
    median per world size, the ratio of the larger's median to the smaller's, and the
    ratio of every two neighbouring runs of different world sizes (larger over smaller)."""
    sizes = sorted({world for world, _ in runs})
    if len(sizes) != 2:
        raise ValueError(f"need runs of two world sizes, got {sizes}")
    small, large = sizes
    medians = {world: statistics.median(s for w, s in runs if w == world) for world in sizes}
    pairs = []
    for (w1, s1), (w2, s2) in zip(runs, runs[1:]):
        if w1 != w2:
            pairs.append((s1 if w1 == large else s2) / (s2 if w1 == large else s1))
    return {"medians": medians, "ratio_of_medians": medians[large] / medians[small],
            "pair_ratios": pairs}


def nth_gpu(visible: str, n: int) -> str:
    """The n-th GPU that MP=N runs use, as CUDA_VISIBLE_DEVICES names it (`visible`: that
    variable's value, "" when unset: GPUs 0, 1, ...)."""
    names = [name.strip() for name in visible.split(",")] if visible else []
    if not names:
        return str(n)
    if n >= len(names):
        raise ValueError(f"GPU {n} of CUDA_VISIBLE_DEVICES={visible!r} does not exist")
    return names[n]


def run_bench(world: int, common: list, configure: dict, device: str, timeout: int,
              gpu: int = 0):
    """One bench.py process (torchrun for world > 1); its decode tokens/s. MP=1 runs on
    the gpu-th of the GPUs MP=N uses."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        # repr: fire reads Python literals (True, not JSON's true)
        args = [*common, "--configure", repr(configure), "--out", str(out)]
        env = dict(os.environ)
        if world == 1:
            command = [sys.executable, str(BENCH), *args]
            if device != "cpu":
                env["CUDA_VISIBLE_DEVICES"] = nth_gpu(env.get("CUDA_VISIBLE_DEVICES", ""), gpu)
        else:
            command = [sys.executable, "-m", "torch.distributed.run",
                       f"--nproc_per_node={world}", str(BENCH), *args]
        done = subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"MP={world} bench failed ({done.returncode}):\n"
                               f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        ours = json.loads(out.read_text())["scenarios"][SCENARIO]["ours"]
        if "tokens_per_s" not in ours:
            raise RuntimeError(f"MP={world} bench gave no decode speed: {ours}")
        return ours["tokens_per_s"]


def main(preset: str = "13b", nproc: int = 2, rounds: int = 3, gen_len: int = 128,
         decode_repeats: int = 3, device: str = None, dtype: str = None,
         mp1_configure: dict = None, mp_configure: dict = None, inductor: dict = None,
         mp1_on_each_gpu: bool = True, timeout: int = 600, out: str = "compare_mp.json"):
    """rounds: MP=1/MP=N pairs, in the order (1, N), (N, 1), (1, N), ...
    mp1_configure / mp_configure: Llama.configure settings of the two (default: compiled;
    MP=N also with symmetric_memory). inductor: torch._inductor.config settings for both
    (bench.py --inductor). mp1_on_each_gpu: MP=1 runs take the N GPUs in turn (else the
    first only). timeout: seconds per run."""
    if nproc < 2 or rounds < 1:
        raise ValueError(f"--nproc must be at least 2 and --rounds at least 1, "
                         f"got {nproc} and {rounds}")
    mp1_configure = {"compile": True} if mp1_configure is None else mp1_configure
    if mp_configure is None:
        mp_configure = {"compile": True, "symmetric_memory": True}
    common = ["--preset", preset, "--prefill_lens", "none", "--batch_sizes", "1",
              "--gen_len", str(gen_len), "--peers", "none", "--repeats", "1",
              "--decode_repeats", str(decode_repeats)]
    common += ["--device", device] if device else []
    common += ["--dtype", dtype] if dtype else []
    common += ["--inductor", repr(inductor)] if inductor else []
    log = []
    for r in range(rounds):
        for world in ((1, nproc) if r % 2 == 0 else (nproc, 1)):
            state = gpu_state()
            mp1 = world == 1
            gpu = (r + r // 2) % nproc if mp1 and mp1_on_each_gpu else 0
            speed = run_bench(world, common, mp1_configure if mp1 else mp_configure, device,
                              timeout, gpu)
            log.append({"world": world, "tokens_per_s": speed, "gpus_before": state,
                        **({"gpu": gpu} if mp1 else {})})
            print(f"MP={world}{f' on GPU {gpu}' if mp1 else ''}: {speed:.1f} tok/s", flush=True)
    summary = summarize([(run["world"], run["tokens_per_s"]) for run in log])
    by_gpu = {gpu: statistics.median(run["tokens_per_s"] for run in log
                                     if run["world"] == 1 and run["gpu"] == gpu)
              for gpu in sorted({run["gpu"] for run in log if run["world"] == 1})}
    medians = summary["medians"]
    print(f"medians: MP=1 {medians[1]:.1f} ("
          + ", ".join(f"GPU {gpu} {speed:.1f}" for gpu, speed in by_gpu.items())
          + f"), MP={nproc} {medians[nproc]:.1f} tok/s; ratio "
          f"{summary['ratio_of_medians']:.3f}x; neighbouring pairs "
          + ", ".join(f"{p:.3f}" for p in summary["pair_ratios"]), flush=True)
    Path(out).write_text(json.dumps({"preset": preset, "nproc": nproc, "runs": log,
                                     **summary, "mp1_median_by_gpu": by_gpu}, indent=1))


if __name__ == "__main__":
    fire.Fire(main)
