"""Model parallelism under torchrun with gloo on CPU: MP=2 and MP=4 equal MP=1."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import build

WORKER = Path(__file__).with_name("mp_worker.py")


def run_torchrun(nproc, folder, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parent.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--standalone", str(WORKER), str(folder), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


# (shards, processes, shape): 34B-like is 4 shards with 4 query heads per KV head, so at
# MP=4 each rank holds 4 query heads and 1 KV head, as 34B has 16 and 2 at MP=4.
@pytest.mark.parametrize("shards, nproc, shape", [
    (1, 2, dict(n_heads=4, n_kv_heads=2)),
    (2, 2, dict(n_heads=4, n_kv_heads=2)),
    (2, 4, dict(n_heads=4, n_kv_heads=4)),
    (4, 4, dict(dim=128, n_heads=16, n_kv_heads=4)),
])
def test_model_parallel_equals_single_process(make_model, tmp_path, shards, nproc, shape):
    folder, args, _ = make_model(shards=shards, **shape)
    got = run_torchrun(nproc, folder, tmp_path / "out.pt")
    assert got["local_heads"] == args.n_heads // nproc
    gen = build(folder)
    tokens = torch.randint(0, gen.model.vocab_size, (2, 24),
                           generator=torch.Generator().manual_seed(11))
    want = gen.model.forward(tokens, 0)
    assert ((got["logits"] - want).norm() / want.norm()).item() < 1e-5
    greedy = gen.text_completion(["def fib(n):", "import re\n"], temperature=0, max_gen_len=16,
                                 logprobs=True)
    for g, w in zip(got["greedy"], greedy):
        assert g["tokens"] == w["tokens"]
        assert g["logprobs"] == pytest.approx(w["logprobs"], abs=1e-4)
    # Same seed, same logits: every rank samples the tokens one process samples.
    assert got["sampled"] == gen.text_completion(["def fib(n):"], temperature=0.8,
                                                 max_gen_len=16)
