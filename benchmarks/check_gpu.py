"""Correctness of the fast (bf16, CUDA) path against a float32 CPU run of the same weights.

Random weights are made once in float32 on the CPU (`Llama.from_preset`) and copied into a
model on `--device` in `--dtype` (`checkpoint.load_into`). Then:

- the logits of one forward pass are compared by relative error (~1e-2 expected for bf16);
- greedy generation of a ragged batch of prompts (through `Llama.generate`, so whatever
  decode path it takes is what is checked) is compared token by token. Low precision may
  change a token where two are nearly tied: at the first divergence the token the test
  model picked must be one of the float32 model's top 2 there.

- sampled generation follows each call's temperature and top_p: sampling at one setting
  and then, with the same seed, at another gives the tokens that new decode runners give
  at the second (on CUDA the first call captured the sampling graph, which the second
  replays with its own settings; the new runners capture anew), not the first's.

Exit status 1 on a real mismatch. On CPU with float32 the two runs must agree exactly.
From the checkout's root:

    python -m benchmarks.check_gpu                   # cuda, bfloat16
    python -m benchmarks.check_gpu --device cpu      # float32 vs float32
    python -m benchmarks.check_gpu --device cpu --dtype bfloat16
"""

from __future__ import annotations  # annotations name torch types: not imported for --help

import argparse
import json
import sys
from typing import TYPE_CHECKING, Callable, List, Optional

from benchmarks import common

if TYPE_CHECKING:
    import torch

    from llama import Llama

# A little bigger than the "tiny" preset (GQA, 4 layers), still instant on any device.
SHAPES = dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, multiple_of=64)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


def run(device: str = "cuda", dtype: Optional[str] = None, preset: str = "tiny", prompts: int = 6,
        gen_len: int = 48, long_prompt: int = 250, seed: int = 0,
        max_rel_err: Optional[float] = None, decode: Optional[str] = None,
        load: Optional[Callable] = None) -> dict:
    """The check as a dict: {"ok", "logits_rel_err", "prompts": [...]}. A divergence is a
    near-tie when the test token is in the float32 top 2 and trails the float32 top-1 by
    at most 10 x (logits relative error) x (RMS of the float32 logits there). `load`
    copies the weights into the test model (default: checkpoint.load_into, the path
    Llama.build takes)."""
    import torch

    from llama import Llama
    from llama.checkpoint import load_into
    from llama.loading import empty_model

    load = load or load_into
    device = torch.device(device)
    dt = common.dtype_for(dtype, device)
    exact = dt == torch.float32 and device.type == "cpu"  # the very same computation
    limit = max_rel_err or (1e-4 if dt == torch.float32 else 5e-2)
    shapes = SHAPES if preset == "tiny" else {}
    g = torch.Generator().manual_seed(seed)
    # Short prompts of random lengths beside a long one: rows at very different positions
    # in one batch, as ragged batches decode.
    lens = [int(n) for n in torch.randint(3, 40, (prompts - 1,), generator=g)] + [long_prompt]
    # Room for more rows than prompts: CUDA graphs run the batch padded to a power of two
    # (6 prompts as 8 rows), which the check should go through.
    kw = dict(max_seq_len=max(max(lens) + gen_len, 64), max_batch_size=prompts + 2,
              seed=seed)
    ref = Llama.from_preset(preset, device="cpu", dtype=torch.float32, **kw, **shapes)
    # Load before wrapping in Llama, as Llama.build does: on CUDA the wrapper fuses the
    # projections from the weights the model holds at that moment.
    model = empty_model(ref.model.params, device, dt)
    load(model, ref.model.state_dict(), "float32 copy", device, dt)
    test = Llama(model, None)
    if decode is not None:
        test.configure(decode=decode)
    vocab = ref.model.vocab_size
    prompt_tokens = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]

    tokens = torch.randint(3, vocab, (2, 64), generator=g)
    want = ref.model.forward(tokens, 0)
    got = test.model.forward(tokens.to(device), 0)
    logits_err = rel_err(got, want)

    gen = dict(max_gen_len=gen_len, temperature=0.0, stop_token=-1)
    ref_out, _ = ref.generate(prompt_tokens, **gen)
    test_out, _ = test.generate(prompt_tokens, **gen)
    sampling_ok = sampling_follows_each_call(test, prompt_tokens, gen_len, seed)
    rows, ok = [], logits_err <= limit and sampling_ok
    for prompt, a, b in zip(prompt_tokens, ref_out, test_out):
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        row = {"prompt_len": len(prompt), "agreeing_tokens": agree, "generated": len(b)}
        if len(a) != len(b) or len(b) != gen_len:
            row["problem"] = f"lengths {len(a)} (float32) vs {len(b)} (test), wanted {gen_len}"
        elif agree < gen_len:  # first divergence: a near-tie in float32?
            logits = ref.model.forward(torch.tensor([prompt + a[:agree]]), 0)[0, -1]
            top2 = logits.topk(2)
            allowed = 10 * max(logits_err, 1e-3) * logits.pow(2).mean().sqrt().item()
            row.update(float32_top2=top2.indices.tolist(), test_token=b[agree],
                       float32_gap=(top2.values[0] - logits[b[agree]]).item(),
                       allowed_gap=allowed)
            if exact or b[agree] not in row["float32_top2"] or row["float32_gap"] > allowed:
                row["problem"] = "test token is not a float32 near-tie"
        ok &= "problem" not in row
        rows.append(row)
    return {"ok": bool(ok), "device": str(device), "dtype": str(dt).replace("torch.", ""),
            "logits_rel_err": logits_err, "max_rel_err": limit, "gen_len": gen_len,
            "sampling_follows_each_call": sampling_ok, "prompts": rows}


