"""Run under torchrun: build a checkpoint at the launched world size and save, on rank 0,
its logits and greedy generations for the test that compares them with MP=1; or, with
the mode "compile", one decode step compiled with torch.compile next to the eager one;
or, with "quantize", the logits and greedy generations of the int8 and int4 builds
(with "prequantized", of pre-quantized folders)."""

import os
import sys

import torch

from llama import Llama
from llama.sampling import decode_step


def compiled_step(gen: Llama, out_path: str):
    import torch._dynamo
    torch._dynamo.utils.counters.clear()
    tokens = torch.randint(0, gen.model.vocab_size, (2, 9),
                           generator=torch.Generator().manual_seed(12))
    positions = torch.tensor([8, 8])
    with torch.no_grad():  # as GraphedDecoder traces it
        gen.model.forward_hidden(tokens[:, :8], 0)
        eager = decode_step(gen.model, tokens[:, 8], positions, 9, 0.0, 0.9)
        compiled = torch.compile(decode_step, dynamic=False)(
            gen.model, tokens[:, 8], positions, 9, 0.0, 0.9)
    if torch.distributed.get_rank() == 0:
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        torch.save({"eager": eager, "compiled": compiled, "graph_breaks": breaks}, out_path)


def seeds_per_rank(ckpt_dir: str, out_path: str):
    try:
        Llama.build(ckpt_dir, max_seq_len=64, max_batch_size=4, device="cpu",
                    seed=int(os.environ["RANK"]))
        error = None
    except ValueError as e:
        error = str(e)
    if os.environ["RANK"] == "0":
        torch.save({"error": error}, out_path)


def quantized(ckpt_dir: str, out_path: str, prequantized: bool):
    """Logits and greedy text of the int8 and int4 builds of ckpt_dir, or, with
    `prequantized`, of each folder in ckpt_dir (os.pathsep-separated) as it is."""
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(11))
    builds = ({folder: None for folder in ckpt_dir.split(os.pathsep)} if prequantized
              else {mode: mode for mode in ("int8", "int4")})
    results = {}
    for name, mode in builds.items():
        gen = Llama.build(ckpt_dir if mode else name, max_seq_len=64, max_batch_size=4,
                          device="cpu", quantize=mode)
        greedy = gen.text_completion(["def fib(n):", "import re\n"], temperature=0,
                                     max_gen_len=16)
        results[name] = {"logits": gen.model.forward(tokens, 0), "greedy": greedy}
    if torch.distributed.get_rank() == 0:
        torch.save(results, out_path)


def main(ckpt_dir: str, out_path: str, mode: str = "generate"):
    if mode == "seeds":
        return seeds_per_rank(ckpt_dir, out_path)
    if mode in ("quantize", "prequantized"):
        return quantized(ckpt_dir, out_path, mode == "prequantized")
    gen = Llama.build(ckpt_dir, max_seq_len=64, max_batch_size=4, device="cpu")
    if mode == "compile":
        return compiled_step(gen, out_path)
    tokens = torch.randint(0, gen.model.vocab_size, (2, 24),
                           generator=torch.Generator().manual_seed(11))
    logits = gen.model.forward(tokens, 0)
    greedy = gen.text_completion(["def fib(n):", "import re\n"], temperature=0, max_gen_len=16,
                                 logprobs=True)
    if torch.distributed.get_rank() == 1:
        torch.rand(1000)  # user code drawing random numbers on one rank only
    sampled = gen.text_completion(["def fib(n):"], temperature=0.8, max_gen_len=16)
    if torch.distributed.get_rank() == 0:
        torch.save({"logits": logits, "greedy": greedy, "sampled": sampled,
                    "local_heads": gen.model.layers[0].attention.n_local_heads}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
