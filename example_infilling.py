r"""Fill the <FILL> gap of each prompt from the code before and after it. Runs on the
bundled demo model by default:

    python example_infilling.py
    python example_infilling.py --prompt 'def add(a, b):\n    <FILL>\n\nprint(add(1, 2))\n'
    torchrun --nproc_per_node 1 example_infilling.py --ckpt_dir CodeLlama-7b/ --tokenizer_path CodeLlama-7b/tokenizer.model
"""

from typing import List, Optional

from llama import cli

FILL = "<FILL>"

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
    ckpt_dir: str = cli.DEMO,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.0,
    top_p: float = 0.9,
    max_seq_len: int = 192,
    max_gen_len: int = 128,
    max_batch_size: int = 4,
    stream: bool = False,
    stop: Optional[List[str]] = None,
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
    """Fill the gap marked <FILL> in each prompt: four built-in ones, or those of --prompt
    and --prompts_file (each with exactly one <FILL>).

    Args:
        max_gen_len: most tokens to generate per fill
    """
    from llama import Llama
    from llama.prompts import infilling_prompt_tokens

    prompts = cli.user_prompts(prompt, prompts_file) or PROMPTS
    pairs = [split_at_fill(i, text) for i, text in enumerate(prompts)]
    cli.check_draft(draft, draft_ckpt_dir, draft_tokens)
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        **cli.build_options(device, dtype, quantize),
    )
    cli.use_draft(generator, draft, draft_ckpt_dir, draft_tokens,
                  dict(max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                       **cli.build_options(device, dtype, quantize)))
    if stats:
        cli.watch_speed(generator)
    cli.check_prompts(generator, pairs,
                      lambda pair: infilling_prompt_tokens(generator.tokenizer, *pair))
    sampling = dict(max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, stop=stop)
    if stream:
        for text, (prefix, suffix) in zip(prompts, pairs):
            pieces = generator.stream_infilling(prefix, suffix, **sampling)
            show_prompt(text)
            print(prefix, end="", flush=True)
            for piece in pieces:
                print(piece, end="", flush=True)
            print(suffix)
        return
    for batch in cli.batches(list(zip(prompts, pairs)), max_batch_size):
        results = generator.text_infilling(
            prefixes=[prefix for _, (prefix, _) in batch],
            suffixes=[suffix for _, (_, suffix) in batch],
            **sampling,
        )
        for (text, _), result in zip(batch, results):
            show_prompt(text)
            print(result["full_text"])


def split_at_fill(index: int, text: str):
    parts = text.split(FILL)
    if len(parts) != 2:
        raise ValueError(f"prompt {index} has {len(parts) - 1} {FILL} markers; mark the one "
                         f"gap to fill with exactly one {FILL}")
    return parts


def show_prompt(text: str) -> None:
    print("\n================= Prompt text =================\n")
    print(text)
    print("\n================= Filled text =================\n")


if __name__ == "__main__":
    cli.run(main)
