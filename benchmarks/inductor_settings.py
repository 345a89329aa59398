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

    torchrun --nproc_per_node 2 benchmarks/inductor_settings.py --preset 13b \\
        --symmetric_memory True --variants '[{}, {"triton.enable_pdl": True}]'
    python benchmarks/inductor_settings.py --preset tiny --device cpu \\
        --variants '[{}, {"coordinate_descent_tuning": False}]' --rounds 1
"""

import os
import statistics
import sys
import time
from pathlib import Path

import fire
import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama import Llama  # noqa: E402
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
         device: str = None):
    """variants: a list of dicts of torch._inductor.config settings ({} is the library's
    own). Returns one dict per variant: its settings, the steps whose tokens agree with the
    first variant's before the first difference, and ms per step in each round."""
    variants = list(variants)
    if not variants or not all(isinstance(v, dict) for v in variants):
        raise ValueError(f"--variants must be a list of dicts of inductor settings, e.g. "
                         f"'[{{}}, {{\"triton.enable_pdl\": True}}]'; got {variants!r}")
    # Every variant is one more compilation of decode_step. Past the limit of compilations
    # (decode.MAX_STEP_COMPILATIONS), a call would quietly run the step uncompiled: fail.
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        rows = compare(variants, preset, context, steps, rounds, replays, symmetric_memory,
                       device)
    if int(os.environ.get("RANK", 0)) == 0:
        for row in rows:
            print(f"{row['settings']}: {statistics.median(row['ms']):.3f} ms per step "
                  f"(rounds {', '.join(f'{ms:.3f}' for ms in row['ms'])}); tokens agree "
                  f"with the first variant's for {row['agreeing_steps']} of {steps} steps",
                  flush=True)
    return rows


def compare(variants, preset, context, steps, rounds, replays, symmetric_memory,
            device) -> list:
    """main's rows, measured within the dynamo limits main sets."""
    gen = Llama.from_preset(preset, max_seq_len=max(context, steps) + 1, max_batch_size=1,
                            device=device)
    gen.configure(symmetric_memory=symmetric_memory)
    device = gen.model.rope.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs = [step_runner(gen, settings) for settings in variants]
    rows = []
    # no_grad rather than inference_mode, as the library compiles its steps (decode.py).
    with torch.no_grad():
        tokens = [greedy_tokens(run, steps, device) for run in runs]  # also compiles
        for settings, chosen in zip(variants, tokens):
            rows.append({"settings": settings, "ms": [],
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
