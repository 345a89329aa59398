"""Model parallelism under torchrun with gloo on CPU: MP=2 and MP=4 equal MP=1."""

from pathlib import Path

import pytest
import torch

import conftest
from conftest import build

WORKER = Path(__file__).with_name("mp_worker.py")


def run_torchrun(nproc, folder, out, *args, timeout=180):
    conftest.run_torchrun(WORKER, nproc, folder, out, *args, timeout=timeout)
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
    # Same seed, same logits: every rank samples the tokens one process samples (also
    # when rank 1 drew random numbers of its own before: the ranks' states are synced).
    assert got["sampled"] == gen.text_completion(["def fib(n):"], temperature=0.8,
                                                 max_gen_len=16)


def test_compiled_decode_step_at_mp2(make_model, tmp_path):
    """The fast decode path works with model parallelism: torch.compile traces a whole
    MP=2 decode step (functional collectives: no graph break) and it matches eager."""
    folder, _, _ = make_model(shards=2, n_heads=4, n_kv_heads=2)
    got = run_torchrun(2, folder, tmp_path / "out.pt", "compile", timeout=900)
    assert got["graph_breaks"] == 0
    (eager_tok, eager_lp), (comp_tok, comp_lp) = got["eager"], got["compiled"]
    assert comp_tok.tolist() == eager_tok.tolist()
    assert torch.allclose(comp_lp, eager_lp, atol=1e-4)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_equal_one_process(make_model, tmp_path):
    """The README's multi-node launch (torchrun --nnodes 2 with c10d rendezvous), as two
    "nodes" of one process each on this machine: MP=2 across them gives MP=1's greedy
    tokens."""
    import os
    import subprocess
    import sys
    folder, _, _ = make_model(shards=1, n_heads=4, n_kv_heads=2)
    out = tmp_path / "out.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(conftest.ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
           "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_id", "two-nodes",
           "--rdzv_endpoint", f"127.0.0.1:{free_port()}", str(WORKER), str(folder), str(out)]
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(log[-2000:] for log in logs)
    got = torch.load(out, weights_only=False)
    assert got["local_heads"] == 2  # split over the two nodes
    greedy = build(folder).text_completion(["def fib(n):", "import re\n"], temperature=0,
                                           max_gen_len=16, logprobs=True)
    for g, w in zip(got["greedy"], greedy):
        assert g["tokens"] == w["tokens"]
        assert g["logprobs"] == pytest.approx(w["logprobs"], abs=1e-4)


def test_different_seeds_on_the_ranks_are_refused(make_model, tmp_path):
    folder, _, _ = make_model(shards=1, n_heads=4, n_kv_heads=2)
    got = run_torchrun(2, folder, tmp_path / "out.pt", "seeds")
    assert "seed differs between the ranks ([0, 1])" in got["error"]
