"""Talk to a Code Llama - Instruct model in the terminal.

    python -m llama.chat                      # the bundled demo model
    codellama-chat --ckpt_dir CodeLlama-7b-Instruct --system "Answer in Python."
    torchrun --nproc_per_node 2 -m llama.chat --ckpt_dir CodeLlama-13b-Instruct

Answers stream as they are generated. When the conversation no longer fits in
max_seq_len, the oldest exchanges are dropped (the system prompt stays) and a note says
so. Under torchrun only rank 0 reads the keyboard; it sends each line to the other ranks
(Ctrl-C there goes to torchrun, which stops every process: it ends the chat).
"""

import io
import sys
from typing import List, Optional, Tuple

from . import cli
from .prompts import SPECIAL_TAGS, UNSAFE_ERROR, Dialog, Message
from .tokenizer import Tokenizer

COMMANDS = """commands:
  /help   show this list
  /reset  forget the conversation (the system prompt stays)
  /exit   quit (as do Ctrl-D and Ctrl-C at the prompt)
Ctrl-C while an answer is written stops it; the conversation keeps what was written.
Chat tags that the model writes ([INST], <<SYS>>, ...) are left out of the
conversation history, since kept they would get every later message refused."""


def read_line(prompt: str) -> Optional[str]:
    """A line from rank 0's standard input, shared with every rank; None at end of input
    or Ctrl-C."""
    import torch.distributed as dist

    line = None
    if dist.get_rank() == 0:
        try:
            line = input(prompt)
        except (EOFError, KeyboardInterrupt):
            print()
            line = None
    if dist.get_world_size() > 1:
        box = [line]
        dist.broadcast_object_list(box, src=0)
        line = box[0]
    return line


def with_system_prompt(system: Optional[str], turns: List[Message]) -> Dialog:
    return ([{"role": "system", "content": system}] if system else []) + list(turns)


def fit_history(generator, system: Optional[str], turns: List[Message],
                answer_room: int) -> Tuple[Optional[Dialog], int]:
    """The dialog to send: the system prompt plus as many of the latest turns as leave
    `answer_room` tokens free in max_seq_len. Returns (dialog or None if even the last
    message alone is too long, number of dropped turns)."""
    max_seq_len = generator.model.params.max_seq_len
    for dropped in range(0, len(turns), 2):  # drop whole user/assistant exchanges
        dialog = with_system_prompt(system, turns[dropped:])
        prompt, _ = generator.chat_prompt(dialog)
        if len(prompt) + answer_room <= max_seq_len:
            return dialog, dropped
    return None, len(turns)


def storable(tokenizer: Tokenizer, reply: str) -> str:
    """The reply as kept in the history: without chat tags or the text of control tokens
    (a model can write "[/INST]" or "<PRE>"), which would get every later dialog refused
    as unsafe. Removal repeats until none is left (taking one out can join another)."""
    tags = SPECIAL_TAGS + [tokenizer.token_piece(i).lstrip("▁") for i in tokenizer.control_ids]
    cleaned = None
    while cleaned != reply:
        cleaned = reply
        for tag in tags:
            reply = reply.replace(tag, "")
    return reply


class Conversation:
    """The turns so far and how to answer the next message."""

    def __init__(self, generator, system: Optional[str], answer_room: int, sampling: dict):
        self.generator = generator
        self.system = system
        self.answer_room = answer_room
        self.sampling = sampling
        self.turns: List[Message] = []
        self.told_tags = False  # the note on left-out chat tags comes once

    def ask(self, line: str) -> None:
        """Answer a user message, printing the answer as it comes and keeping both."""
        message = {"role": "user", "content": line}
        if self.generator.chat_prompt([message])[1]:  # refused; keep it out of the history
            print(f"\nAssistant: {UNSAFE_ERROR}")
            return
        dialog, dropped = fit_history(self.generator, self.system, self.turns + [message],
                                      self.answer_room)
        max_seq_len = self.generator.model.params.max_seq_len
        if dialog is None:
            print(f"(that message is too long for max_seq_len={max_seq_len} with "
                  f"{self.answer_room} tokens kept for the answer; shorten it, or restart "
                  f"with a larger --max_seq_len or a smaller --max_gen_len)")
            return
        if dropped:
            print(f"(dropped the {dropped} oldest messages to stay within "
                  f"max_seq_len={max_seq_len})")
        reply = self.answer(dialog)
        kept = storable(self.generator.tokenizer, reply)
        if kept != reply and not self.told_tags:
            print("(chat tags in answers are left out of the conversation history)")
            self.told_tags = True
        turns = dialog[1:] if self.system else dialog
        self.turns = turns + [{"role": "assistant", "content": kept}]

    def answer(self, dialog: Dialog) -> str:
        """Stream the answer to `dialog`; Ctrl-C stops it, keeping what came so far."""
        print("\nAssistant: ", end="", flush=True)
        pieces = self.generator.stream_chat_completion(dialog, **self.sampling)
        reply = ""
        try:
            for piece in pieces:
                print(piece, end="", flush=True)
                reply += piece
        except KeyboardInterrupt:
            print("\n(answer stopped)", end="")
        finally:  # frees the generator for the next message
            close = getattr(pieces, "close", None)  # an Iterator need not have close()
            if close is not None:
                close()
        print()
        return reply


