"""Talk to a Code Llama - Instruct model in the terminal.

    python -m llama.chat --ckpt_dir CodeLlama-7b-Instruct [--system "Answer in Python."]
    torchrun --nproc_per_node 2 -m llama.chat --ckpt_dir CodeLlama-13b-Instruct

Answers stream as they are generated. `/reset` forgets the conversation, `/exit` (or
end of input) quits. When the conversation no longer fits in max_seq_len, the oldest
exchanges are dropped (the system prompt stays) and a note says so. Under torchrun only
rank 0 reads the keyboard; it sends each line to the other ranks.
"""

from typing import List, Optional, Tuple

import fire
import torch.distributed as dist

from .generation import Llama
from .prompts import SPECIAL_TAGS, UNSAFE_ERROR, Dialog, Message
from .tokenizer import Tokenizer


def read_line(prompt: str) -> Optional[str]:
    """A line from rank 0's standard input, shared with every rank; None at end of input."""
    line = None
    if dist.get_rank() == 0:
        try:
            line = input(prompt)
        except EOFError:
            line = None
    if dist.get_world_size() > 1:
        box = [line]
        dist.broadcast_object_list(box, src=0)
        line = box[0]
    return line


def with_system_prompt(system: Optional[str], turns: List[Message]) -> Dialog:
    return ([{"role": "system", "content": system}] if system else []) + list(turns)


def fit_history(generator: Llama, system: Optional[str], turns: List[Message],
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


def main(
    ckpt_dir: str,
    tokenizer_path: Optional[str] = None,
    system: Optional[str] = None,
    max_seq_len: int = 4096,
    temperature: float = 0.2,
    top_p: float = 0.95,
    max_gen_len: Optional[int] = None,
):
    if max_gen_len is not None and max_gen_len < 1:
        raise ValueError(f"--max_gen_len must be a positive number of tokens, got {max_gen_len}")
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len,
                            max_batch_size=1)
    answer_room = max_gen_len or max(1, max_seq_len // 4)
    shortest = with_system_prompt(system, [{"role": "user", "content": "?"}])
    smallest_prompt = len(generator.chat_prompt(shortest)[0])
    if smallest_prompt + answer_room > max_seq_len:
        raise ValueError(f"--max_gen_len {answer_room} leaves no room within --max_seq_len "
                         f"{max_seq_len} for a prompt (at least {smallest_prompt} tokens with "
                         f"the chat tags{' and the system prompt' if system else ''}); lower "
                         f"it or raise --max_seq_len")
    turns: List[Message] = []
    print("Chat with the model. /reset forgets the conversation, /exit quits.")
    while True:
        line = read_line("\nYou: ")
        if line is None or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            turns = []
            print("(conversation reset)")
            continue
        if not line.strip():
            continue
        message = {"role": "user", "content": line}
        if generator.chat_prompt([message])[1]:  # refused; keep it out of the history
            print(f"\nAssistant: {UNSAFE_ERROR}")
            continue
        dialog, dropped = fit_history(generator, system, turns + [message], answer_room)
        if dialog is None:
            print(f"(that message is too long for max_seq_len={max_seq_len} with "
                  f"{answer_room} tokens kept for the answer; shorten it, or restart with a "
                  f"larger --max_seq_len or a smaller --max_gen_len)")
            continue
        if dropped:
            print(f"(dropped the {dropped} oldest messages to stay within "
                  f"max_seq_len={max_seq_len})")
        turns = dialog[1:] if system else dialog
        print("\nAssistant: ", end="", flush=True)
        reply = ""
        for piece in generator.stream_chat_completion(dialog, temperature, top_p, max_gen_len):
            print(piece, end="", flush=True)
            reply += piece
        print()
        kept = storable(generator.tokenizer, reply)
        if kept != reply:
            print("(chat tags in that answer are left out of the conversation history)")
        turns.append({"role": "assistant", "content": kept})


if __name__ == "__main__":
    fire.Fire(main)
