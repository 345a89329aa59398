"""Which torch._inductor settings compile the fastest batch-1 decode step, measured in one
process: every variant runs on the same weights, cache and GPUs, so that only the
generated kernels differ. (Between processes the speed of 13B at MP=2 varies by up to 7%
with the same kernels, benchmarks/RESULTS.md, eighth session, which hides a gain of a few
percent unless many processes are run.)

Each variant compiles the decode step with the library's settings (decode.COMPILE_SETTINGS)
updated by its own and, on CUDA, captures it in a CUDA graph as generation does. Then:
- agreement: from position 0, every variant decodes `--steps` greedy tokens, each fed back
  as the next input, and reports for how many steps its tokens equal the first variant's
  (in float32 all of them; in bf16 the kernels' different summation orders may flip a
  near-tie of the random weights' logits after some steps);
- speed: the variants' steps run back to back with `--context` cached positions, in turns
  (the order reversed every other round), `--rounds` times, `--replays` steps each; prints
  ms per step per round and the medians.

`--rank_of N` builds, in one process on one GPU, the layers that one rank of MP=N holds (its
heads, its share of the feed-forward width and of the output rows): the step's kernels at
MP=N widths without the exchange between ranks. It compares settings for MP=N when only one
GPU is at hand; what the exchange costs is the difference to real MP=N runs on the same
machine, over several processes (a process's tuning moves a step by a few percent).

    torchrun --nproc_per_node 2 benchmarks/inductor_settings.py --preset 13b \\
        --symmetric_memory True --variants '[{}, {"triton.enable_pdl": True}]'
    python benchmarks/inductor_settings.py --preset 13b --rank_of 2 \\
        --variants '[{}, {"triton.enable_pdl": True}]'
    python benchmarks/inductor_settings.py --preset tiny --device cpu \\
        --variants '[{}, {"coordinate_descent_tuning": False}]' --rounds 1
"""

import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import fire
import torch
import torch._dynamo
from fairscale.nn.model_parallel import layers as fairscale_layers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llama.model  # noqa: E402
from llama import Llama, distributed  # noqa: E402
from llama.decode import GraphedDecoder, compile_step  # noqa: E402


def step_runner(gen: Llama, settings: dict):
    """f(tokens, positions) -> (tokens, logprobs): one greedy decode step compiled with
    `settings` (replayed from a CUDA graph on CUDA), attending over the whole cache (one
    compilation for all positions; positions a row has not reached are masked)."""
    whole = gen.model.params.max_seq_len
    if gen.model.rope.is_cuda:
        decoder = GraphedDecoder(gen.model, compile=True, inductor=settings)
        return lambda tokens, positions: decoder(tokens, positions, whole, 0.0, 1.0)
    compiled = compile_step(settings)
    return lambda tokens, positions: compiled(gen.model, tokens, positions, whole, 0.0, 1.0)


def one_rank_of(world: int, preset: str, **kwargs) -> Llama:
    """Llama.from_preset(preset, **kwargs) in this process alone, with the shapes one rank of
    MP=`world` holds: the layers are built as if `world` processes shared the model (and
    the memory check before allocating asks for one rank's share), while the process group
    (one process) makes the sum over ranks and the gathers identities. The input embedding
    is made whole (random, as from_preset makes it), as a rank has it after its gather; the
    logits cover this rank's share of the vocabulary."""
    if world < 1:
        raise ValueError(f"--rank_of must be at least 1, got {world}")
    if world > 1 and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError("--rank_of builds one rank's share in a single process; run it "
                         "with python, not torchrun")
    if world == 1:
        return Llama.from_preset(preset, **kwargs)
    as_if = lambda: world  # noqa: E731
    # Every place that reads the world size while a model is built.
    with mock.patch.object(llama.model, "get_model_parallel_world_size", as_if), \
            mock.patch.object(fairscale_layers, "get_model_parallel_world_size", as_if), \
            mock.patch.object(distributed, "model_parallel_world_size", as_if):
        gen = Llama.from_preset(preset, **kwargs)
    table = gen.model.tok_embeddings.weight
    g = torch.Generator(device=table.device).manual_seed(world)  # the same for every copy
    whole = torch.randn(table.shape[0], table.shape[1] * world, generator=g,
                        device=table.device, dtype=table.dtype)
    gen.model.tok_embeddings = torch.nn.Embedding.from_pretrained(whole)
    return gen


