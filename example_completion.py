r"""Complete code prompts. Runs on the bundled demo model by default:

    python example_completion.py
    python example_completion.py --prompt 'def fib(n):' --stop '\n\n'
    torchrun --nproc_per_node 1 example_completion.py --ckpt_dir CodeLlama-7b/ --tokenizer_path CodeLlama-7b/tokenizer.model
"""

from typing import List, Optional

from llama import cli

PROMPTS = [
    # A function whose body follows from its name and docstring.
    'def is_palindrome(text: str) -> bool:\n    """Return True if text reads the same backwards."""\n',
    # A small script that stops where the obvious next line begins.
    "import os\n\n\ndef list_python_files(folder):\n"
    "    for name in sorted(os.listdir(folder)):\n"
    "        if name.endswith('.py'):\n",
]


def main(
    ckpt_dir: str = cli.DEMO,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.2,
    top_p: float = 0.9,
    max_seq_len: int = 256,
    max_batch_size: int = 4,
    max_gen_len: Optional[int] = None,
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
    """Continue each code prompt: two built-in ones, or those of --prompt and
    --prompts_file."""
    from llama import Llama
    from llama.prompts import completion_prompt_tokens

    prompts = cli.user_prompts(prompt, prompts_file) or PROMPTS
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
    cli.check_prompts(generator, prompts,
                      lambda text: completion_prompt_tokens(generator.tokenizer, text))
    sampling = dict(max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, stop=stop)
    if stream:
        for text in prompts:
            pieces = generator.stream_completion(text, **sampling)  # checks the sampling
            print(text)
            print("> ", end="", flush=True)
            for piece in pieces:
                print(piece, end="", flush=True)
            print("\n\n==================================\n")
        return
    for batch in cli.batches(prompts, max_batch_size):
        for text, result in zip(batch, generator.text_completion(batch, **sampling)):
            print(text)
            print(f"> {result['generation']}")
            print("\n==================================\n")


if __name__ == "__main__":
    cli.run(main)
