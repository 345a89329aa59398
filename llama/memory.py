"""Will a model fit? Weights plus KV cache against the free memory of the device, checked
before anything is allocated, so that a model too big fails with numbers and a fix
rather than with an out-of-memory error (or, on the CPU, the system's OOM killer)."""

import os
from typing import Iterable, Optional

import torch

from . import distributed
from .model import ModelArgs
from .quantize import DEFAULT_GROUP_SIZE, KEPT

GIB = 2**30


def available_host_memory() -> Optional[int]:
    """Bytes the OS can give this process without swapping: MemAvailable on Linux (free
    memory plus reclaimable caches), else the free pages; None where neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # macOS has no SC_AVPHYS_PAGES
        return None


def weight_bytes(args: ModelArgs, size: int, quantize: Optional[str] = None,
                 group_size: int = DEFAULT_GROUP_SIZE, kept: Iterable[str] = KEPT) -> int:
    """Bytes of all ranks' weights: `size` bytes per parameter, except those of the linear
    layers that `quantize` quantizes (all but `kept`; int8: 1 byte and a 2-byte scale per
    row; int4: half a byte and a 2-byte scale and zero per group)."""
    if quantize is None:
        return args.num_params() * size
    full = args.vocab_size * args.dim + (2 * args.n_layers + 1) * args.dim  # embedding, norms
    if "output" in kept:
        full += args.vocab_size * args.dim
    linear = args.num_params() - full
    per_weight = 1 + 2 / args.dim if quantize == "int8" else 0.5 + 4 / group_size
    return int(full * size + linear * per_weight)


def check_fits(args: ModelArgs, device: torch.device, dtype: torch.dtype,
               quantize: Optional[str] = None, group_size: int = DEFAULT_GROUP_SIZE,
               kept: Iterable[str] = KEPT) -> None:
    """Refuse a model whose weights plus KV cache exceed the free memory of a CUDA device
    or the available memory of the host (CPU), saying both numbers and what to lower.
    Other devices are not checked. Each model-parallel rank holds its share; on the CPU
    the ranks that torchrun starts on this machine share its memory."""
    if device.type not in ("cuda", "cpu"):
        return
    world = distributed.model_parallel_world_size()
    size = torch.finfo(dtype).bits // 8
    weights = weight_bytes(args, size, quantize, group_size, kept) // world
    cache = args.kv_cache_bytes(size) // world
    if device.type == "cuda":
        free, where, ranks = torch.cuda.mem_get_info(device)[0], "on the GPU", 1
    else:
        free, where = available_host_memory(), "on this machine"
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if free is None:
            return
    if (weights + cache) * ranks > free:
        per = f" per process ({ranks} processes on this machine)" if ranks > 1 else ""
        fix = ("use more GPUs" if device.type == "cuda"
               else "use bfloat16 (half of float32's memory)" if size > 2 else "use a GPU")
        raise MemoryError(
            f"{weights / GIB:.1f} GiB of weights plus {cache / GIB:.1f} GiB of KV cache "
            f"({args.max_batch_size} x {args.max_seq_len} tokens) in "
            f"{str(dtype).replace('torch.', '')}{per} do not fit in the {free / GIB:.1f} GiB "
            f"free {where}; lower max_seq_len or max_batch_size, or {fix}"
        )
