"""Building a model on a device: from a checkpoint folder, or with random weights and the
shapes of a released size (for benchmarks). Used by `Llama.build` and `Llama.from_preset`."""

import contextlib
import functools
import os
import sys
import time
from pathlib import Path
from typing import Optional, Tuple

import torch

from . import checkpoint, distributed, hparams, prequantized, quant_kernels
from . import quantize as quantization
from .memory import check_fits
from .model import ModelArgs, Transformer, skip_fairscale_init
from .tokenizer import Tokenizer


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def empty_model(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> Transformer:
    """A Transformer whose KV cache and RoPE table are on `device`; its parameters are
    placeholders until `checkpoint.load_into` assigns the real ones."""
    check_fits(args, device, dtype)
    with default_dtype(dtype), torch.device(device), skip_fairscale_init():
        return Transformer(args).requires_grad_(False)  # inference only


def check_sizes(max_seq_len, max_batch_size) -> None:
    for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
        if not hparams.is_count(value):
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")


# The precisions a model may be built in, by name (the command line's --dtype too).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_device(device) -> torch.device:
    """`device` (a torch.device or its name, or None for the default) as a torch.device."""
    if device is None:
        return distributed.default_device()
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device; use cpu, cuda, cuda:N or "
                         f"mps") from None


def model_dtype(dtype, device: torch.device) -> torch.dtype:
    """`dtype` (one of DTYPES, as a torch.dtype or its name, or None for the device's
    default) as a torch.dtype."""
    if dtype is None:
        return distributed.default_dtype(device)
    named = DTYPES.get(dtype) if isinstance(dtype, str) else None
    if named is None and dtype not in DTYPES.values():
        raise ValueError(f"dtype {dtype!r} is not supported; use one of "
                         f"{', '.join(DTYPES)} (a torch.dtype or its name)")
    return named or dtype


def setup(model_parallel_size, seed: int, device, dtype) -> Tuple[torch.device, torch.dtype]:
    """The process group, the seed and the device and dtype in force."""
    device = model_device(device)
    dtype = model_dtype(dtype, device)
    distributed.initialize(model_parallel_size, device)
    distributed.check_same_on_every_rank(seed, "seed")
    torch.manual_seed(seed)
    return device, dtype


def from_checkpoint(ckpt_dir, tokenizer_path, max_seq_len: int, max_batch_size: int,
                    model_parallel_size, seed: int, device, dtype,
                    quantize: Optional[str] = None):
    """(model, tokenizer) of a Meta or Hugging Face folder (see Llama.build)."""
    check_sizes(max_seq_len, max_batch_size)
    device, dtype = setup(model_parallel_size, seed, device, dtype)
    mp_size = distributed.model_parallel_world_size()
    if distributed.local_rank() > 0:
        sys.stdout = open(os.devnull, "w")

    start = time.time()
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_file():
        raise NotADirectoryError(f"checkpoint folder {ckpt_dir} is a file; pass the folder "
                                 f"that holds it ({ckpt_dir.parent})")
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder {ckpt_dir} does not exist")
    rank = distributed.model_parallel_rank()
    stored = prequantized.read(ckpt_dir)
    if stored is None:
        params, state, default_tokenizer = checkpoint.load_folder(ckpt_dir, rank, mp_size)
    else:
        quantize = prequantized.check_request(stored, quantize, mp_size, ckpt_dir)
        params, state, default_tokenizer = prequantized.load_folder(ckpt_dir, rank, stored)
    tokenizer = Tokenizer(str(tokenizer_path or default_tokenizer))
    if params.get("vocab_size", -1) > 0 and params["vocab_size"] != tokenizer.n_words:
        raise ValueError(
            f"{ckpt_dir} says vocab_size {params['vocab_size']} but the tokenizer has "
            f"{tokenizer.n_words} pieces; use the tokenizer.model of this model"
        )
    params["vocab_size"] = tokenizer.n_words
    rows = state["tok_embeddings.weight"].shape[0] if "tok_embeddings.weight" in state else None
    if rows is not None and rows != tokenizer.n_words:
        raise ValueError(
            f"the checkpoint in {ckpt_dir} embeds {rows} tokens but the tokenizer has "
            f"{tokenizer.n_words} pieces; use the tokenizer.model shipped with these weights"
        )
    args = ModelArgs(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **params)
    model = build_model(args, device, dtype, lambda model: state, str(ckpt_dir), quantize,
                        stored)
    print(f"Loaded in {time.time() - start:.2f} seconds")
    return model, tokenizer


