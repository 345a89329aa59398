"""Batch-1 decode speed at MP=1 against MP=N on one machine: several processes of each,
alternated (MP=1, MP=N, MP=N, MP=1, ...) so that a drift of the machine's speed during
the runs falls on both. Each run is one process (or one torchrun) of benchmarks.bench;
the speed of a process varies by a few percent between processes on the same GPUs
(docs/performance.md), so one pair says little. Prints every run, the medians, their
ratio and the ratio of each neighbouring MP=1/MP=N pair; `--out` also records the GPUs'
clocks, temperatures and power before each run (from nvidia-smi, where there is one).

The MP=1 runs take the GPUs of the MP=N runs in turn (`--no-mp1_on_each_gpu`: always the
first): an MP=N step waits for the slowest of its GPUs, so comparing it with the first
GPU alone would credit or blame MP=N for a difference between the GPUs. With two GPUs the
MP=1 runs of rounds 1, 2, 3, 4, ... use GPUs 0, 1, 1, 0, ..., so that over four rounds
each GPU runs as often before as after an MP=N run. From the checkout's root:

    python -m benchmarks.compare_mp --preset 13b --nproc 2 --rounds 3 --out mp.json
    python -m benchmarks.compare_mp --preset tiny --device cpu --nproc 2 --rounds 1 \\
        --decode eager --no-symmetric_memory
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

from benchmarks import common

ROOT = Path(__file__).resolve().parent.parent
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


def bench_command(world: int, args: List[str]) -> List[str]:
    """benchmarks.bench as a module: alone for world 1, else under torchrun."""
    if world == 1:
        return [sys.executable, "-m", "benchmarks.bench", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
            "-m", "benchmarks.bench", *args]


def run_bench(world: int, args: List[str], device: Optional[str], timeout: int,
              gpu: int = 0) -> float:
    """One bench process (torchrun for world > 1); its decode tokens/s. MP=1 runs on the
    gpu-th of the GPUs MP=N uses."""
    env = dict(os.environ)
    if world == 1 and device != "cpu":
        env["CUDA_VISIBLE_DEVICES"] = nth_gpu(env.get("CUDA_VISIBLE_DEVICES", ""), gpu)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        done = subprocess.run(bench_command(world, [*args, "--out", str(out)]), env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"MP={world} bench failed ({done.returncode}):\n"
                               f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        ours = json.loads(out.read_text())["scenarios"][SCENARIO]["ours"]
    if "tokens_per_s" not in ours:
        raise RuntimeError(f"MP={world} bench gave no decode speed: {ours}")
    return ours["tokens_per_s"]


def bench_args(opts: argparse.Namespace, world: int) -> List[str]:
    """The bench arguments of one run: batch-1 decode only, no peers."""
    args = ["--preset", opts.preset, "--prefill_lens", "none", "--batch_sizes", "1",
            "--gen_len", str(opts.gen_len), "--peers", "none", "--repeats", "1",
            "--decode_repeats", str(opts.decode_repeats), "--decode", opts.decode]
    args += ["--device", opts.device] if opts.device else []
    args += ["--dtype", opts.dtype] if opts.dtype else []
    args += ["--symmetric_memory"] if world > 1 and opts.symmetric_memory else []
    return args


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare_mp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="13b", help="(default: %(default)s)")
    p.add_argument("--nproc", type=common.positive_int, default=2,
                   help="N, the processes of the MP=N runs (at least 2; default: %(default)s)")
    p.add_argument("--rounds", type=common.positive_int, default=3,
                   help="MP=1/MP=N pairs, in the order (1, N), (N, 1), (1, N), ... "
                        "(default: %(default)s)")
    p.add_argument("--gen_len", type=common.positive_int, default=128,
                   help="(default: %(default)s)")
    p.add_argument("--decode_repeats", type=common.positive_int, default=3,
                   help="(default: %(default)s)")
    p.add_argument("--device", help="default: bench's (cuda if available)")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), help="default: bench's")
    p.add_argument("--decode", choices=common.DECODE_MODES, default="compiled",
                   help="decode steps of both (default: %(default)s)")
    p.add_argument("--symmetric_memory", action=argparse.BooleanOptionalAction, default=True,
                   help="MP=N sums over ranks with the fused kernel (default: on)")
    p.add_argument("--mp1_on_each_gpu", action=argparse.BooleanOptionalAction, default=True,
                   help="MP=1 runs take the N GPUs in turn (default: on)")
    p.add_argument("--timeout", type=common.positive_int, default=600,
                   help="seconds per run (default: %(default)s)")
    p.add_argument("--out", help="write every run and the summary as JSON to this file")
    return p


def main(argv: Optional[List[str]] = None) -> dict:
    p = parser()
    opts = p.parse_args(argv)
    if opts.nproc < 2:
        p.error(f"--nproc must be at least 2, got {opts.nproc}")
    log = []
    for r in range(opts.rounds):
        for world in ((1, opts.nproc) if r % 2 == 0 else (opts.nproc, 1)):
            state = gpu_state()
            gpu = (r + r // 2) % opts.nproc if world == 1 and opts.mp1_on_each_gpu else 0
            speed = run_bench(world, bench_args(opts, world), opts.device, opts.timeout, gpu)
            log.append({"world": world, "tokens_per_s": speed, "gpus_before": state,
                        **({"gpu": gpu} if world == 1 else {})})
            print(f"MP={world}{f' on GPU {gpu}' if world == 1 else ''}: {speed:.1f} tok/s",
                  flush=True)
    summary = summarize([(run["world"], run["tokens_per_s"]) for run in log])
    by_gpu = {gpu: statistics.median(run["tokens_per_s"] for run in log
                                     if run["world"] == 1 and run["gpu"] == gpu)
              for gpu in sorted({run["gpu"] for run in log if run["world"] == 1})}
    medians = summary["medians"]
    print(f"medians: MP=1 {medians[1]:.1f} ("
          + ", ".join(f"GPU {gpu} {speed:.1f}" for gpu, speed in by_gpu.items())
          + f"), MP={opts.nproc} {medians[opts.nproc]:.1f} tok/s; ratio "
          f"{summary['ratio_of_medians']:.3f}x; neighbouring pairs "
          + ", ".join(f"{p:.3f}" for p in summary["pair_ratios"]), flush=True)
    results = {"preset": opts.preset, "nproc": opts.nproc, "runs": log, **summary,
               "mp1_median_by_gpu": by_gpu}
    common.write_json(opts.out, results)
    return results


if __name__ == "__main__":
    main()
