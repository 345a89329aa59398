"""The interactive chat CLI, driven through its standard input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build
import llama.chat
from llama import Llama, Tokenizer
from llama.chat import main, storable
from llama.prompts import UNSAFE_ERROR

ROOT = Path(__file__).resolve().parent.parent


def chat(folder, lines, *args, nproc=0):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node", str(nproc)] if nproc else [])
    proc = subprocess.run(
        launcher + ["-m", "llama.chat", "--ckpt_dir", str(folder), "--temperature", "0", *args],
        input="".join(line + "\n" for line in lines), env=env, capture_output=True,
        text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def answers(out):
    return [part.split("\nYou:")[0].rstrip("\n") for part in out.split("Assistant: ")[1:]]


def test_chat_answers_resets_and_exits(make_model):
    folder = make_model()[0]
    out = chat(folder, ["write a loop", "and another", "/reset", "write a loop", "/exit",
                        "never read"], "--max_seq_len", "256", "--max_gen_len", "8")
    replies = answers(out)
    assert len(replies) == 3
    want = build(folder, max_seq_len=256).chat_completion(
        [[{"role": "user", "content": "write a loop"}]], temperature=0, max_gen_len=8)
    assert replies[0] == want[0]["generation"]["content"]
    assert replies[2] == replies[0]  # after /reset the history is gone
    assert "(conversation reset)" in out and "never read" not in out


def test_chat_drops_oldest_turns_keeping_the_system_prompt(make_model):
    folder = make_model()[0]
    long = "please explain this code: " + "x = x + 1; " * 8
    out = chat(folder, [long, long, long], "--max_seq_len", "160", "--max_gen_len", "16",
               "--system", "Be brief.")
    assert "(dropped the 2 oldest messages to stay within max_seq_len=160)" in out
    assert len(answers(out)) == 3
    out = chat(folder, ["word " * 200], "--max_seq_len", "64")
    assert "too long for max_seq_len=64" in out


def test_chat_under_torchrun_reads_on_rank_0_only(make_model):
    """Two processes: rank 0 reads each line and shares it; the answers are those of a
    single process."""
    folder = make_model(shards=2)[0]
    lines = ["write a loop", "/reset", "write a loop", "/exit"]
    args = ("--max_seq_len", "256", "--max_gen_len", "8")
    assert answers(chat(folder, lines, *args, nproc=2)) == answers(chat(folder, lines, *args))


def test_a_refused_message_does_not_poison_the_conversation(make_model):
    folder = make_model()[0]
    out = chat(folder, ["what is [INST]?", "write a loop"], "--max_seq_len", "256",
               "--max_gen_len", "8")
    replies = answers(out)
    assert replies[0] == "Error: special tags are not allowed as part of the prompt."
    fresh = answers(chat(folder, ["write a loop"], "--max_seq_len", "256", "--max_gen_len", "8"))
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

    def tagged_answer(self, dialog, *args):  # a model that writes chat tags
        dialogs.append([dict(m) for m in dialog])
        return iter(["sure [/INST] <PRE> done"])

    monkeypatch.setattr(Llama, "stream_chat_completion", tagged_answer)
    main(str(make_model()[0]), max_seq_len=256, max_gen_len=8)
    out = capsys.readouterr().out
    assert UNSAFE_ERROR not in out and "left out of the conversation history" in out
    assert len(dialogs) == 2  # the second message was answered, not refused
    assert dialogs[1][1] == {"role": "assistant", "content": "sure   done"}


def test_answer_room_must_leave_room_for_a_message(make_model):
    with pytest.raises(ValueError, match="--max_gen_len must be a positive"):
        main("unused", max_seq_len=64, max_gen_len=0)
    with pytest.raises(ValueError, match=r"--max_gen_len 60 leaves no room .*at least \d+"):
        main(str(make_model()[0]), max_seq_len=64, max_gen_len=60)
