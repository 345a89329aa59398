"""What the benchmark scripts share: comma-separated list arguments, dtype names, output
from rank 0 only, and the mapping from a decode mode to `Llama.configure`'s keywords.
Their timer is in timing.py: this module imports no torch, so that a script whose
command line needs nothing more answers `--help` at once.

The scripts form a package run from the checkout's root (`python -m benchmarks.bench`,
`torchrun ... -m benchmarks.bench`) and import the installed `llama` (`pip install -e .`).
"""

import argparse
import json
import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence

GiB = 2**30
DECODE_MODES = ("eager", "graphs", "compiled")
# --dtype's names -> the torch dtype's name.
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
          "fp16": "float16", "float32": "float32", "fp32": "float32"}


# ---- how the library runs ------------------------------------------------------------

def configure_kwargs(decode: Optional[str] = None, prefill_chunk: Optional[int] = None,
                     symmetric_memory: bool = False) -> dict:
    """`Llama.configure` keywords for a benchmark mode; what is left out keeps the
    library's default. decode: "eager" (no CUDA graphs), "graphs" (decode steps replayed
    from CUDA graphs) or "compiled" (steps and the prompt's first chunk compiled by
    torch.compile, steps then captured in graphs). The only place that knows the
    keywords of `configure`."""
    if decode is not None and decode not in DECODE_MODES:
        raise ValueError(f"decode mode {decode!r} is unknown; choose one of {DECODE_MODES}")
    kwargs = {}
    if decode is not None:
        kwargs["decode"] = decode
    if prefill_chunk is not None:
        kwargs["prefill_chunk"] = prefill_chunk
    if symmetric_memory:
        kwargs["symmetric_memory"] = True
    return kwargs


def add_mode_args(parser: argparse.ArgumentParser) -> None:
    """--decode, --prefill_chunk and --symmetric_memory, as configure_kwargs takes them."""
    group = parser.add_argument_group("how the library runs (Llama.configure)")
    group.add_argument("--decode", choices=DECODE_MODES, default=None,
                       help="decode steps eager, replayed from CUDA graphs, or compiled "
                            "and replayed (default: the library's default)")
    group.add_argument("--prefill_chunk", type=positive_int, default=None,
                       help="prompt positions per forward pass (default: the library's)")
    group.add_argument("--symmetric_memory", action="store_true",
                       help="at MP>1 on CUDA, sum over ranks with the fused kernel")


def dtype_for(name: Optional[str], device):
    """The torch dtype called `name` (a key of DTYPES), else the library's default for the
    torch `device` (distributed.default_dtype)."""
    import torch  # here: the scripts' arguments need no torch

    from llama.distributed import default_dtype

    return getattr(torch, DTYPES[name]) if name is not None else default_dtype(device)


# ---- arguments ---------------------------------------------------------------------

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def int_list(text: str) -> List[int]:
    """"512,4096" -> [512, 4096] (each positive); "none" or "" -> [] (skip them all)."""
    return [positive_int(item) for item in name_list(text)]


def name_list(text: str) -> List[str]:
    """"a, b" -> ["a", "b"]; "none" or "" -> []."""
    if text.strip().lower() in ("", "none"):
        return []
    return [item for item in text.replace(" ", "").split(",") if item]


def names_from(choices: Sequence[str]) -> Callable[[str], List[str]]:
    """An argument type: a name_list whose names are all among `choices`."""
    def parse(text: str) -> List[str]:
        names = name_list(text)
        unknown = sorted(set(names) - set(choices))
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown name(s) {unknown}; choose from {', '.join(choices)} or none")
        return names
    return parse


# ---- output ------------------------------------------------------------------------

def is_rank0() -> bool:
    """True in the process that prints and writes (rank 0 under torchrun, or alone)."""
    return int(os.environ.get("RANK", "0")) == 0


def say(*args) -> None:
    if is_rank0():
        print(*args, flush=True)


def write_json(path: Optional[str], data) -> None:
    """Rank 0 writes `data` to `path` (making its folder); without a path, nothing."""
    if path is None or not is_rank0():
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2))
    print(f"results written to {path}", flush=True)
