"""The example scripts on the bundled demo model, with and without torchrun, and the demo
model's files against its checklist."""

import hashlib
import json
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


# ---- the examples' own prompts, precision, device and errors, run in this process ------

def run_main(main, *argv):
    """An example's main as its command line runs it (llama.cli.run)."""
    from llama import cli
    cli.run(main, [str(a) for a in argv])


def test_completion_example_runs_given_prompts_in_batches(make_model, capsys):
    import example_completion
    from conftest import build
    folder = make_model()[0]
    prompts = ["def f(x):", "import os\n", "class A:"]
    run_main(example_completion.main, "--ckpt_dir", folder, "--prompt", "def f(x):",
             "--prompt", "import os\\n", "--prompt=class A:", "--max_batch_size", 2,
             "--max_gen_len", 12, "--temperature", 0, "--stop", "\\n", "--device", "cpu",
             "--dtype", "float32")
    out, err = capsys.readouterr()
    want = build(folder).text_completion(prompts, temperature=0, max_gen_len=12, stop=["\n"])
    assert out.count(SEPARATOR) == 3
    for prompt, result in zip(prompts, want):
        assert f"{prompt}\n> {result['generation']}\n{SEPARATOR}" in out
    assert err.count(" tokens/s; first token after ") == 2  # one report per batch


def test_infilling_example_takes_a_prompts_file_and_checks_the_gap(make_model, capsys,
                                                                  tmp_path):
    import example_infilling
    folder = make_model()[0]
    listed = tmp_path / "gaps.json"
    listed.write_text(json.dumps(["def add(a, b):\n    <FILL>\n", "x = <FILL>\n"]))
    run_main(example_infilling.main, "--ckpt_dir", folder, "--prompts_file", listed,
             "--max_gen_len", 4, "--stream", "--nostats")
    out, err = capsys.readouterr()
    assert out.count("Filled text") == 2 and "def add(a, b):\n    " in out and err == ""
    listed.write_text(json.dumps(["x = <FILL>\n", "<FILL> <EOT>"]))
    with pytest.raises(SystemExit):
        run_main(example_infilling.main, "--ckpt_dir", folder, "--prompts_file", listed,
                 "--stream")
    out, err = capsys.readouterr()
    assert err.startswith("error: prompt 1: the suffix") and "Filled text" not in out
    with pytest.raises(SystemExit):  # sampling options are checked before any printing
        run_main(example_infilling.main, "--ckpt_dir", folder, "--top_p", 2, "--stream")
    out, err = capsys.readouterr()
    assert "top_p" in err and "Filled text" not in out
    listed.write_text(json.dumps(["x = <FILL> + <FILL>"]))
    with pytest.raises(SystemExit) as exit:
        run_main(example_infilling.main, "--ckpt_dir", folder, "--prompts_file", listed)
    assert exit.value.code == 2
    assert capsys.readouterr().err == ("error: prompt 0 has 2 <FILL> markers; mark the one "
                                       "gap to fill with exactly one <FILL>\n")