def greedy_tokens(run, steps: int, device) -> list:
    """`steps` greedy tokens from token 1 at position 0, each fed back as the next input."""
    token = torch.ones(1, dtype=torch.long, device=device)
    chosen = []
    for position in range(steps):
        token, _ = run(token, torch.tensor([position], device=device))
        chosen.append(token.item())
    return chosen


def agreeing_steps(tokens: list, reference: list) -> int:
    """How many tokens equal the reference's before the first that does not."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b),
                min(len(tokens), len(reference)))


def main(preset: str = "7b", variants=({},), context: int = 128, steps: int = 32,
         rounds: int = 3, replays: int = 100, symmetric_memory: bool = False,
         device: str = None, rank_of: int = 1, copies: int = 1):
    """variants: a list of dicts of torch._inductor.config settings ({} is the library's
    own). Returns one dict per variant and model copy: its settings, the copy, the steps
    whose tokens agree with the first row's before the first difference, and ms per step
    in each round.
    rank_of: N > 1 times one rank's share of MP=N in this single process (see one_rank_of).
    copies: models built one after another with the same weights (each in memory of its
    own), every variant timed on each: the same kernels on other memory (as long as
    inductor's caches are on, so that later copies take the first one's tuned kernels)."""
    variants = list(variants)
    if not variants or not all(isinstance(v, dict) for v in variants):
        raise ValueError(f"--variants must be a list of dicts of inductor settings, e.g. "
                         f"'[{{}}, {{\"triton.enable_pdl\": True}}]'; got {variants!r}")
    if copies < 1:
        raise ValueError(f"--copies must be at least 1, got {copies}")
    if rank_of > 1 and symmetric_memory:
        raise ValueError("--rank_of runs without any exchange between ranks, so it has no "
                         "use for --symmetric_memory; leave one of them out")
    # Every variant is one more compilation of decode_step. Past the limit of compilations
    # (decode.MAX_STEP_COMPILATIONS), a call would quietly run the step uncompiled: fail.
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        rows = compare(variants, preset, context, steps, rounds, replays, symmetric_memory,
                       device, rank_of, copies)
    if int(os.environ.get("RANK", 0)) == 0:
        for row in rows:
            copy = f" (model copy {row['copy']})" if copies > 1 else ""
            print(f"{row['settings']}{copy}: {statistics.median(row['ms']):.3f} ms per step "
                  f"(rounds {', '.join(f'{ms:.3f}' for ms in row['ms'])}); tokens agree "
                  f"with the first variant's for {row['agreeing_steps']} of {steps} steps",
                  flush=True)
    return rows


def compare(variants, preset, context, steps, rounds, replays, symmetric_memory,
            device, rank_of, copies) -> list:
    """main's rows, measured within the dynamo limits main sets."""
    gens = []
    for _ in range(copies):  # the same seed: the same weights
        gens.append(one_rank_of(rank_of, preset, max_seq_len=max(context, steps) + 1,
                                max_batch_size=1, device=device))
        gens[-1].configure(symmetric_memory=symmetric_memory)
    device = gens[0].model.rope.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cases = [(copy, settings) for copy in range(copies) for settings in variants]
    runs = [step_runner(gens[copy], settings) for copy, settings in cases]
    rows = []
    # no_grad rather than inference_mode, as the library compiles its steps (decode.py).
    with torch.no_grad():
        tokens = [greedy_tokens(run, steps, device) for run in runs]  # also compiles
        for (copy, settings), chosen in zip(cases, tokens):
            rows.append({"settings": settings, "copy": copy, "ms": [],
                         "agreeing_steps": agreeing_steps(chosen, tokens[0])})
        token = torch.ones(1, dtype=torch.long, device=device)
        position = torch.tensor([context - 1], device=device)
        for run in runs:  # a first step at this position, untimed
            run(token, position)
        for r in range(rounds):
            order = list(zip(runs, rows))
            for run, row in (order if r % 2 == 0 else reversed(order)):
                sync()
                start = time.perf_counter()
                for _ in range(replays):
                    run(token, position)
                sync()
                row["ms"].append(1000 * (time.perf_counter() - start) / replays)
    return rows


if __name__ == "__main__":
    fire.Fire(main)
