"""Run under torchrun: a target and a draft at the launched model-parallel size; rank 0
saves the greedy completions with the draft and every rank's sampled ones."""

import sys

import torch
import torch.distributed as dist

from llama import Llama


def main(ckpt_dir: str, draft_dir: str, out_path: str):
    gen = Llama.build(ckpt_dir, max_seq_len=64, max_batch_size=4, device="cpu")
    draft = Llama.build(draft_dir, max_seq_len=64, max_batch_size=4, device="cpu")
    gen.configure(draft=draft, draft_tokens=3)
    greedy = gen.text_completion(["def fib(n):", "import re\nimport os\nimport re\n"],
                                 temperature=0, max_gen_len=12, logprobs=True)
    sampled = gen.generate([[1, 5, 9]] * 4, max_gen_len=12, temperature=0.9)[0]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, sampled)
    if dist.get_rank() == 0:
        torch.save({"greedy": greedy, "sampled": every}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
