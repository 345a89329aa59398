"""Answer instructions with an Instruct model. Runs on the bundled demo model by default
(which is a base model, so expect code-like rather than helpful answers there):

    python example_instructions.py
    python example_instructions.py --prompt 'Write a Python function that reverses a list.'
    torchrun --nproc_per_node 1 example_instructions.py --ckpt_dir CodeLlama-7b-Instruct/ --tokenizer_path CodeLlama-7b-Instruct/tokenizer.model
"""

from typing import List, Optional

from llama import cli

INSTRUCTIONS = [
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


def main(
    ckpt_dir: str = cli.DEMO,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.2,
    top_p: float = 0.95,
    max_seq_len: int = 512,
    max_batch_size: int = 8,
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
    r"""Answer each instruction as the assistant: three built-in dialogs, or those of
    --prompt and --prompts_file.

    Args:
        prompt: an instruction (one user message) to answer instead of the built-in
            dialogs; repeat the option for more (\n, \t, \r and \\ are
            read as escapes)
        prompts_file: a file of instructions: a .json file holds a list, each item one
            user message or a whole dialog (a list of {"role", "content"} messages); any
            other file is one user message, read as is
    """
    from llama import Llama

    given = cli.user_prompts(prompt, prompts_file, dialogs=True)
    dialogs = INSTRUCTIONS if given is None else [
        item if isinstance(item, list) else [{"role": "user", "content": item}]
        for item in given]
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
    cli.check_prompts(generator, dialogs, lambda dialog: run_tokens(generator, dialog),
                      label="dialog")
    sampling = dict(max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, stop=stop)
    if stream:
        for dialog in dialogs:
            pieces = generator.stream_chat_completion(dialog, **sampling)
            show_dialog(dialog)
            print("> Assistant: ", end="", flush=True)
            for piece in pieces:
                print(piece, end="", flush=True)
            print("\n\n==================================\n")
        return
    for batch in cli.batches(dialogs, max_batch_size):
        for dialog, result in zip(batch, generator.chat_completion(batch, **sampling)):
            show_dialog(dialog)
            answer = result["generation"]
            print(f"> {answer['role'].capitalize()}: {answer['content']}")
            print("\n==================================\n")


def run_tokens(generator, dialog):
    """The dialog's prompt tokens, or None for one with chat tags in it, which
    chat_completion answers with an error message instead of running it."""
    tokens, unsafe = generator.chat_prompt(dialog)
    return None if unsafe else tokens


def show_dialog(dialog) -> None:
    for msg in dialog:
        print(f"{msg['role'].capitalize()}: {msg['content']}\n")


if __name__ == "__main__":
    cli.run(main)
