"""Run under torchrun: build a checkpoint at the launched world size and save, on rank 0,
its logits and greedy generations for the test that compares them with MP=1."""

import sys

import torch

from llama import Llama


def main(ckpt_dir: str, out_path: str):
    gen = Llama.build(ckpt_dir, max_seq_len=64, max_batch_size=4, device="cpu")
    tokens = torch.randint(0, gen.model.vocab_size, (2, 24),
                           generator=torch.Generator().manual_seed(11))
    logits = gen.model.forward(tokens, 0)
    greedy = gen.text_completion(["def fib(n):", "import re\n"], temperature=0, max_gen_len=16,
                                 logprobs=True)
    sampled = gen.text_completion(["def fib(n):"], temperature=0.8, max_gen_len=16)
    if torch.distributed.get_rank() == 0:
        torch.save({"logits": logits, "greedy": greedy, "sampled": sampled,
                    "local_heads": gen.model.layers[0].attention.n_local_heads}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
