"""The command-line helper that the examples and the chat share (llama/cli.py): help,
parsing, user errors, prompts from the command line, build options, the speed report."""

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import pytest
import torch

import example_completion
import example_infilling
import example_instructions
from conftest import build
from llama import Llama, cli
from llama.chat import COMMANDS, chat

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = [example_completion.main, example_infilling.main, example_instructions.main,
                chat]


@pytest.mark.parametrize("main", ENTRY_POINTS, ids=lambda m: m.__module__)
def test_help_describes_every_option_on_stdout(main, capsys):
    cli.run(main, ["--help"], epilog=COMMANDS if main is chat else "")
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("usage: ")
    assert "Optional" not in out and "INFO" not in out
    for name, param in inspect.signature(main).parameters.items():
        line = next(line for line in out.splitlines() if line.startswith(f"  --{name}"))
        assert "default: " in line and line.endswith(")")
        if param.default == cli.DEMO:
            assert line.endswith(f"default: {cli.DEMO})")  # in full
        described = out.split(line + "\n", 1)[1].splitlines()[0]
        assert described.startswith("      ") and len(described.strip()) > 10
    if main is chat:
        assert "/help" in out and "/reset" in out and "/exit" in out
    assert "--prompt  (str, repeatable" in out
    assert "--stats, --nostats  (switch; default: on)" in out


