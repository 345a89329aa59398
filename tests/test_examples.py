"""The example scripts on the bundled demo model, with and without torchrun, and the demo
model's files against its checklist."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "CodeLlama-demo"
SEPARATOR = "\n==================================\n"


def run(args, torchrun=0):
    """Run a script plainly, or under torchrun with that many processes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", str(torchrun)] if torchrun else [sys.executable])
    proc = subprocess.run(launcher + args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_demo_checkpoint_matches_its_checklist():
    lines = (DEMO / "checklist.chk").read_text().split("\n")
    entries = dict(reversed(line.split()) for line in lines if line.strip())
    assert set(entries) == {"consolidated.00.pth", "params.json", "tokenizer.model"}
    for name, md5 in entries.items():
        assert hashlib.md5((DEMO / name).read_bytes()).hexdigest() == md5, name
    size = sum(f.stat().st_size for f in DEMO.iterdir())
    assert size <= 30 * 2**20


@pytest.mark.parametrize("torchrun", [0, 1, 2])  # MP=2: the demo model re-split in two
def test_completion_example(torchrun):
    out = run(["example_completion.py", "--max_gen_len", "24", "--temperature", "0"], torchrun)
    blocks = out.split(SEPARATOR)
    assert len(blocks) == 3 and blocks[-1].strip() == ""
    assert blocks[0].split("Loaded in")[1].split("\n", 1)[1].startswith("def is_palindrome")
    assert all("\n> " in b for b in blocks[:2])
    if torchrun == 2:  # greedy output of two processes equals one process's
        assert out.split("Loaded in")[1].split("\n", 1)[1] == run(
            ["example_completion.py", "--max_gen_len", "24", "--temperature", "0"]
        ).split("Loaded in")[1].split("\n", 1)[1]


def test_infilling_example_plain_and_streamed():
    outs = [run(["example_infilling.py", "--max_gen_len", "16"] + extra)
            for extra in ([], ["--stream"])]
    for out in outs:
        assert out.count("================= Prompt text =================") == 4
        assert out.count("================= Filled text =================") == 4
        assert "def count_words(path):" in out and "return counts" in out
    # Greedy decoding: the streamed text is the batch text.
    assert outs[0].split("Loaded in")[1].split("\n", 1)[1] == \
        outs[1].split("Loaded in")[1].split("\n", 1)[1]


def test_instructions_example_with_stop():
    out = run(["example_instructions.py", "--max_gen_len", "16", "--stop", '["\\n"]'])
    blocks = out.split(SEPARATOR)
    assert len(blocks) == 4
    assert "User: Write a Python function that checks whether a number is prime." in blocks[0]
    assert "System: Answer with a single shell command." in blocks[1]
    for block in blocks[:3]:
        answer = block.split("> Assistant: ", 1)[1]
        assert "\n" not in answer.rstrip("\n")  # the stop string ended every answer
