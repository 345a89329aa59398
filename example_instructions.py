"""Answer instructions with an Instruct model. Runs on the bundled demo model by default
(which is a base model, so expect code-like rather than helpful answers there):

    python example_instructions.py
    torchrun --nproc_per_node 1 example_instructions.py --ckpt_dir CodeLlama-7b-Instruct/ --tokenizer_path CodeLlama-7b-Instruct/tokenizer.model
"""

from pathlib import Path
from typing import List, Optional

import fire

from llama import Llama

# The small model that ships in this repo, so the example runs with no download.
DEMO = str(Path(__file__).resolve().parent / "models" / "CodeLlama-demo")


def main(
    ckpt_dir: str = DEMO,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.2,
    top_p: float = 0.95,
    max_seq_len: int = 512,
    max_batch_size: int = 8,
    max_gen_len: Optional[int] = None,
    stream: bool = False,
    stop: Optional[List[str]] = None,
):
    """--stream prints each answer as it is generated; --stop ends at those strings."""
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
    )
    instructions = [
        [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}],
        [
            {"role": "system", "content": "Answer with a single shell command."},
            {"role": "user", "content": "How do I count the lines of every .py file in a folder?"},
        ],
        [
            {"role": "user", "content": "What does `yield` do in Python?"},
            {"role": "assistant", "content": "It turns a function into a generator that produces values lazily."},
            {"role": "user", "content": "Show a short example."},
        ],
    ]
    sampling = dict(max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, stop=stop)
    if stream:
        for dialog in instructions:
            for msg in dialog:
                print(f"{msg['role'].capitalize()}: {msg['content']}\n")
            print("> Assistant: ", end="", flush=True)
            for piece in generator.stream_chat_completion(dialog, **sampling):
                print(piece, end="", flush=True)
            print("\n\n==================================\n")
        return
    for dialog, result in zip(instructions, generator.chat_completion(instructions, **sampling)):
        for msg in dialog:
            print(f"{msg['role'].capitalize()}: {msg['content']}\n")
        print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
        print("\n==================================\n")


if __name__ == "__main__":
    fire.Fire(main)
