"""Speed of Code Llama inference: prefill latency, decode tokens/s, time to the first
token, peak memory and the memory-bandwidth roofline, beside Hugging Face `transformers`
(eager, and with a static cache that `generate` compiles).

Random weights with the real shapes are made on the device (`Llama.from_preset`), so no
checkpoint is needed; `--ckpt_dir` loads a real one. From the checkout's root:

    python -m benchmarks.bench --preset 7b --decode compiled --prefill_lens 4096,16384
    python -m benchmarks.bench --preset 7b --decode compiled --prefill_chunk 100000 \\
        --long --prefill_lens none --batch_sizes none --peers none
    torchrun --nproc_per_node 2 -m benchmarks.bench --preset 13b --decode compiled \\
        --symmetric_memory --peers none
    python -m benchmarks.bench --device cpu --preset tiny --prefill_lens 32 --gen_len 8

What is timed. A prefill: `Llama.engine.prefill` of one random prompt (what generation runs
before its first token), the median of --repeats calls after --warmup. Decoding: the
median of --decode_repeats greedy generations after --warmup, each timed from its first
to its last new token (prefill excluded), ours through `Llama.engine.generate` and the
peers' through `generate`'s streamer, so both cover the same interval. The roofline is
the weights (less the input embedding) plus the KV cache read per step, over the
device-to-device copy bandwidth measured at the start. Every rank runs the same work;
rank 0 prints one table and writes `--out`.
"""

import argparse
from pathlib import Path
from typing import List, Optional

from benchmarks import common

PEERS = ("hf_eager", "hf_static")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_argument_group("model")
    model.add_argument("--preset", default="7b",
                       help="random weights of this size: 7b, 13b, 34b, 70b, tiny")
    model.add_argument("--ckpt_dir", help="a checkpoint folder instead of random weights")
    model.add_argument("--device", help="default: cuda if available, else cpu")
    model.add_argument("--dtype", choices=sorted(common.DTYPES),
                       help="default: bfloat16 on CUDA, float32 on CPU")
    model.add_argument("--seed", type=int, default=1)
    model.add_argument("--quantize", choices=["int8", "int4"],
                       help="weights of the linear layers in 8 or 4 bits (default: none)")
    common.add_mode_args(p)
    plan = p.add_argument_group("scenarios (comma-separated lists; none skips them)")
    plan.add_argument("--prefill_lens", type=common.int_list, default="512,4096,16384",
                      help="prompt lengths to prefill (default: %(default)s)")
    plan.add_argument("--batch_sizes", type=common.int_list, default="1,32",
                      help="batch sizes to decode (default: %(default)s)")
    plan.add_argument("--prompt_len", type=common.positive_int, default=16,
                      help="prompt length of decode scenarios (default: %(default)s)")
    plan.add_argument("--gen_len", type=common.positive_int, default=256,
                      help="tokens per decode (at least 2; default: %(default)s)")
    plan.add_argument("--temperature", type=float, default=0.0,
                      help="sampling temperature of our decode scenarios (default: "
                           "%(default)s, greedy; the peers always decode greedily)")
    plan.add_argument("--top_p", type=float, default=0.9,
                      help="nucleus mass when sampling (default: %(default)s)")
    plan.add_argument("--ragged", action="store_true",
                      help="also decode each batch with prompt lengths from half to twice "
                           "--prompt_len")
    plan.add_argument("--long", action="store_true",
                      help="also prefill one --long_len prompt and decode after it")
    plan.add_argument("--long_len", type=common.positive_int, default=100_000,
                      help="(default: %(default)s)")
    plan.add_argument("--long_gen_len", type=common.positive_int, default=32,
                      help="(at least 2; default: %(default)s)")
    plan.add_argument("--peers", type=common.names_from(PEERS), default="hf_eager,hf_static",
                      help="Hugging Face runs beside ours (default: %(default)s)")
    timing = p.add_argument_group("timing")
    timing.add_argument("--repeats", type=common.positive_int, default=5,
                        help="timed prefills per scenario (default: %(default)s)")
    timing.add_argument("--decode_repeats", type=common.positive_int, default=3,
                        help="timed generations per decode scenario (default: %(default)s)")
    timing.add_argument("--warmup", type=int, default=1,
                        help="untimed runs first (default: %(default)s)")
    timing.add_argument("--bandwidth_gib", type=float,
                        help="size of the bandwidth copy (default: 2 on CUDA, 0.125 else)")
    draft = p.add_argument_group("speculative decoding (Llama.configure(draft=...), "
                                 "speculation.py)")
    draft.add_argument("--draft",
                       help="run each decode scenario again with this draft: lookup, int4, "
                            "a checkpoint folder sharing the tokenizer, or preset:NAME "
                            "(random weights of a size, for step costs)")
    draft.add_argument("--draft_tokens", type=common.positive_int, default=4,
                       help="proposals per row per round (default: %(default)s)")
    draft.add_argument("--edit_file",
                       help="add a code-editing decode scenario on this source file (needs "
                            "--ckpt_dir, whose tokenizer encodes it)")
    draft.add_argument("--verify_widths", type=common.int_list, default="none",
                       help="time verify forwards of these numbers of tokens per row in each "
                            "decode scenario, e.g. 1,2,4,8 (default: %(default)s)")
    p.add_argument("--out", help="write the results as JSON to this file")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = parser()
    opts = p.parse_args(argv)
    for flag in ("gen_len", "long_gen_len"):
        if getattr(opts, flag) < 2:  # decode speed is timed from the first token to the last
            p.error(f"--{flag} must be at least 2 (decode speed is timed between the first "
                    f"and the last new token), got {getattr(opts, flag)}")
    if opts.edit_file and not opts.ckpt_dir:
        p.error("--edit_file needs --ckpt_dir (a model with a tokenizer)")
    if opts.edit_file and not Path(opts.edit_file).is_file():
        p.error(f"--edit_file {opts.edit_file} is not a file")
    return opts


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the benchmark; returns the results (also printed, and written to --out).
    Exits with status 1 if one of our scenarios failed."""
    opts = parse_args(argv)
    from benchmarks import measure  # torch and the library: only once the options are good
    return measure.run(opts)


if __name__ == "__main__":
    main()
