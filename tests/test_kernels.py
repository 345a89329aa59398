"""The Triton decode attention (llama/kernels.py) on the CPU, through Triton's
interpreter (tests/kernels_worker.py): the kernel against SDPA with a mask, and a
ragged batch decoded through it against the SDPA path. The GPU run of the same kernel is
benchmarks/check_gpu.py and benchmarks/decode_attention.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert len(errors) == 6
    for case, error in errors.items():
        limit = 1e-5 if case.startswith("float32") else 2e-3  # fp16 rounds probabilities
        assert error < limit, (case, error)


def test_decoding_through_the_kernel_gives_the_same_tokens(worker_results):
    sdpa, kernel = worker_results["runs"]["sdpa"], worker_results["runs"]["kernel"]
    assert sdpa["kernel_calls"] == 0
    # Every decode step of every layer went through the kernel (2 layers, 11 steps).
    assert kernel["kernel_calls"] == 2 * 11
    assert kernel["tokens"] == sdpa["tokens"]
    for mine, theirs in zip(kernel["logprobs"], sdpa["logprobs"]):
        assert mine == pytest.approx(theirs, abs=1e-4)
