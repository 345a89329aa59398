"""Complete code prompts. Runs on the bundled demo model by default:

    python example_completion.py
    torchrun --nproc_per_node 1 example_completion.py --ckpt_dir CodeLlama-7b/ --tokenizer_path CodeLlama-7b/tokenizer.model
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
    top_p: float = 0.9,
    max_seq_len: int = 256,
    max_batch_size: int = 4,
    max_gen_len: Optional[int] = None,
    stream: bool = False,
    stop: Optional[List[str]] = None,
):
    """--stream prints text as it is generated; --stop '["\\n\\n"]' ends at those strings."""
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
    )
    prompts = [
        # A function whose body follows from its name and docstring.
        'def is_palindrome(text: str) -> bool:\n    """Return True if text reads the same backwards."""\n',
        # A small script that stops where the obvious next line begins.
        "import os\n\n\ndef list_python_files(folder):\n"
        "    for name in sorted(os.listdir(folder)):\n"
        "        if name.endswith('.py'):\n",
    ]
    sampling = dict(max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, stop=stop)
    if stream:
        for prompt in prompts:
            print(prompt)
            print("> ", end="", flush=True)
            for piece in generator.stream_completion(prompt, **sampling):
                print(piece, end="", flush=True)
            print("\n\n==================================\n")
        return
    for prompt, result in zip(prompts, generator.text_completion(prompts, **sampling)):
        print(prompt)
        print(f"> {result['generation']}")
        print("\n==================================\n")


if __name__ == "__main__":
    fire.Fire(main)
