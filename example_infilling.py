"""Fill the <FILL> gap of each prompt from the code before and after it. Runs on the
bundled demo model by default:

    python example_infilling.py
    torchrun --nproc_per_node 1 example_infilling.py --ckpt_dir CodeLlama-7b/ --tokenizer_path CodeLlama-7b/tokenizer.model
"""

from pathlib import Path
from typing import List, Optional

import fire

from llama import Llama

# The small model that ships in this repo, so the example runs with no download.
DEMO = str(Path(__file__).resolve().parent / "models" / "CodeLlama-demo")

PROMPTS = [
    # The body of a small function, between its docstring and its return.
    '''def count_words(path):
    """Return a dict mapping each word in the file to its count."""
    counts = {}
    with open(path) as f:
        <FILL>
    return counts
''',
    # A docstring, from the code that follows it.
    '''def celsius_to_fahrenheit(c: float) -> float:
    """<FILL>"""
    return c * 9 / 5 + 32
''',
    # The missing method of a class.
    '''class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    <FILL>

    def is_empty(self):
        return not self.items
''',
    # An argument list, from how the function is used below.
    '''import argparse

def parse_args():
    parser = argparse.ArgumentParser(description="Copy files.")
    parser.add_argument(<FILL>)
    return parser.parse_args()

args = parse_args()
print(args.source)
''',
]


def main(
    ckpt_dir: str = DEMO,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.0,
    top_p: float = 0.9,
    max_seq_len: int = 192,
    max_gen_len: int = 128,
    max_batch_size: int = 4,
    stream: bool = False,
    stop: Optional[List[str]] = None,
):
    """--stream prints the filled text as it is generated; --stop ends at those strings."""
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
    )
    sampling = dict(max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, stop=stop)
    pairs = [p.split("<FILL>") for p in PROMPTS]
    if stream:
        for prompt, (prefix, suffix) in zip(PROMPTS, pairs):
            print("\n================= Prompt text =================\n")
            print(prompt)
            print("\n================= Filled text =================\n")
            print(prefix, end="", flush=True)
            for piece in generator.stream_infilling(prefix, suffix, **sampling):
                print(piece, end="", flush=True)
            print(suffix)
        return
    results = generator.text_infilling(
        prefixes=[prefix for prefix, _ in pairs],
        suffixes=[suffix for _, suffix in pairs],
        **sampling,
    )
    for prompt, result in zip(PROMPTS, results):
        print("\n================= Prompt text =================\n")
        print(prompt)
        print("\n================= Filled text =================\n")
        print(result["full_text"])


if __name__ == "__main__":
    fire.Fire(main)