def from_preset(name: str, max_seq_len: int, max_batch_size: int, model_parallel_size,
                tokenizer_path: Optional[str], seed: int, device, dtype,
                quantize: Optional[str] = None, **overrides):
    """(model, tokenizer or None) with a released size's shapes and random weights made on
    the device (see Llama.from_preset)."""
    check_sizes(max_seq_len, max_batch_size)
    device, dtype = setup(model_parallel_size, seed, device, dtype)
    tokenizer = Tokenizer(tokenizer_path) if tokenizer_path else None
    if tokenizer is not None:
        overrides["vocab_size"] = tokenizer.n_words
    args = ModelArgs.from_name(name, max_seq_len=max_seq_len,
                               max_batch_size=max_batch_size, **overrides)
    rank_seed = seed + distributed.model_parallel_rank()
    model = build_model(args, device, dtype,
                        lambda model: checkpoint.random_state(model, rank_seed),
                        f"random {name}", quantize)
    return model, tokenizer


# Outside inference mode even when called inside it: CUDA graphs and compiled steps run
# under no_grad and update the KV cache in place, which inference tensors refuse.
@torch.inference_mode(False)
def build_model(args: ModelArgs, device: torch.device, dtype: torch.dtype, state_of,
                source: str, quantize: Optional[str],
                stored: Optional[prequantized.Stored] = None) -> Transformer:
    """The model of `args` on `device`, with the weights `state_of(model)` gives (Meta's
    names, tensors or lazy parts) loaded one at a time. With `quantize` ("int8" or
    "int4") its linear layers but quantize.KEPT hold quantized weights, each quantized on
    the device as it loads, so the full-precision model never sits there; or, with
    `stored` (a pre-quantized folder's), the pieces are loaded as they are. The
    matrix-product kernel is chosen once here (quant_kernels.select_kernel)."""
    if quantize is None:
        model = empty_model(args, device, dtype)
        checkpoint.load_into(model, state_of(model), source, device, dtype)
        return model
    mode = quantization.check_mode(quantize)
    group_size = (stored and stored.group_size) or quantization.DEFAULT_GROUP_SIZE
    skip = stored.skip if stored else quantization.KEPT
    check_fits(args, device, dtype, mode, group_size, skip)
    with default_dtype(dtype), torch.device("meta"), skip_fairscale_init():
        model = Transformer(args).requires_grad_(False)  # shapes only, no memory
    state = state_of(model)
    if stored is None:
        checkpoint.prepare_state(model, state, source)
        check_int4_widths(model, mode, group_size, skip)
    quantization.quantize(model, mode, group_size, skip=skip, empty=True)
    if stored is not None:
        checkpoint.check_state(model, state, source)  # the pieces, under the fused names
    model.to_empty(device=device)  # quantized sizes; loading replaces them one by one
    model.reset_buffers()
    entries = None if stored else functools.partial(quantization.quantized_entries, model)
    checkpoint.load_into(model, state, source, device, dtype, prepared=True, entries=entries)
    quant_kernels.use_kernel(model, quant_kernels.select_kernel(device, mode, dtype), dtype)
    return model


def check_int4_widths(model: Transformer, mode: str, group_size: int, skip) -> None:
    """Refuse int4 where a layer's input width (this rank's) is not a whole number of
    groups, saying what can be done instead."""
    misfit = quantization.int4_misfit(model, group_size, skip) if mode == "int4" else None
    if misfit is None:
        return
    name, width = misfit
    world = distributed.model_parallel_world_size()
    fewer = world > 1 and (width * world) % group_size == 0  # a row-parallel split
    groups = [g for g in (64, 32) if width % g == 0]
    fix = (f"write a pre-quantized folder with groups of {groups[0]}: python -m llama.convert "
           f"quantize --ckpt_dir ... --out_dir ... --bits 4 --group_size {groups[0]} "
           f"--mp {world}, and load that" if groups else "leave the model unquantized")
    raise ValueError(
        f"int4 quantizes groups of {group_size} inputs, but layer {name} takes {width} "
        f"inputs{' per process' if world > 1 else ''}, not a multiple of {group_size}; use "
        f"quantize='int8'{', or fewer model-parallel processes' if fewer else ''}, or "
        f"{fix}")