def chat(
    ckpt_dir: str = cli.DEMO,
    tokenizer_path: Optional[str] = None,
    system: Optional[str] = None,
    max_seq_len: int = 4096,
    temperature: float = 0.2,
    top_p: float = 0.95,
    max_gen_len: Optional[int] = None,
    prompt: Optional[List[str]] = None,
    prompts_file: Optional[str] = None,
    dtype: Optional[str] = None,
    device: Optional[str] = None,
    quantize: Optional[str] = None,
    draft: Optional[str] = None,
    draft_ckpt_dir: Optional[str] = None,
    draft_tokens: int = 4,
    stats: bool = True,
):
    r"""Chat with a Code Llama - Instruct model (by default the bundled demo model, which
    is a base model: expect code-like rather than helpful answers from it).

    Args:
        system: a system prompt, sent before the conversation (\n, \t, \r and \\ are
            read as escapes)
        max_gen_len: most tokens per answer (none: a quarter of max_seq_len); this many
            are kept free in max_seq_len for each answer
        prompt: a message to send instead of reading the keyboard; repeat the option
            for a conversation of several (\n, \t, \r and \\ are read as escapes)
        prompts_file: messages to send instead of reading the keyboard: a .json file
            holds a list of them, any other file is one message, read as is
    """
    from .generation import Llama

    check_system(system)
    scripted = cli.user_prompts(prompt, prompts_file)
    if max_gen_len is not None and max_gen_len < 1:
        raise ValueError(f"--max_gen_len must be a positive number of tokens, got {max_gen_len}")
    cli.check_draft(draft, draft_ckpt_dir, draft_tokens)
    build = dict(max_seq_len=max_seq_len, max_batch_size=1,
                 **cli.build_options(device, dtype, quantize))
    generator = Llama.build(ckpt_dir, tokenizer_path, **build)
    cli.use_draft(generator, draft, draft_ckpt_dir, draft_tokens, build)
    if stats:
        cli.watch_speed(generator)
    answer_room = max_gen_len or max(1, max_seq_len // 4)
    check_room(generator, system, answer_room, given=max_gen_len is not None)
    conversation = Conversation(generator, system, answer_room, dict(
        temperature=temperature, top_p=top_p, max_gen_len=max_gen_len))
    if scripted is not None:
        for line in scripted:
            print(f"\nYou: {line}")
            conversation.ask(line)
        return
    converse(conversation)


def converse(conversation: Conversation) -> None:
    """Read messages and commands from the keyboard (rank 0) until /exit or the end."""
    if cli.rank() == 0:
        if isinstance(sys.stdin, io.TextIOWrapper):  # undecodable bytes become U+FFFD
            sys.stdin.reconfigure(errors="replace")
        if sys.stdin.isatty():
            try:
                import readline  # noqa: F401 (input() gains line editing and history)
            except ImportError:  # Windows
                pass
    print("Chat with the model. /help lists the commands, /exit quits.")
    while True:
        line = read_line("\nYou: ")
        command = None if line is None else line.strip()
        if command is None or command == "/exit":
            return
        if command == "/help":
            print(COMMANDS)
        elif command == "/reset":
            conversation.turns = []
            print("(conversation reset)")
        elif command.startswith("/") and " " not in command:
            print(f"(unknown command {command}; /help lists the commands)")
        elif command:
            conversation.ask(line)


def check_system(system: Optional[str]) -> None:
    """Refuse, before loading the model, a system prompt that every answer would refuse."""
    if system is None:
        return
    if not isinstance(system, str):
        raise ValueError(f"--system must be text, got {system!r}")
    tags = [tag for tag in SPECIAL_TAGS if tag in system]
    if tags:
        raise ValueError(f"--system contains the chat tag(s) {', '.join(tags)}, which would "
                         f"get every message refused; remove them")


def check_room(generator, system: Optional[str], answer_room: int, given: bool) -> None:
    """The smallest message must fit in max_seq_len with answer_room tokens to spare
    (`given`: by --max_gen_len), and the system prompt must not encode to control
    tokens."""
    max_seq_len = generator.model.params.max_seq_len
    shortest = with_system_prompt(system, [{"role": "user", "content": "?"}])
    prompt, unsafe = generator.chat_prompt(shortest)
    if unsafe:
        raise ValueError("--system contains text that encodes to the model's control "
                         "tokens (such as <PRE> or <step>), which would get every message "
                         "refused; remove those markers")
    if len(prompt) + answer_room <= max_seq_len:
        return
    if given:
        raise ValueError(f"--max_gen_len {answer_room} leaves no room within --max_seq_len "
                         f"{max_seq_len} for a prompt (at least {len(prompt)} tokens with "
                         f"the chat tags{' and the system prompt' if system else ''}); lower "
                         f"it{', shorten --system' if system else ''} or raise --max_seq_len")
    if system:
        raise ValueError(f"--system takes {len(prompt)} of --max_seq_len {max_seq_len} tokens "
                         f"with the chat tags, leaving too little for a message and its "
                         f"answer ({answer_room} tokens); shorten --system or raise "
                         f"--max_seq_len")
    raise ValueError(f"--max_seq_len {max_seq_len} leaves no room for a message and its "
                     f"answer ({answer_room} tokens, a quarter); raise --max_seq_len")


def main(argv: Optional[List[str]] = None) -> None:
    """The `codellama-chat` command (also `python -m llama.chat`)."""
    cli.run(chat, argv, epilog=COMMANDS)


if __name__ == "__main__":
    main()