def sampling_follows_each_call(test: Llama, prompt_tokens, gen_len: int, seed: int) -> bool:
    """Sampled tokens at a second setting after a first (same seed; on CUDA the second
    replays the graph the first captured) equal those of new decode runners at the second
    setting (which capture anew), and differ from the first setting's."""
    import torch

    def sample(temperature, top_p):
        torch.manual_seed(seed)
        return test.generate(prompt_tokens, max_gen_len=gen_len, temperature=temperature,
                             top_p=top_p, stop_token=-1)[0]

    renew_steps(test)
    first = sample(0.8, 0.9)
    second = sample(1.5, 0.97)
    renew_steps(test)
    fresh = sample(1.5, 0.97)
    return second == fresh and second != first


def renew_steps(gen: Llama) -> None:
    """New decode-step runners for `gen` (no captured graphs), with the same settings."""
    mode = gen.settings["decode"]
    gen.configure(decode="eager").configure(decode=mode)


def summary(report: dict) -> str:
    agree = [r["agreeing_tokens"] for r in report["prompts"]]
    return (f"{'OK' if report['ok'] else 'MISMATCH'}: {report['dtype']} on {report['device']} "
            f"vs float32 CPU: logits rel. error {report['logits_rel_err']:.2e} (limit "
            f"{report['max_rel_err']:.0e}); tokens agreeing before divergence {agree} of "
            f"{report['gen_len']}; sampling follows each call's settings: "
            f"{report['sampling_follows_each_call']}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.check_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="default: %(default)s")
    p.add_argument("--dtype", choices=sorted(common.DTYPES),
                   help="of the test model (default: bfloat16 on CUDA, float32 elsewhere)")
    p.add_argument("--preset", default="tiny",
                   help="model shapes; tiny is made a little bigger (default: %(default)s)")
    p.add_argument("--prompts", type=common.positive_int, default=6,
                   help="prompts in the batch, the last one long (default: %(default)s)")
    p.add_argument("--gen_len", type=common.positive_int, default=48,
                   help="greedy tokens per prompt (default: %(default)s)")
    p.add_argument("--long_prompt", type=common.positive_int, default=250,
                   help="length of the last prompt (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode", choices=common.DECODE_MODES,
                   help="decode mode to check (default: the library's default)")
    p.add_argument("--max_rel_err", type=float,
                   help="logits limit (default: 1e-4 in float32, 5e-2 otherwise)")
    return p


def main(argv: Optional[List[str]] = None) -> dict:
    report = run(**vars(parser().parse_args(argv)))
    print(json.dumps(report, indent=2))
    print(summary(report))
    if not report["ok"]:
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
