"""Run under torchrun: build each checkpoint folder given (Meta's format, any shard count,
or Hugging Face's) at the launched world size and save, on rank 0, the logits of the same
tokens for each, for the tests that compare them with MP=1."""

import sys

import torch

from llama import Llama


def main(out_path: str, *folders: str):
    logits = {}
    for folder in folders:
        gen = Llama.build(folder, max_seq_len=64, max_batch_size=2, device="cpu")
        tokens = torch.randint(0, gen.model.vocab_size, (2, 24),
                               generator=torch.Generator().manual_seed(11))
        logits[folder] = gen.model.forward(tokens, 0)
    if torch.distributed.get_rank() == 0:
        torch.save(logits, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