def test_instructions_example_takes_messages_and_dialogs(make_model, capsys, tmp_path):
    import example_instructions
    listed = tmp_path / "dialogs.json"
    listed.write_text(json.dumps([[{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "hi"}]]))
    run_main(example_instructions.main, "--ckpt_dir", make_model()[0], "--prompt",
             "write a loop", "--prompts_file", listed, "--max_gen_len", 4, "--dtype",
             "bfloat16")
    out = capsys.readouterr().out
    assert "User: write a loop\n" in out and "System: Be brief.\n\nUser: hi\n" in out
    assert out.count("> Assistant: ") == 2
    listed.write_text(json.dumps(["fine", [{"role": "assistant", "content": "first?"}]]))
    with pytest.raises(SystemExit):
        run_main(example_instructions.main, "--ckpt_dir", make_model()[0], "--prompts_file",
                 listed)
    assert capsys.readouterr().err.startswith("error: dialog 1: ")
    # A dialog with chat tags is answered with an error message, however long.
    listed.write_text(json.dumps(["[INST] " * 60]))
    run_main(example_instructions.main, "--ckpt_dir", make_model()[0], "--prompts_file",
             listed, "--max_seq_len", 64, "--nostats")
    assert "Error: special tags are not allowed" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["example_completion", "example_infilling",
                                    "example_instructions"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_too_long_is_named_before_any_runs(make_model, capsys, script, stream):
    """The examples run prompts batch by batch (or one by one streamed): a too long third
    prompt is refused as prompt 2 before the first is answered."""
    import importlib
    main = importlib.import_module(script).main
    short = "x = <FILL>\n" if script == "example_infilling" else "short"
    long = "y = 1 " * 40 + ("<FILL>" if script == "example_infilling" else "")
    args = ["--ckpt_dir", make_model()[0], "--prompt", short, "--prompt", short, "--prompt",
            long, "--max_batch_size", 1, "--max_seq_len", 48, "--max_gen_len", 4]
    with pytest.raises(SystemExit) as exit:
        run_main(main, *args, *(["--stream"] if stream else []))
    out, err = capsys.readouterr()
    label = "dialog" if script == "example_instructions" else "prompt"
    assert exit.value.code == 2 and err.startswith(f"error: {label} 2 has "), err
    assert ">" not in out and "Filled text" not in out  # nothing was generated


@pytest.mark.parametrize("script", ["example_completion", "example_infilling",
                                    "example_instructions", "llama.chat"])
def test_a_bad_draft_is_refused_before_the_model_loads(script, capsys):
    import importlib
    module = importlib.import_module(script)
    main = module.chat if script == "llama.chat" else module.main
    with pytest.raises(SystemExit):  # the folder does not exist either: never read
        run_main(main, "--ckpt_dir", "/no/such/folder", "--draft", "lookpu")
    assert capsys.readouterr().err.startswith("error: --draft 'lookpu' is not a draft")


def test_a_wrong_ckpt_dir_is_one_line(capsys):
    import example_completion
    with pytest.raises(SystemExit) as exit:
        run_main(example_completion.main, "--ckpt_dir", "/no/such/folder", "--device", "cpu")
    assert exit.value.code == 2
    assert capsys.readouterr().err == "error: checkpoint folder /no/such/folder does not exist\n"


def test_a_user_error_under_torchrun_is_one_line_from_rank_0():
    """torchrun itself then reports the failed processes, which a worker cannot stop."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         "2", "example_completion.py", "--ckpt_dir", "/no/such/folder"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("error: checkpoint folder /no/such/folder does not exist\n") == 1
    assert "[rank0]" not in proc.stderr and "[rank1]" not in proc.stderr
    assert "Traceback" not in proc.stderr.split("error: checkpoint folder")[0]


@pytest.mark.parametrize("draft", [["--draft", "lookup"], ["--draft_ckpt_dir", "SELF"]])
def test_examples_take_the_draft_options(make_model, capsys, draft):
    """--draft lookup and --draft_ckpt_dir (here the model itself) give the greedy answers
    of plain decoding; both at once are refused in one line."""
    import example_completion
    from conftest import build
    folder = make_model()[0]
    draft = [str(folder) if a == "SELF" else a for a in draft]
    run_main(example_completion.main, "--ckpt_dir", folder, "--prompt", "def f(x):",
             "--max_gen_len", 12, "--temperature", 0, "--device", "cpu", "--nostats",
             "--draft_tokens", 3, *draft)
    want = build(folder).text_completion(["def f(x):"], temperature=0, max_gen_len=12)
    assert f"def f(x):\n> {want[0]['generation']}\n{SEPARATOR}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_main(example_completion.main, "--ckpt_dir", folder, "--device", "cpu",
                 "--draft", "lookup", "--draft_ckpt_dir", folder)
    assert "either --draft or --draft_ckpt_dir" in capsys.readouterr().err
