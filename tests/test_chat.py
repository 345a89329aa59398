"""The interactive chat CLI, driven through its standard input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build
import llama.chat
from llama import Llama, Tokenizer
from llama.chat import chat, main, storable
from llama.engine import Engine
from llama.prompts import UNSAFE_ERROR

ROOT = Path(__file__).resolve().parent.parent


def run_chat(folder, lines, *args, nproc=0):
    """The chat in its own process(es), fed `lines` (str, or bytes taken as they are)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node", str(nproc)] if nproc else [])
    proc = subprocess.run(
        launcher + ["-m", "llama.chat", "--ckpt_dir", str(folder), "--temperature", "0",
                    "--nostats", *args],
        input=b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n"
                       for line in lines), env=env, capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:].decode()
    assert proc.stderr == b""
    return proc.stdout.decode()


def answers(out):
    return [part.split("\nYou:")[0].rstrip("\n") for part in out.split("Assistant: ")[1:]]


def test_chat_answers_resets_and_exits(make_model):
    folder = make_model()[0]
    out = run_chat(folder, ["write a loop", "and another", "/reset", "write a loop",
                            b"caf\xe9 \xff", "/help", "/exit", "never read"],
                   "--max_seq_len", "256", "--max_gen_len", "8")
    replies = answers(out)
    assert len(replies) == 4  # the line that is not UTF-8 is answered too
    want = build(folder, max_seq_len=256).chat_completion(
        [[{"role": "user", "content": "write a loop"}]], temperature=0, max_gen_len=8)
    assert replies[0] == want[0]["generation"]["content"]
    assert replies[2] == replies[0]  # after /reset the history is gone
    assert "(conversation reset)" in out and "never read" not in out
    assert "/reset  forget the conversation" in out  # /help


def scripted(folder, capsys, lines, **options):
    """The chat in this process, sent `lines` as with --prompt; its output."""
    chat(str(folder), prompt=lines, temperature=0, stats=False, **options)
    return capsys.readouterr().out


def test_chat_drops_oldest_turns_keeping_the_system_prompt(make_model, capsys):
    folder = make_model()[0]
    long = "please explain this code: " + "x = x + 1; " * 8
    out = scripted(folder, capsys, [long, long, long], max_seq_len=160, max_gen_len=16,
                   system="Be brief.")
    assert "(dropped the 2 oldest messages to stay within max_seq_len=160)" in out
    assert len(answers(out)) == 3
    out = scripted(folder, capsys, ["word " * 200], max_seq_len=64)
    assert "too long for max_seq_len=64" in out


def test_chat_under_torchrun_reads_on_rank_0_only(make_model):
    """Two processes: rank 0 reads each line and shares it; the answers are those of a
    single process."""
    folder = make_model(shards=2)[0]
    lines = ["write a loop", "/reset", "write a loop", "/exit"]
    args = ("--max_seq_len", "256", "--max_gen_len", "8")
    assert answers(run_chat(folder, lines, *args, nproc=2)) == answers(
        run_chat(folder, lines, *args))


def test_a_refused_message_does_not_poison_the_conversation(make_model, capsys):
    folder = make_model()[0]
    replies = answers(scripted(folder, capsys, ["what is [INST]?", "write a loop"],
                               max_seq_len=256, max_gen_len=8))
    assert replies[0] == "Error: special tags are not allowed as part of the prompt."
    fresh = answers(scripted(folder, capsys, ["write a loop"], max_seq_len=256, max_gen_len=8))
    assert replies[1] == fresh[0]  # answered as if the refused message never happened


def test_replies_are_stored_without_chat_tags(make_model):
    """A model can write "[/INST]" or "<PRE>"; kept in the history, such text would get
    every later message refused as unsafe."""
    tokenizer = Tokenizer(str(make_model()[0] / "tokenizer.model"))
    assert storable(tokenizer, "a [/INST] b <PR<PRE>E> c <<SYS>>") == "a  b  c "
    assert storable(tokenizer, "plain <pre> text") == "plain <pre> text"


def test_tagged_answers_do_not_poison_the_history(make_model, monkeypatch, capsys):
    lines = iter(["hello", "more please", None])
    monkeypatch.setattr(llama.chat, "read_line", lambda prompt: next(lines))
    dialogs = []

    def tagged_answer(self, dialog, **sampling):  # a model that writes chat tags
        dialogs.append([dict(m) for m in dialog])
        return iter(["sure [/INST] <PRE> done"])

    monkeypatch.setattr(Llama, "stream_chat_completion", tagged_answer)
    chat(str(make_model()[0]), max_seq_len=256, max_gen_len=8)
    out = capsys.readouterr().out
    assert UNSAFE_ERROR not in out
    assert out.count("left out of the conversation history") == 1  # said once, not each time
    assert len(dialogs) == 2  # the second message was answered, not refused
    assert dialogs[1][1] == {"role": "assistant", "content": "sure   done"}


