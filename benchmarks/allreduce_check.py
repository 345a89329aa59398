"""The fused sum over ranks (llama/allreduce.py) on real GPUs, under torchrun: its results
against the unfused path (an NCCL all-reduce, the residual add, the RMSNorm), then the
time per call of `calls` calls in a row (80: a 13B decode step's worth) replayed from a
CUDA graph, for the fused kernel, the unfused path, and PyTorch's one-shot all-reduce
over symmetric memory followed by the add and the norm (what inductor's
`_collective.auto_select` made of the unfused path).

    torchrun --nproc_per_node 2 benchmarks/allreduce_check.py --dim 5120 --rows 1,4,32

Rank 0 prints one line per case and writes --out (JSON).
"""

import json
import os
import sys
import time
from pathlib import Path

import fire
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import DTYPES, as_list  # noqa: E402
from llama import distributed  # noqa: E402
from llama.allreduce import PeerBuffers  # noqa: E402
from llama.model import RMSNorm, add_summed  # noqa: E402


def graph_time(fn, calls: int, replays: int) -> float:
    """Microseconds per call of fn, run `calls` times in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - start) / (replays * calls)


def main(dim: int = 5120, rows="1,4,32", dtypes="bfloat16,float32", calls: int = 80,
         replays: int = 50, rounds: int = 200, out: str = "allreduce_check.json"):
    if calls % 2 or rounds % 2:
        # Fused calls alternate slots (allreduce.py), also from one graph replay or check
        # to the next.
        raise ValueError(f"--calls and --rounds must be even, got {calls} and {rounds}")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    distributed.initialize(None, device)
    group = distributed.symmetric_memory_group()
    if group is None:
        raise SystemExit("needs torchrun with 2+ CUDA processes and symmetric memory")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = as_list(rows, int)
    last_slot = [1]

    def next_slot() -> int:
        """Every fused call of the run takes the other slot than the one before, as a
        layer's two calls do (a graph of an even number of calls keeps the rhythm)."""
        last_slot[0] ^= 1
        return last_slot[0]

    results = []
    for name in as_list(dtypes, str):
        dtype = DTYPES[name]
        peers = PeerBuffers.allocate(group, max(rows), dim, dtype, device)
        norm = RMSNorm(dim, eps=1e-5).to(device=device, dtype=dtype)
        one_shot_buffer = None  # PyTorch's kernel needs its input in symmetric memory
        if hasattr(torch.ops, "symm_mem") and hasattr(torch.ops.symm_mem,
                                                      "one_shot_all_reduce"):
            from torch.distributed import _symmetric_memory as symm_mem

            one_shot_buffer = symm_mem.empty(max(rows) * dim, dtype=dtype, device=device)
            symm_mem.rendezvous(one_shot_buffer, group)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(dim, generator=torch.Generator().manual_seed(7)) + 0.5)
        for n in rows:
            gen = torch.Generator(device=device).manual_seed(1000 + rank)  # partials differ
            shared = torch.Generator(device=device).manual_seed(99)  # residuals are equal
            partial = torch.randn(n, 1, dim, device=device, dtype=dtype, generator=gen)
            residual = torch.randn(n, 1, dim, device=device, dtype=dtype, generator=shared)
            with torch.no_grad():
                h_ref, normed_ref = add_summed(partial, residual, norm)
                # Fused calls back to back (no host sync or NCCL call between them), with
                # changing data and row counts, and each rank in turn held back now and
                # then: a handshake that let a rank read a stale or half-written entry
                # would show up against the unfused path, computed afterwards.
                inputs = [(partial[:1 + i % n] * (1 + i % 7), residual[:1 + i % n])
                          for i in range(rounds)]
                outputs = []
                for i, (p, r) in enumerate(inputs):
                    if i % 3 == 0 and rank == (i // 3) % world:
                        torch.cuda._sleep(100_000)  # tens of microseconds
                    outputs.append(add_summed(p, r, norm, peers, slot=next_slot()))
                worst = 0.0
                for (p, r), (h, normed) in zip(inputs, outputs):
                    h_want, normed_want = add_summed(p, r, norm)
                    worst = max(worst, (h.float() - h_want.float()).abs().max().item(),
                                (normed.float() - normed_want.float()).abs().max().item())
                h, normed = add_summed(partial, residual, norm, peers, slot=next_slot())
                everyone = [torch.empty_like(normed) for _ in range(world)]
                dist.all_gather(everyone, normed)
                same_on_all = all(torch.equal(everyone[0], t) for t in everyone)

                def fused():
                    return add_summed(partial, residual, norm, peers, slot=next_slot())

                fused_us = graph_time(fused, calls, replays)
                plain_us = graph_time(lambda: add_summed(partial, residual, norm), calls,
                                      replays)
                one_shot_us = None
                if one_shot_buffer is not None:
                    buf = one_shot_buffer[:n * dim].view(n, 1, dim)

                    def one_shot():
                        buf.copy_(partial)
                        s = torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group.group_name)
                        hh = residual + s
                        return hh, norm(hh)

                    one_shot_us = graph_time(one_shot, calls, replays)
            row = dict(dtype=name, rows=n, dim=dim, world=world,
                       error_vs_nccl=(h.float() - h_ref.float()).abs().max().item(),
                       normed_error_vs_nccl=(normed.float() - normed_ref.float()).abs().max().item(),
                       worst_error_over_rounds=worst, same_on_all_ranks=same_on_all,
                       fused_us=round(fused_us, 2), nccl_add_norm_us=round(plain_us, 2),
                       one_shot_add_norm_us=one_shot_us and round(one_shot_us, 2))
            results.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    if rank == 0:
        Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    fire.Fire(main)
