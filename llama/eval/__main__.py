"""python -m llama.eval BENCHMARK ... (also installed as `codellama-eval`).

The arguments are parsed before anything imports torch; run.py does the work.
"""

import argparse
import sys
from typing import List, Optional

EXAMPLES = """examples:
  python -m llama.eval humaneval --ckpt_dir CodeLlama-7b
  python -m llama.eval humaneval --ckpt_dir CodeLlama-7b --n_samples 200   # pass@10/100
  python -m llama.eval infilling --ckpt_dir CodeLlama-7b --task single-line --format spm
  python -m llama.eval mbpp --ckpt_dir CodeLlama-7b
  python -m llama.eval perplexity --ckpt_dir CodeLlama-7b --files some/python/folder
  python -m llama.eval humaneval --samples samples.jsonl      # score samples, no model
  torchrun --nproc_per_node 2 -m llama.eval humaneval --ckpt_dir CodeLlama-13b
docs/eval.md describes the protocol and the paper's numbers."""


def model_options(p: argparse.ArgumentParser, max_seq_len: int = 2048) -> None:
    p.add_argument("--ckpt_dir", help="model folder (Meta or Hugging Face layout)")
    p.add_argument("--max_seq_len", type=int, default=max_seq_len,
                   help=f"KV cache length: prompt plus generation (default {max_seq_len})")
    p.add_argument("--batch_size", type=int, default=4, help="prompts per forward pass")
    p.add_argument("--quantize", default=None,
                   help="passed to Llama.build(quantize=...) (default: no quantization)")
    p.add_argument("--draft", default=None,
                   help="speculative decoding: lookup, int4, or a draft model's folder "
                        "(same output when greedy; default: none)")
    p.add_argument("--draft_tokens", type=int, default=4,
                   help="tokens the draft proposes per step (default 4)")
    p.add_argument("--seed", type=int, default=1, help="sampling seed (default 1)")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems/files")
    p.add_argument("--out", default=None,
                   help="results JSON lines file; a rerun resumes it (default: "
                        "eval-results/<benchmark>.jsonl; with --samples: "
                        "<samples>_results.jsonl)")


def sampling_options(p: argparse.ArgumentParser, max_gen_len: int) -> None:
    p.add_argument("--n_samples", type=int, default=1,
                   help="samples per problem (1: pass@1; 200 as in the paper for pass@100)")
    p.add_argument("--temperature", type=float, default=None,
                   help="default 0 (greedy) with one sample, else 0.8")
    p.add_argument("--top_p", type=float, default=0.95, help="default 0.95")
    p.add_argument("--max_gen_len", type=int, default=max_gen_len,
                   help=f"tokens generated at most per sample (default {max_gen_len})")
    p.add_argument("--data", default=None, help="the benchmark's data file (default: "
                   "the packaged or downloaded official file)")
    p.add_argument("--samples", default=None,
                   help="score this JSON lines file of {task_id, completion} instead of "
                        "generating (no model needed)")
    p.add_argument("--timeout", type=float, default=3.0,
                   help="seconds each test program may run (default 3)")
    p.add_argument("--memory_mb", type=int, default=4096,
                   help="address-space limit of each test program (default 4096)")
    p.add_argument("--site_packages", action="store_true",
                   help="let test programs import installed packages (default: the "
                        "standard library only)")
    p.add_argument("--workers", type=int, default=None,
                   help="test programs run at once (default: the number of CPUs)")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="python -m llama.eval", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a Code Llama model on the paper's benchmarks, with "
                    "generated code run in a sandbox.")
    sub = root.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    # (description, max_gen_len, max_seq_len): MBPP's longest 3-shot prompt (task 493, a
    # long list of floats in its tests) is about 4,400 tokens.
    commands = {
        "humaneval": ("HumanEval, 0-shot completion (164 problems)", 512, 2048),
        "infilling": ("HumanEval infilling (PSM or SPM)", 256, 2048),
        "mbpp": ("MBPP, 3-shot (500 test problems)", 512, 5120),
    }
    for name, (text, max_gen_len, max_seq_len) in commands.items():
        p = sub.add_parser(name, help=text, description=text)
        model_options(p, max_seq_len)
        sampling_options(p, max_gen_len)
        if name == "infilling":
            p.add_argument("--task", default="single-line", choices=[
                "single-line", "multi-line", "random-span", "random-span-light"])
            p.add_argument("--format", default="psm", choices=["psm", "spm"],
                           help="psm: prefix first; spm: suffix first (suffix_first=True)")
    p = sub.add_parser("perplexity", help="perplexity on a folder of source files",
                       description="Perplexity and bits per byte on a folder of files.")
    model_options(p)
    p.add_argument("--files", required=True, help="folder of files to score")
    p.add_argument("--pattern", default="*.py", help="file name pattern (default *.py)")
    return root


def check(args: argparse.Namespace) -> argparse.Namespace:
    """Refuse contradictory options before any model is loaded."""
    scoring_only = getattr(args, "samples", None) is not None
    if not scoring_only and not args.ckpt_dir:
        raise ValueError("--ckpt_dir is needed (or --samples FILE to score samples)")
    for name in ("max_seq_len", "batch_size", "limit", "n_samples", "max_gen_len",
                 "workers", "memory_mb"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    if getattr(args, "n_samples", None) is not None:
        if args.temperature is None:
            args.temperature = 0.0 if args.n_samples == 1 else 0.8
        if args.n_samples > 1 and args.temperature <= 0 and not scoring_only:
            raise ValueError(f"greedy decoding (temperature {args.temperature}) gives "
                             f"{args.n_samples} identical samples; use --temperature 0.8 "
                             f"(the paper's setting for pass@10/100) or --n_samples 1")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        check(args)
    except ValueError as e:
        parser().error(str(e))
    from ..cli import USER_ERRORS, user_errors
    from . import run  # imports torch only when a model is needed

    # A missing folder, a bad --samples file, no network for the data: one line, exit 2.
    with user_errors(USER_ERRORS + (ConnectionError,)):
        return run.main(args)


if __name__ == "__main__":
    sys.exit(main())
