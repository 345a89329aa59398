"""Accuracy of quantized weights (the bundled demo model by default): held-out perplexity
and greedy agreement with the float32 model, with and without the output projection
quantized.

    PYTHONPATH=. python benchmarks/quant_accuracy.py [--every 6] [--out out/acc.json]
    PYTHONPATH=. python benchmarks/quant_accuracy.py --model_dir CodeLlama-7b --device cuda

Perplexity: tools/eval_demo_model.py's `perplexity` (windows of --max_seq_len tokens of
the concatenated held-out files, every token but a window's first scored) over every
--every-th held-out file of tools/train_demo_model.py's "test" split, in path order.
Greedy agreement: --prompts prompts, each the end (up to 40 lines) of a held-out file cut
just after a `def` line; --gen_len tokens generated greedily by every variant; for each
prompt, the tokens generated before the first difference from the float32 model's. The
score is their sum over the sum of the float32 model's lengths (1.0: all identical).

Each quantized variant is the float32 model quantized in place (`quantize`) with the plain kernel,
which computes exactly what a model holding the dequantized weights computes (the CPU
kernels match it within 1e-3, tests/test_quantize*.py); loading quantized gives the same
pieces (tests/test_quantize_model.py).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from eval_demo_model import perplexity  # noqa: E402
from train_demo_model import FULL, list_corpus  # noqa: E402

from llama import Llama  # noqa: E402
from llama.quant_kernels import select_kernel, use_kernel  # noqa: E402
from llama.quantize import quantize  # noqa: E402

# name: (quantization mode, "bfloat16" or None, layers left unquantized)
VARIANTS = {
    "float32": (None, ()),
    "bfloat16": ("bfloat16", ()),  # the whole model in bf16: the usual GPU dtype
    "int8": ("int8", ("output",)),
    "int8+output": ("int8", ()),
    "int4": ("int4", ("output",)),
    "int4+output": ("int4", ()),
}


def prompts(files, n: int, tok) -> list:
    """Token lists: held-out files cut after their first `def` line, 40 lines at most."""
    found = []
    for _, text in files:
        lines = text.splitlines(keepends=True)
        cut = next((i for i, line in enumerate(lines) if line.lstrip().startswith("def ")), None)
        if cut is not None:
            found.append(tok.encode("".join(lines[max(0, cut - 39):cut + 1]), bos=True, eos=False))
        if len(found) == n:
            break
    return found


def agreement(reference, other) -> float:
    same = 0
    for want, got in zip(reference, other):
        same += next((i for i, (a, b) in enumerate(zip(want, got)) if a != b),
                     min(len(want), len(got)))
    return same / sum(len(want) for want in reference)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default=str(ROOT / "models" / "CodeLlama-demo"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (float32 either way)")
    parser.add_argument("--every", type=int, default=6, help="every n-th held-out file")
    parser.add_argument("--max_seq_len", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--gen_len", type=int, default=64)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    files = list_corpus(FULL)[0]["test"]
    scored = files[::args.every]
    results, reference = {}, None
    for name in args.variants:
        start = time.time()
        mode, skip = VARIANTS[name]
        gen = Llama.build(args.model_dir, max_seq_len=args.max_seq_len, max_batch_size=8,
                          device=args.device, dtype=torch.float32)
        if mode == "bfloat16":
            gen.model.to(torch.bfloat16)
        elif mode:
            quantize(gen.model, mode, skip=skip)
            use_kernel(gen.model, select_kernel(args.device, mode, torch.float32, "plain"),
                       torch.float32)
        ppl = perplexity(gen, scored, args.max_seq_len, 8)
        asked, tokens = prompts(files, args.prompts, gen.tokenizer), []
        for batch in range(0, len(asked), 8):
            tokens += gen.generate(asked[batch:batch + 8], args.gen_len, temperature=0.0)[0]
        reference = reference or tokens
        results[name] = dict(perplexity=ppl["perplexity"], scored_tokens=ppl["scored_tokens"],
                             greedy_agreement=agreement(reference, tokens),
                             seconds=round(time.time() - start, 1))
        print(name, json.dumps(results[name]), flush=True)
    base = results.get("float32", {}).get("perplexity")
    for name, result in results.items():
        if base:
            result["perplexity_vs_float32"] = result["perplexity"] / base - 1
        print(f"{name:12s} perplexity {result['perplexity']:.4f} "
              f"({result.get('perplexity_vs_float32', 0):+.2%}), greedy agreement "
              f"{result['greedy_agreement']:.1%}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(
            files=len(scored), every=args.every, max_seq_len=args.max_seq_len,
            prompts=args.prompts, gen_len=args.gen_len, torch=torch.__version__,
            results=results), indent=1))


if __name__ == "__main__":
    main()
