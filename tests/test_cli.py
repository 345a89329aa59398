"""The command-line helper that the examples and the chat share (llama/cli.py): help,
parsing, user errors, prompts from the command line, build options, the speed report."""

import inspect
import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import List, Optional

import pytest
import torch

import example_completion
import example_infilling
import example_instructions
from conftest import build
from llama import Llama, cli, convert
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


def installed(target: str, name: str) -> List[str]:
    """python's arguments that run `target` (module:function) as its console script does."""
    module, function = target.split(":")
    return ["-c", f"import sys; from {module} import {function}; sys.argv[0] = {name!r}; "
                  f"sys.exit({function}())"]


def convert_options(command: str) -> List[str]:
    return [f"--{name}" for name in inspect.signature(convert.COMMANDS[command]).parameters]


# Every command line, run as users run it (a script, python -m, or the command setup.py
# installs), with words its help must show.
HELP = {
    "example_completion": (["example_completion.py"], ["--ckpt_dir", "--prompt", "--stop"]),
    "example_infilling": (["example_infilling.py"], ["--prompts_file", "--max_gen_len"]),
    "example_instructions": (["example_instructions.py"], ["--temperature", "--dtype"]),
    "chat": (["-m", "llama.chat"], ["--system", "/reset"]),
    "codellama-chat": (installed("llama.chat:main", "codellama-chat"), ["--system"]),
    "convert": (["-m", "llama.convert"], list(convert.COMMANDS) + ["--help"]),
    "codellama-convert": (installed("llama.convert:main", "codellama-convert"),
                          ["usage: codellama-convert COMMAND", "to_hf", "quantize"]),
    **{f"convert {name}": (["-m", "llama.convert", name], convert_options(name))
       for name in convert.COMMANDS},
    "convert to-hf": (["-m", "llama.convert", "to-hf"], ["to_hf --ckpt_dir CKPT_DIR"]),
    "codellama-convert reshard": (installed("llama.convert:main", "codellama-convert")
                                  + ["reshard"], ["codellama-convert reshard", "--mp"]),
    "eval": (["-m", "llama.eval"], ["humaneval", "perplexity"]),
    "codellama-eval": (installed("llama.eval.__main__:main", "codellama-eval"),
                       ["humaneval"]),
    "bench": (["-m", "benchmarks.bench"], ["--decode", "--prefill_lens", "--draft", "--out"]),
    "compare_mp": (["-m", "benchmarks.compare_mp"], ["--nproc", "--rounds"]),
    "check_mp": (["-m", "benchmarks.check_mp"], ["write", "run", "compare"]),
    "check_mp run": (["-m", "benchmarks.check_mp", "run"], ["--ckpt_dir", "--dtype"]),
    "check_gpu": (["-m", "benchmarks.check_gpu"], ["--device", "--decode", "--max_rel_err"]),
}


@pytest.mark.parametrize("name", HELP)
def test_help_is_on_stdout_and_imports_no_torch(name):
    """--help answers at once: printed before torch (or fire) is imported, which python's
    -X importtime would list."""
    command, words = HELP[name]
    proc = subprocess.run([sys.executable, "-X", "importtime", *command, "--help"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=120)
    timed = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[1].strip() for line in timed}
    assert proc.returncode == 0 and len(timed) == len(proc.stderr.splitlines()), proc.stderr
    assert proc.stdout.startswith("usage: ") and "INFO" not in proc.stdout, proc.stdout
    for word in words:
        assert word in proc.stdout
    assert imported & {"llama", "benchmarks"}  # importtime lists what the command loads
    assert not imported & {"torch", "fire", "fairscale"}


@pytest.mark.parametrize("command", convert.COMMANDS)
def test_convert_help_describes_every_option(command, capsys):
    convert.main([command, "--help"])
    out, err = capsys.readouterr()
    assert err == "" and out.startswith(f"usage: {cli.program_name()} {command} --")
    assert "Optional" not in out and "INFO" not in out
    for name, param in inspect.signature(convert.COMMANDS[command]).parameters.items():
        line = next(line for line in out.splitlines() if line.startswith(f"  --{name}  ("))
        kind = cli.type_name(typing.get_type_hints(convert.COMMANDS[command])[name])
        if param.default is param.empty:
            assert line.endswith(f"({kind}; required)") and f"--{name} {name.upper()}" in out
        else:
            assert line.endswith(f"({kind}; default: {param.default})")
        described = out.split(line + "\n", 1)[1].splitlines()[0]
        assert described.startswith("      ") and len(described.strip()) > 3
    # Its default stands in the signature (no torch to read it from): the same number.
    from llama import quantize
    assert convert.DEFAULT_GROUP_SIZE == quantize.DEFAULT_GROUP_SIZE


def options(argv):
    """What run() hands to an entry point for these arguments."""
    got = {}

    def main(ckpt_dir: str = "x", temperature: float = 0.2,
             max_gen_len: Optional[int] = None, stream: bool = False,
             stop: Optional[List[str]] = None, prompt: Optional[List[str]] = None,
             quantize: Optional[str] = None, dtype: Optional[str] = None, stats: bool = True):
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
    # "none", as --help writes a missing value, is that (fire itself knows only None).
    got = options(["--max_gen_len", "none", "--quantize", "NONE", "--dtype", "None"])
    assert got["max_gen_len"] is None and got["quantize"] is None and got["dtype"] is None
    assert options(["--prompt", "none"])["prompt"] == ["none"]  # text stays text