def test_help_loads_neither_torch_nor_fire():
    """Help answers at once: every entry point prints it before importing torch."""
    script = (
        "import runpy, sys\n"
        "for name in ('example_completion', 'example_infilling', 'example_instructions',\n"
        "             'llama.chat'):\n"
        "    sys.argv = [name.replace('.', '/') + '.py', '--help']\n"
        "    runpy.run_module(name, run_name='__main__')\n"
        "print(sorted(m for m in ('torch', 'fire', 'fairscale') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("usage: ") == 4 and proc.stdout.endswith("[]\n")


def options(argv):
    """What run() hands to an entry point for these arguments."""
    got = {}

    def main(ckpt_dir: str = "x", temperature: float = 0.2,
             max_gen_len: Optional[int] = None, stream: bool = False,
             stop: Optional[List[str]] = None, prompt: Optional[List[str]] = None):
        got.update(locals())

    cli.run(main, argv)
    return got


def test_options_are_parsed_like_metas_scripts_then_checked():
    assert options(["--stop", '["\\n\\n", "def "]'])["stop"] == ["\n\n", "def "]
    assert options(["--stop", "\\n\\n"])["stop"] == ["\n\n"]  # no brackets: one string
    assert options(["--stop=\\n"])["stop"] == ["\n"]
    got = options(["7", "--prompt", "def f(x):\\n", "--prompt=3", "--temperature", "0",
                   "--stream"])
    assert got["prompt"] == ["def f(x):\n", "3"] and got["temperature"] == 0.0
    assert got["stream"] is True and got["ckpt_dir"] == "7"  # positional, as fire takes it
    assert options(["--prompt", "[1, 2]"])["prompt"] == ["[1, 2]"]  # taken as text
    assert cli.unescape(r"a\tb\\n\d") == "a\tb\\n\\d"  # other backslashes stay


@pytest.mark.parametrize("argv, message", [
    (["--max_gen_len", "2.5"], "error: --max_gen_len takes int, got 2.5\n"),
    (["--temperature", "hot"], "error: --temperature takes float, got 'hot'\n"),
    (["--prompt"], "error: --prompt needs a value: --prompt TEXT\n"),
    (["--stream", "7"], "error: --stream is a switch (--stream or --nostream), got 7\n"),
])
def test_a_bad_option_is_one_line_and_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        options(argv)
    assert exit.value.code == 2 and capsys.readouterr() == ("", message)


def test_user_errors_are_one_line_on_rank_0_others_keep_their_traceback(capsys, monkeypatch):
    def fails(error):
        def main():
            raise error
        return main

    for error in (ValueError("bad value; fix it"), FileNotFoundError("no such folder x"),
                  MemoryError("too big; lower max_seq_len")):
        with pytest.raises(SystemExit) as exit:
            cli.run(fails(error), [])
        assert exit.value.code == 2 and capsys.readouterr().err == f"error: {error}\n"
    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 speaks
    with pytest.raises(SystemExit):
        cli.run(fails(ValueError("bad")), [])
    assert capsys.readouterr() == ("", "")
    with pytest.raises(RuntimeError, match="internal"):
        cli.run(fails(RuntimeError("internal")), [])
    with pytest.raises(SystemExit) as exit:
        cli.run(fails(KeyboardInterrupt()), [])
    assert exit.value.code == 130


def test_prompts_come_from_options_and_files(tmp_path):
    assert cli.user_prompts(None, None) is None
    listed = tmp_path / "prompts.json"
    listed.write_text(json.dumps(["def a():", "class B:"]))
    whole = tmp_path / "prompt.py"
    whole.write_text("import os\n\n# [1, 2]\n")
    assert cli.user_prompts(["x"], str(listed)) == ["x", "def a():", "class B:"]
    assert cli.user_prompts(None, str(whole)) == ["import os\n\n# [1, 2]\n"]
    dialogs = tmp_path / "dialogs.json"
    dialogs.write_text(json.dumps(["hi", [{"role": "user", "content": "hello"}]]))
    assert cli.user_prompts(None, str(dialogs), dialogs=True)[1][0]["content"] == "hello"
    with pytest.raises(ValueError, match="prompt 1 is a list; each prompt must be a string$"):
        cli.user_prompts(None, str(dialogs))
    for text, error in (("[1,", "is not valid JSON"), ("[]", "non-empty JSON list"),
                        ('{"a": 1}', "non-empty JSON list")):
        listed.write_text(text)
        with pytest.raises(ValueError, match=error):
            cli.user_prompts(None, str(listed))
    whole.write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        cli.user_prompts(None, str(whole))
    with pytest.raises(FileNotFoundError):
        cli.user_prompts(None, str(tmp_path / "missing.txt"))
    assert cli.batches([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]


def test_build_options():
    assert cli.build_options(None, None, None) == {}
    assert cli.build_options("cpu", "bfloat16", None) == {"device": torch.device("cpu"),
                                                          "dtype": torch.bfloat16}
    with pytest.raises(ValueError, match="--dtype 'fp64' is not supported; use one of float32"):
        cli.build_options(None, "fp64", None)
    with pytest.raises(ValueError, match="--device 'gpu' is not a device"):
        cli.build_options("gpu", None, None)
    assert cli.build_options(None, None, "int8") == {"quantize": "int8"}


def test_speed_report_counts_the_generated_tokens(make_model, capsys):
    generator = build(make_model()[0], max_seq_len=64)
    cli.watch_speed(generator)
    prompts = ["def f(x):", "import os"]
    generator.text_completion(prompts, temperature=0, max_gen_len=5)
    err = capsys.readouterr().err
    assert err.startswith("[10 tokens in ") and "tokens/s; first token after " in err
    assert err.count("\n") == 1
    pieces = generator.stream_completion("x = ", temperature=0, max_gen_len=3)
    next(pieces)
    pieces.close()  # a stream stopped early reports what it made
    assert re.match(r"\[\d tokens in ", capsys.readouterr().err)


# ---- what the library does for a command-line user (issue 24 items 4 and 10) -----------

def test_prompts_that_are_not_unicode_get_a_value_error(make_model):
    generator = build(make_model()[0])
    with pytest.raises(ValueError, match="'x\\\\ud800' holds the lone surrogate"):
        generator.text_completion(["fine", "x\ud800"], max_gen_len=1)
    with pytest.raises(ValueError, match="the suffix 'x\\\\ud800' holds the lone surrogate"):
        generator.text_infilling(["a"], ["x\ud800"], max_gen_len=1)


def test_a_model_without_tokenizer_says_so_in_text_methods():
    generator = Llama.from_preset("tiny", 32, 1, device="cpu")
    with pytest.raises(ValueError, match="this Llama has no tokenizer"):
        generator.text_infilling(["a"], ["b"])
    with pytest.raises(ValueError, match="this Llama has no tokenizer"):
        generator.chat_completion([[{"role": "user", "content": "hi"}]])


def test_a_model_without_tokenizer_says_so_in_completion():
    generator = Llama.from_preset("tiny", 32, 1, device="cpu")
    with pytest.raises(ValueError, match="this Llama has no tokenizer"):
        generator.text_completion(["a"])


@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="needs a CPU-only PyTorch")
def test_cuda_on_a_cpu_only_pytorch_is_a_value_error(make_model):
    with pytest.raises(ValueError, match="asks for CUDA, but this PyTorch .* is a CPU-only "
                                         "build; use device 'cpu'"):
        Llama.build(str(make_model()[0]), max_seq_len=32, max_batch_size=1, device="cuda")


def test_a_one_process_run_keeps_plain_tracebacks(make_model):
    """init_process_group prefixes every later traceback line with "[rank0]: "."""
    build(make_model()[0])
    assert sys.excepthook is sys.__excepthook__


def test_model_parallel_setup_prints_nothing(capsys):
    from fairscale.nn.model_parallel import initialize as mp

    from llama import distributed
    distributed.initialize(None, torch.device("cpu"))
    mp.destroy_model_parallel()  # set up again, as in a fresh process
    assert distributed.initialize(None, torch.device("cpu")) == 1
    assert capsys.readouterr().out == ""