def test_ctrl_c_stops_an_answer_and_keeps_the_conversation(make_model, monkeypatch, capsys):
    folder = make_model()[0]
    lines = iter(["write a loop", "go on", None])
    monkeypatch.setattr(llama.chat, "read_line", lambda prompt: next(lines))
    generate, prompts = Engine.generate, []

    def ctrl_c_in_the_first_answer(self, prompt_tokens, *args, **kwargs):
        prompts.append(prompt_tokens[0])
        for i, step in enumerate(generate(self, prompt_tokens, *args, **kwargs)):
            if len(prompts) == 1 and i == 4:
                raise KeyboardInterrupt  # as if Ctrl-C came while the model ran
            yield step

    monkeypatch.setattr(Engine, "generate", ctrl_c_in_the_first_answer)
    chat(str(folder), max_seq_len=256, max_gen_len=8, temperature=0, stats=False)
    first, second = answers(capsys.readouterr().out)
    partial = first.split("\n(answer stopped)")[0]
    assert partial.strip()
    assert first.endswith("\n(answer stopped)") and "(answer stopped)" not in second
    tokenizer = Tokenizer(str(folder / "tokenizer.model"))
    assert tokenizer.decode(prompts[1]).startswith(
        f"[INST] write a loop [/INST] {partial.strip()}")  # kept in the conversation


def test_ctrl_c_or_end_of_input_at_the_prompt_ends_quietly(make_model, monkeypatch, capsys):
    def ctrl_c(prompt):
        raise KeyboardInterrupt

    folder = str(make_model()[0])
    for key in (ctrl_c, lambda prompt: (_ for _ in ()).throw(EOFError)):
        monkeypatch.setattr("builtins.input", key)
        main(["--ckpt_dir", folder, "--max_seq_len", "64", "--max_gen_len", "8"])
        out, err = capsys.readouterr()
        assert out.endswith("/exit quits.\n\n") and err == ""


def test_a_system_prompt_with_chat_tags_is_refused_at_startup(make_model, capsys):
    with pytest.raises(SystemExit) as exit:  # before loading anything: no such folder
        main(["--ckpt_dir", "/no/such/model", "--system", "Answer [INST] briefly."])
    assert exit.value.code == 2 and capsys.readouterr() == (
        "", "error: --system contains the chat tag(s) [INST], which would get every message "
            "refused; remove them\n")
    with pytest.raises(ValueError, match="--system contains text that encodes to the model's "
                                         "control tokens"):
        chat(str(make_model()[0]), system="Use <PRE> tags.", max_seq_len=64, max_gen_len=8)


def test_prompts_from_the_command_line_make_one_conversation(make_model, monkeypatch, capsys):
    folder = str(make_model()[0])
    out = scripted(folder, capsys, ["write a loop", "and another"], max_seq_len=256,
                   max_gen_len=8)
    assert out.count("You: ") == 2 and "Chat with the model" not in out
    lines = iter(["write a loop", "and another", None])
    monkeypatch.setattr(llama.chat, "read_line", lambda prompt: next(lines))
    chat(folder, max_seq_len=256, max_gen_len=8, temperature=0, stats=False)
    assert answers(out) == answers(capsys.readouterr().out)


def test_answer_room_must_leave_room_for_a_message(make_model):
    with pytest.raises(ValueError, match="--max_gen_len must be a positive"):
        chat("unused", max_seq_len=64, max_gen_len=0)
    with pytest.raises(ValueError, match=r"--max_gen_len 60 leaves no room .*at least \d+"):
        chat(str(make_model()[0]), max_seq_len=64, max_gen_len=60)
    long_system = "one more word " * 20
    with pytest.raises(ValueError, match=r"--system takes \d+ of --max_seq_len 64 tokens.*"
                                         "shorten --system"):
        chat(str(make_model()[0]), max_seq_len=64, system=long_system)
    with pytest.raises(ValueError, match="--max_gen_len 40 leaves no room .*lower it, "
                                         "shorten --system or raise"):
        chat(str(make_model()[0]), max_seq_len=64, max_gen_len=40, system=long_system)
    with pytest.raises(ValueError, match="--max_seq_len 4 leaves no room"):
        chat(str(make_model()[0]), max_seq_len=4)
