"""Model parallelism gives the answers of one process: write a random checkpoint in Meta's
original format, run it at MP=1 and under torchrun at MP=N, compare greedy tokens and
logits. From the checkout's root:

    python -m benchmarks.check_mp write --out_dir /tmp/ck13 --preset 13b --n_layers 8 --shards 2
    python -m benchmarks.check_mp run --ckpt_dir /tmp/ck13 --out mp1.json --dtype float32
    torchrun --nproc_per_node 2 -m benchmarks.check_mp run --ckpt_dir /tmp/ck13 \
        --out mp2.json --dtype float32 --decode compiled --symmetric_memory
    python -m benchmarks.check_mp compare mp1.json mp2.json

Real widths with fewer layers keep the files small. The tokenizer is Meta's Llama 2 one
from tests/data (32,000 pieces), so the vocabulary is set to 32,000.
"""

import argparse
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

from benchmarks import common

# write, run and compare import torch and the library themselves: --help needs neither.
ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "data" / "llama2-tokenizer.model"
PROMPTS = ["def fibonacci(n):", "import numpy as np\n\nclass Matrix:\n",
           "# Sort a list of dictionaries by key\n", "SELECT name FROM users WHERE"]
PARAM_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "ffn_dim_multiplier",
              "norm_eps", "rope_theta")


def write(out_dir: str, preset: str = "13b", n_layers: int = 8, shards: int = 2,
          seed: int = 0):
    """Random bf16 weights of `preset`'s widths, saved as `shards` consolidated.NN.pth."""
    import torch

    from llama import Llama
    from llama.checkpoint import split_dim
    from llama.conversion import check_split, new_out_dir

    gen = Llama.from_preset(preset, max_seq_len=64, max_batch_size=1, seed=seed,
                            n_layers=n_layers, vocab_size=32000, dtype=torch.bfloat16)
    state = {k: v.cpu() for k, v in gen.model.state_dict().items()}
    # Shards must split every tensor evenly, into a folder holding no older shards.
    check_split(gen.model.params, {k: tuple(v.shape) for k, v in state.items()}, shards,
                Path(out_dir))
    out = new_out_dir(out_dir)
    for r in range(shards):
        part = {k: (v if split_dim(k) is None else v.chunk(shards, split_dim(k))[r]).clone()
                for k, v in state.items()}
        torch.save(part, out / f"consolidated.{r:02d}.pth")
    params = {k: v for k, v in asdict(gen.model.params).items() if k in PARAM_KEYS}
    (out / "params.json").write_text(json.dumps(params, indent=4))
    shutil.copy(TOKENIZER, out / "tokenizer.model")
    print(f"wrote {shards} shards of {preset} widths, {n_layers} layers, to {out}")


def run(ckpt_dir: str, out: str, gen_len: int = 32, dtype: Optional[str] = None,
        decode: Optional[str] = None, symmetric_memory: bool = False):
    """Greedy tokens and last-position logits of PROMPTS at the launched world size. The
    tokens come from generation (decode steps as `decode` and `symmetric_memory` make
    them), the logits from one plain forward pass over the whole prompts.
    dtype: e.g. float32 (default: the library's, bf16 on CUDA). Random weights give flat
    next-token distributions full of near-ties, which bf16 rounding flips; in float32 the
    only difference between world sizes is the order of the sums."""
    import torch

    from llama import Llama

    gen = Llama.build(ckpt_dir, max_seq_len=128, max_batch_size=len(PROMPTS),
                      dtype=getattr(torch, common.DTYPES[dtype]) if dtype else None)
    configure = common.configure_kwargs(decode, symmetric_memory=symmetric_memory)
    gen.configure(**configure)
    results = gen.text_completion(PROMPTS, temperature=0, max_gen_len=gen_len, logprobs=True)
    tokens = [gen.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    width = max(map(len, tokens))
    batch = torch.tensor([t + [0] * (width - len(t)) for t in tokens])
    logits = gen.model.forward(batch.to(gen.model.rope.device), 0)
    last = torch.stack([logits[i, len(t) - 1] for i, t in enumerate(tokens)]).cpu()
    common.write_json(out, {
        "world": torch.distributed.get_world_size(), "configure": configure,
        "dtype": str(next(gen.model.parameters()).dtype),
        "tokens": [r["tokens"] for r in results], "logits": last.tolist()})


def compare(a: str, b: str) -> bool:
    """Agreeing greedy tokens per prompt and the logits' relative difference of two run
    files; True if the logits agree to bf16 precision with the same top-1 tokens."""
    import torch

    x, y = json.loads(Path(a).read_text()), json.loads(Path(b).read_text())
    la, lb = torch.tensor(x["logits"]), torch.tensor(y["logits"])
    rel = ((la - lb).norm() / la.norm()).item()
    agree = []
    for ta, tb in zip(x["tokens"], y["tokens"]):
        n = next((i for i, (p, q) in enumerate(zip(ta, tb)) if p != q), min(len(ta), len(tb)))
        agree.append(n)
    same_top1 = (la.argmax(-1) == lb.argmax(-1)).all().item()
    for run in (x, y):
        print(f"MP={run['world']}: {run.get('dtype')}, configure {run.get('configure')}")
    print(f"MP={x['world']} vs MP={y['world']} ({x.get('dtype')}, {y.get('dtype')}): "
          f"all greedy tokens equal {x['tokens'] == y['tokens']}; logits rel. diff "
          f"{rel:.2e}, same top-1 {same_top1}, greedy tokens agreeing before the first "
          f"difference {agree} of {[len(t) for t in x['tokens']]}")
    ok = rel < 5e-2 and same_top1
    print("OK" if ok else "MISMATCH")
    return ok


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.check_mp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    w = commands.add_parser("write", help=write.__doc__)
    w.add_argument("--out_dir", required=True)
    w.add_argument("--preset", default="13b",
                   help="size whose widths to use (default: %(default)s)")
    w.add_argument("--n_layers", type=common.positive_int, default=8,
                   help="(default: %(default)s)")
    w.add_argument("--shards", type=common.positive_int, default=2,
                   help="(default: %(default)s)")
    w.add_argument("--seed", type=int, default=0)
    r = commands.add_parser("run", help="greedy tokens and logits at this world size")
    r.add_argument("--ckpt_dir", required=True)
    r.add_argument("--out", required=True, help="JSON file for compare")
    r.add_argument("--gen_len", type=common.positive_int, default=32,
                   help="(default: %(default)s)")
    r.add_argument("--dtype", choices=sorted(common.DTYPES),
                   help="default: the library's (bf16 on CUDA); float32 for equal tokens")
    r.add_argument("--decode", choices=common.DECODE_MODES,
                   help="decode steps (default: the library's default)")
    r.add_argument("--symmetric_memory", action="store_true",
                   help="at MP>1 on CUDA, sum over ranks with the fused kernel")
    c = commands.add_parser("compare", help="compare two run files; exit 1 on a mismatch")
    c.add_argument("a")
    c.add_argument("b")
    return p


def main(argv: Optional[List[str]] = None) -> None:
    opts = vars(parser().parse_args(argv))
    command = opts.pop("command")
    if command == "compare":
        sys.exit(0 if compare(**opts) else 1)
    {"write": write, "run": run}[command](**opts)


if __name__ == "__main__":
    main()
