"""The Triton kernels on the CPU, through Triton's interpreter (tests/kernels_worker.py):
the decode attention (llama/kernels.py) against SDPA with a mask, and a ragged batch
decoded through it against the SDPA path; the fused sum over ranks (llama/allreduce.py)
with both ranks of MP=2 simulated: the words one rank writes (layout, epochs, which
slot), and two processes exchanging through shared memory at the same time (results,
waiting; not the memory ordering between GPUs); and a forward pass through it, eager and
compiled. On GPUs they are checked by benchmarks/check_gpu.py and benchmarks/check_mp.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama import Llama, allreduce

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def worker_results():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "kernels_worker.py")],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])  # after fairscale's set-up messages


def test_kernel_matches_masked_sdpa(worker_results):
    errors = worker_results["errors"]
    assert len(errors) == 18  # 2 dtypes x 9 shapes (5 with one query per row)
    for case, error in errors.items():
        limit = 1e-5 if case.startswith("float32") else 2e-3  # fp16 rounds probabilities
        assert error < limit, (case, error)


def test_decoding_through_the_kernel_gives_the_same_tokens(worker_results):
    runs = worker_results["runs"]
    sdpa, kernel = runs["plain sdpa"], runs["plain kernel"]
    assert sdpa["kernel_calls"] == 0
    # Every decode step of every layer went through the kernel (2 layers, 11 steps).
    assert kernel["kernel_calls"] == 2 * 11 and kernel["queries"] == [1]
    for run in (kernel, runs["lookup sdpa"], runs["lookup kernel"]):
        assert run["tokens"] == sdpa["tokens"]
        for mine, theirs in zip(run["logprobs"], sdpa["logprobs"]):
            assert mine == pytest.approx(theirs, abs=1e-4)
    # With lookup, verify steps of the last token and up to 4 proposals (eager steps
    # are as wide as the longest proposal) took the kernel.
    assert runs["lookup kernel"]["proposed"] > 0
    assert max(runs["lookup kernel"]["queries"]) > 1


# The interpreter rounds float32 to bfloat16 by truncation (the GPU rounds to nearest):
# one bfloat16 step at the magnitudes of these tests (below 16).
LIMITS = {"float32": 1e-6, "bfloat16": 0.0625}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_sum_writes_stamped_words(worker_results, dtype):
    run = worker_results["exchange"][dtype]
    for epoch, call in enumerate(run["runs"], start=1):
        # Rank 0 wrote its partial into rank 1's buffer as words stamped with the call's
        # epoch (checked against an independent packing), counted the call for the 3
        # rows of slot 1 only, and summed with the words it found from rank 1.
        assert call["pushed"]
        assert call["epochs"] == [[0, 0, 0, 0], [epoch, epoch, epoch, 0]]
        assert call["shapes"] == [[1, 3, 80], [1, 3, 80]]
        assert call["h_error"] <= LIMITS[dtype] and call["normed_error"] <= LIMITS[dtype]
    assert run["other_slot_untouched"] == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_sum_between_two_concurrent_ranks(worker_results, dtype):
    run = worker_results["concurrent"][dtype]
    assert run["exit_codes"] == [0, 0]  # neither hung (killed) nor failed
    # In every call the rank that arrived first waited for the late one's words.
    assert min(run["waits"]) > 0.15, run["waits"]
    assert run["ranks_equal"]  # the same bits on both ranks, in every call
    assert run["worst_error"] <= LIMITS[dtype]


def test_forward_pass_through_fused_sums(worker_results):
    run = worker_results["model"]
    assert run["decode_calls"] == 4  # 2 layers x (attention, feed-forward), 2 rows
    assert run["prefill_calls"] == 0  # 8 rows do not fit 2-row buffers: all-reduce path
    assert run["error"] < 1e-5
    # Each (slot, row) cell counts one call per layer: 2 after the eager pass, 4 after
    # the compiled one (torch.compile neither dropped nor repeated a call).
    assert run["epochs_eager"] == [[2, 2], [2, 2]]
    assert run["epochs_compiled"] == [[4, 4], [4, 4]]
    assert run["compiled_error"] < 1e-5
    assert run["uninstalled_error"] == 0  # uninstall gives the plain model back


def test_fused_sums_are_chosen_by_shape_and_dtype_only():
    from llama import allreduce

    dim, capacity = 64, 4
    data = torch.zeros(allreduce.SLOTS, capacity, 2, dim // 2, dtype=torch.int64)
    epochs = torch.zeros(allreduce.SLOTS, capacity, dtype=torch.int32)
    table = torch.zeros(2, dtype=torch.int64)
    peers = allreduce.PeerBuffers(data, epochs, table, 1, dim, torch.bfloat16)
    weight = torch.ones(dim, dtype=torch.bfloat16)
    assert (peers.capacity, peers.dim) == (capacity, dim)
    assert peers.fits(torch.zeros(2, 2, dim, dtype=torch.bfloat16), weight)  # 4 rows
    assert not peers.fits(torch.zeros(1, 5, dim, dtype=torch.bfloat16), weight)  # 5 rows
    assert not peers.fits(torch.zeros(1, 1, dim + 8, dtype=torch.bfloat16), weight)
    assert not peers.fits(torch.zeros(1, 1, dim), weight)  # float32 partial
    assert not peers.fits(torch.zeros(1, 1, dim, dtype=torch.bfloat16), weight.float())


def test_symmetric_memory_is_ignored_where_it_cannot_run():
    # One process on the CPU: configure accepts the option, and the model keeps the
    # all-reduce path (no buffers to exchange through).
    gen = Llama.from_preset("tiny", max_seq_len=32, max_batch_size=2, device="cpu",
                            dtype=torch.float32)
    gen.configure(symmetric_memory=True)
    assert gen.settings["symmetric_memory"] and not allreduce.installed(gen.model)
    tokens, _ = gen.generate([[5, 9, 14]], max_gen_len=3, temperature=0.0)
    assert len(tokens[0]) == 3


def test_lookup_kernels_match_their_pytorch_versions(worker_results):
    """The device lookup rounds' proposal and append kernels (llama/lookup_rounds.py)."""
    run = worker_results["lookup"]
    assert run["cases"] == 32 and run["differ"] == 0
    assert run["found"] == 3  # the cases have matches to find (not in the row of no repeats)