def test_text_options_are_taken_as_written(capsys):
    """fire reads Python literals; text options are not read: a system prompt that looks
    like a list stays text, a number-like stop string keeps its spelling, and a list
    option that starts like a list but is not one is an error, not a stop string."""
    got = options(["--ckpt_dir", "1_000", "--stop", "1e3", "--quantize", "[x]"])
    assert got["ckpt_dir"] == "1_000" and got["stop"] == ["1e3"] and got["quantize"] == "[x]"
    assert options(["--stop=['a', \"b\\n\"]"])["stop"] == ["a", "b\n"]
    for stop in ('["\\n\\n",', "[INST]"):
        with pytest.raises(SystemExit):
            options(["--stop", stop])
        assert "starts like a list but is not one" in capsys.readouterr().err
    assert options(["--stop", '["[INST]"]'])["stop"] == ["[INST]"]
    # A switch, then a text option, then a positional argument: fire must see them in
    # that order, or it reads the positional one as the switch's value.
    got = options(["--nostream", "--stop", "x", "folder", "--prompt", "p", "--nostats"])
    assert (got["ckpt_dir"], got["stream"], got["stop"], got["prompt"]) == (
        "folder", False, ["x"], ["p"])
    assert options(["--prompt", "--help"])["prompt"] == ["--help"]  # a value, not a flag
    got = {}

    def convert_like(ckpt_dir: str, out_dir: str, mp: int = 1):
        got.update(ckpt_dir=ckpt_dir, out_dir=out_dir, mp=mp)

    cli.run(convert_like, ["--ckpt-dir", "IN", "OUT", "--mp", "2"])  # named and in order
    assert got == {"ckpt_dir": "IN", "out_dir": "OUT", "mp": 2}
    cli.run(convert_like, ["IN", "--out_dir", "-x"])
    assert got == {"ckpt_dir": "IN", "out_dir": "-x", "mp": 1}


@pytest.mark.parametrize("argv, message", [
    (["--stop", "\\n", "--stop", "x"], "--stop is given more than once; give several as "
                                       "one list: --stop '[\"a\", \"b\"]'"),
    (["--max_gen_len=5", "--max_gen_len", "9"], "--max_gen_len is given more than once"),
    (["--stats", "--nostats"], "--stats is given more than once"),
])
def test_an_option_given_twice_is_refused_unless_repeatable(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        options(argv)
    said = capsys.readouterr().err
    assert exit.value.code == 2 and said.startswith(f"error: {message}"), said
    assert options(["--prompt", "a", "--prompt", "b"])["prompt"] == ["a", "b"]


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


def test_what_fire_cannot_place_and_a_missing_option_are_one_line(capsys):
    def needs(ckpt_dir: str, mp: int = 1):
        """Something of a folder.

        Args:
            ckpt_dir: a folder
            mp: processes
        """
    prog = cli.program_name()
    for argv, problem in [(["x", "--bogus", "1"], "unknown option --bogus"),
                          (["x", "2", "3"], "unexpected argument '3'"),
                          (["--mp", "2"], "--ckpt_dir is required")]:
        with pytest.raises(SystemExit) as exit:
            cli.run(needs, argv)
        assert exit.value.code == 2
        assert capsys.readouterr() == ("", f"error: {problem} (see {prog} --help)\n")
    # On a terminal fire colours its "ERROR: ".
    said = "\x1b[1m\x1b[31mERROR: \x1b[0mCould not consume arg: --x\nUsage: prog <flags>\n"
    assert cli.fire_error(said) == "unknown option --x"
    assert "--ckpt_dir CKPT_DIR [--option" in cli.help_text(needs, "prog")


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
    with pytest.raises(ValueError, match="--prompts_file .*missing.txt: no such file"):
        cli.user_prompts(None, str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="--prompts_file .*: is a directory"):
        cli.user_prompts(None, str(tmp_path))
    assert cli.batches([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]


def test_build_options():
    assert cli.build_options(None, None, None) == {}
    assert cli.build_options("cpu", "bfloat16", None) == {"device": torch.device("cpu"),
                                                          "dtype": torch.bfloat16}
    with pytest.raises(ValueError, match="dtype 'fp64' is not supported; use one of float32"):
        cli.build_options(None, "fp64", None)
    with pytest.raises(ValueError, match="device 'gpu' is not a device"):
        cli.build_options("gpu", None, None)
    assert cli.build_options(None, None, "int8") == {"quantize": "int8"}


def test_draft_options_are_checked_before_any_model_loads(tmp_path):
    cli.check_draft(None, None, 4)
    cli.check_draft("lookup", None, 1)
    cli.check_draft(None, str(tmp_path), 7)
    for args, message in [(("lookup", str(tmp_path), 4), "either --draft or --draft_ckpt_dir"),
                          (("lookpu", None, 4), "--draft 'lookpu' is not a draft; use lookup"),
                          ((None, str(tmp_path / "no"), 4), "--draft_ckpt_dir .* not a folder"),
                          ((None, None, 0), "--draft_tokens must be .* >= 1, got 0")]:
        with pytest.raises(ValueError, match=message):
            cli.check_draft(*args)


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


# ---- what the library does for a command-line user ---------------------------------------

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
