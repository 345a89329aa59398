"""Fill the <FILL> gap of each prompt from the code before and after it. Runs on the
bundled demo model by default:

    python example_infilling.py
    torchrun --nproc_per_node 1 example_infilling.py --ckpt_dir CodeLlama-7b/ --tokenizer_path CodeLlama-7b/tokenizer.model
"""

from pathlib import Path
from typing import Optional

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
):
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
    )
    prefixes = [p.split("<FILL>")[0] for p in PROMPTS]
    suffixes = [p.split("<FILL>")[1] for p in PROMPTS]
    results = generator.text_infilling(
        prefixes=prefixes,
        suffixes=suffixes,
        max_gen_len=max_gen_len,
        temperature=temperature,
        top_p=top_p,
    )
    for prompt, result in zip(PROMPTS, results):
        print("\n================= Prompt text =================\n")
        print(prompt)
        print("\n================= Filled text =================\n")
        print(result["full_text"])


if __name__ == "__main__":
    fire.Fire(main)
