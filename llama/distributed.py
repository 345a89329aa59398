"""Process-group and model-parallel setup.

Under `torchrun` the group comes from the environment (RANK, WORLD_SIZE, ...). In a plain
`python` process or a notebook we make a one-process group on the spot, so nobody needs
torchrun for a single device.
"""

import atexit
import contextlib
import io
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from fairscale.nn.model_parallel import initialize as mp


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (fp16 where bf16 is unsupported), fp16 on MPS, float32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def initialize(model_parallel_size, device: torch.device) -> int:
    """Make sure a process group and fairscale's model-parallel groups exist; return the
    model-parallel size in force. Safe to call again (notebooks rebuild models)."""
    check_device(device)
    if device.type == "cuda":  # an explicit index (cuda:1) wins over the torchrun rank
        torch.cuda.set_device(device if device.index is not None else local_rank())
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if launched_by_torchrun():
            dist.init_process_group(backend)
        else:
            # A one-process group with an in-memory store: no ports, no env variables.
            # init_process_group also makes every later traceback of the process print
            # "[rank0]: " on each line, which only helps to tell ranks apart: not here.
            hook = sys.excepthook
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            sys.excepthook = hook
        # A group left alive at interpreter exit can abort the process ("terminate called
        # without an active exception" with gloo): close the one we opened.
        atexit.register(_destroy_group)
    world = dist.get_world_size()
    if mp.model_parallel_is_initialized():
        current = mp.get_model_parallel_world_size()
        if model_parallel_size not in (None, current):
            raise ValueError(
                f"model parallelism is already set up with size {current} in this process; "
                f"it cannot change to {model_parallel_size} without a new process"
            )
        return current
    size = world if model_parallel_size is None else model_parallel_size
    if size < 1 or world % size:
        raise ValueError(
            f"model_parallel_size={size} must divide the number of processes ({world})"
        )
    with contextlib.redirect_stdout(io.StringIO()):  # fairscale's "> initializing ..." lines
        mp.initialize_model_parallel(size)
    return size


def check_device(device: torch.device) -> None:
    """Refuse a device that this PyTorch or this machine cannot use, before anything
    touches it (a CPU-only PyTorch fails deep inside with an AttributeError)."""
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(
                f"device {str(device)!r} asks for CUDA, but this PyTorch ({torch.__version__}) "
                f"is a CPU-only build; use device 'cpu', or install a CUDA build of PyTorch"
            )
        count = torch.cuda.device_count()
        index = device.index if device.index is not None else local_rank()
        if index >= count:
            raise ValueError(
                f"device {str(device)!r} needs GPU {index} but {count} GPU(s) are visible "
                f"(check the driver, CUDA_VISIBLE_DEVICES, and that torchrun starts at most "
                f"one process per GPU); or use device 'cpu'"
            )
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                     and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' is not available on this machine (Apple silicon with "
                         "macOS 12.3+ is needed); use device 'cpu'")


def check_same_on_every_rank(value: int, name: str) -> None:
    """Refuse a value (an int) that differs between the model-parallel ranks."""
    if model_parallel_world_size() == 1:
        return
    values = [None] * model_parallel_world_size()
    dist.all_gather_object(values, value, group=mp.get_model_parallel_group())
    if len(set(values)) > 1:
        raise ValueError(f"{name} differs between the ranks ({values}); pass the same "
                         f"{name} on every rank, or they would sample different tokens")


def sync_random_state(device: torch.device) -> None:
    """Give every model-parallel rank the first rank's random-number state of `device`
    (whose generator sampling draws from), so that all ranks draw the same numbers even
    if code between generations drew some on one rank only."""
    if model_parallel_world_size() == 1:
        return
    group = mp.get_model_parallel_group()
    cuda = device.type == "cuda"
    state = torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state()
    # NCCL exchanges device tensors only; gloo host tensors.
    moved = state.to(device) if cuda else state
    dist.broadcast(moved, dist.get_global_rank(group, 0), group=group)
    if cuda:
        torch.cuda.set_rng_state(moved.cpu(), device)
    else:
        torch.set_rng_state(moved)


def _destroy_group() -> None:
    if dist.is_initialized():
        if _symmetric_memory_on:  # no rank may unmap its buffers while a peer writes to them
            torch.cuda.synchronize()
            dist.barrier()
        dist.destroy_process_group()


def model_parallel_rank() -> int:
    return mp.get_model_parallel_rank()


def model_parallel_world_size() -> int:
    return mp.get_model_parallel_world_size()


# The model's collectives. fairscale's versions run inside autograd.Functions, which
# torch.compile cannot trace (a graph break at each of them, two per layer); functional
# collectives compile into the graph and are captured by CUDA graphs. Inference only.
def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over the model-parallel ranks (x itself at MP=1)."""
    if mp.get_model_parallel_world_size() == 1:
        return x
    return funcol.all_reduce(x, "sum", mp.get_model_parallel_group())


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """The ranks' x concatenated along the last dimension, in rank order."""
    if mp.get_model_parallel_world_size() == 1:
        return x
    return _all_gather(x, x.dim() - 1, mp.get_model_parallel_group())


def symmetric_memory_group():
    """The model-parallel group, registered for symmetric memory (buffers that the GPUs
    of the group write into each other directly; see allreduce.py), or None at MP=1, off
    CUDA, or where this PyTorch lacks symmetric memory. No NVLink multicast is used."""
    if mp.get_model_parallel_world_size() == 1 or not torch.cuda.is_available():
        return None
    try:
        from torch.distributed import _symmetric_memory as symm_mem
    except ImportError:
        return None
    global _symmetric_memory_on
    group = mp.get_model_parallel_group()
    if not _symmetric_memory_on:
        if hasattr(symm_mem, "set_backend"):
            # Plain CUDA peer mappings where this PyTorch has them: each process frees its
            # own. With NVSHMEM, buffers are freed collectively, and ranks exiting at
            # different moments can deadlock.
            with contextlib.suppress(RuntimeError):  # "does not find allocation backend"
                symm_mem.set_backend("CUDA")
        with warnings.catch_warnings():
            # Newer PyTorch deprecates the call, but older ones need it for rendezvous.
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(group.group_name)
        _symmetric_memory_on = True
    return group


_symmetric_memory_on = False


# all_gather_tensor was renamed all_gather_single in newer PyTorch (the old name warns).
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
