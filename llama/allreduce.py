"""The sum over model-parallel ranks that ends each attention and feed-forward block,
fused with the residual add and the RMSNorm after it: one Triton kernel over symmetric
memory, for decoding at MP>1 on CUDA (`configure(symmetric_memory=True)`).

A transformer layer ends its attention and its feed-forward block with a row-parallel
product: every rank holds a partial sum of the output, the ranks add them up (an
all-reduce), then add the residual and normalise for the next product. Decoding a batch
of one, the partials are 10 KB (13B); what such an all-reduce costs is latency, and 13B
has 80 of them per token. On two H200s an NCCL all-reduce plus the add and the norm took
26 us per call, PyTorch's one-shot symmetric-memory all-reduce (two barriers) plus the
add and the norm 21.5 us, this kernel 4.8 us (benchmarks/allreduce_check.py). It does:

1. each rank writes its partial into every peer's buffer (symmetric memory: allocations
   that the GPUs of the group map into each other's address space; the writes go over
   NVLink and are posted, so nobody waits for a remote read);
2. it raises a flag in each peer's memory with an atomic that makes its writes visible
   first (release), and waits for every peer's flag in its own (acquire), lowering it;
3. it sums the partials, now all in local memory, in rank order (every rank gets the
   same bits, so the ranks' residual streams stay identical), adds the residual and
   applies the RMSNorm.

One handshake per call is enough because buffers and flags come in two sets ("slots"),
which the calls of a forward pass use alternately (attention 0, feed-forward 1): a rank
writes into a peer's slot again only after finishing the call in between, and that call
waited for the peer's flag, which the peer raises only once it has finished the previous
call, its reading of the slot included. (Pulling the peers' partials instead of pushing
them measured 5.3 us per call.) This holds when every rank makes the same sequence of
calls (`fits` depends only on shapes), in one stream, each forward pass as pairs (slot 0,
slot 1) per layer. An exception inside a forward pass on one rank leaves its peers waiting
(as it would in an NCCL all-reduce).
"""

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .distributed import symmetric_memory_group

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the fused path is never enabled there
    triton = None

SLOTS = 2


class PeerBuffers:
    """Where the ranks exchange partial sums: per rank, SLOTS x capacity x world rows of
    `dim` values (entry [slot, row, r] receives rank r's partial) and as many flags, plus
    device tables of every rank's addresses of both. Built by `allocate` (collective);
    tests build one by hand."""

    def __init__(self, data: torch.Tensor, flags: torch.Tensor, data_ptrs: torch.Tensor,
                 flag_ptrs: torch.Tensor, rank: int):
        self.data, self.flags = data, flags  # kept alive: the tables point into them
        self.data_ptrs, self.flag_ptrs = data_ptrs, flag_ptrs
        self.rank = rank
        self.capacity, self.dim = data.shape[1], data.shape[3]

    @classmethod
    def allocate(cls, group, capacity: int, dim: int, dtype: torch.dtype,
                 device: torch.device) -> "PeerBuffers":
        """Symmetric-memory buffers for `group` (every rank must call this together)."""
        from torch.distributed import _symmetric_memory as symm_mem

        if dim * dtype.itemsize % 16:
            raise ValueError(f"rows of {dim} {dtype} values are not a multiple of 16 bytes, "
                             f"which the kernel's vector accesses need")
        world = dist.get_world_size(group)
        data = symm_mem.empty((SLOTS, capacity, world, dim), dtype=dtype, device=device)
        flags = symm_mem.empty((SLOTS, capacity, world), dtype=torch.int32, device=device)
        flags.zero_()
        data_ptrs, rank = _addresses(data, group)
        flag_ptrs, _ = _addresses(flags, group)
        torch.cuda.synchronize(device)
        # Every rank's flags are zero before anyone signals.
        dist.barrier(group, device_ids=[torch.cuda.current_device()])
        return cls(data, flags, data_ptrs, flag_ptrs, rank)

    def fits(self, partial: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether a call with this partial sum and norm weight can go through the kernel:
        the buffers' dtype and width, and no more rows than they hold. It depends only on
        shapes and dtypes, so every rank decides the same way."""
        return (partial.dtype == weight.dtype == self.data.dtype
                and partial.shape[-1] == self.dim
                and partial.numel() <= self.capacity * self.dim
                and partial.device == self.data.device)

    def sum_add_norm(self, partial: torch.Tensor, residual: torch.Tensor,
                     weight: torch.Tensor, eps: float, slot: int):
        """(h, rmsnorm(h) * weight) where h = residual + partial summed over the ranks."""
        return sum_add_norm(partial, residual, weight, eps, self.data_ptrs, self.flag_ptrs,
                            self.rank, slot * self.capacity)


def _addresses(tensor: torch.Tensor, group) -> Tuple[torch.Tensor, int]:
    """Every rank's address of its copy of `tensor` (a device int64 table), and our rank."""
    from torch.distributed import _symmetric_memory as symm_mem

    handle = symm_mem.rendezvous(tensor, group)
    # The handle gives each rank's allocation; the tensor may start inside it.
    offset = tensor.data_ptr() - handle.buffer_ptrs[handle.rank]
    table = torch.tensor([base + offset for base in handle.buffer_ptrs], dtype=torch.int64,
                         device=tensor.device)
    return table, handle.rank


# Declared pure, although it writes into the peers' memory: declaring the flags mutated
# would make torch.compile copy the address tables around every call. The compiler may
# not drop or merge calls: each call's inputs differ (slot, partial) and its outputs feed
# the next one, so the compiled order is the model's.
@torch.library.custom_op("llama::sum_add_norm", mutates_args=())
def sum_add_norm(partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float, data_ptrs: torch.Tensor, flag_ptrs: torch.Tensor, rank: int,
                 first_cell: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """An opaque op to torch.compile (which captures it into the step's CUDA graph): the
    kernel launch, on tensors of shape (..., dim); rows go to cells first_cell, ..."""
    dim = partial.shape[-1]
    partial = partial.contiguous()
    residual = residual.contiguous()
    h, normed = torch.empty_like(residual), torch.empty_like(residual)
    rows = partial.numel() // dim
    block = triton.next_power_of_2(dim)
    _sum_add_norm_kernel[(rows,)](
        partial, residual, weight, h, normed, data_ptrs, flag_ptrs, first_cell, dim, eps,
        RANK=rank, WORLD=data_ptrs.numel(), BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return h, normed


@sum_add_norm.register_fake
def _(partial, residual, weight, eps, data_ptrs, flag_ptrs, rank, first_cell):
    return (torch.empty(residual.shape, dtype=residual.dtype, device=residual.device),
            torch.empty(residual.shape, dtype=residual.dtype, device=residual.device))


if triton is not None:
    @triton.jit
    def _sum_add_norm_kernel(partial_ptr, residual_ptr, weight_ptr, h_ptr, normed_ptr,
                             data_ptrs, flag_ptrs, first_cell, dim, eps,
                             RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < dim
        dtype = partial_ptr.dtype.element_ty
        here = row * dim + cols
        cell = first_cell + row  # this row's place in every rank's buffers and flags
        mine = tl.load(partial_ptr + here, mask=inside, other=0.0)
        # Write our partial into every peer's buffer, at entry (cell, RANK): NVLink stores
        # are posted, so the peers later read only their own memory. Rows start 16-byte
        # aligned when dim is a multiple of 8 (Code Llama's are): the hints give 16-byte
        # accesses.
        for peer in tl.static_range(WORLD):
            if peer != RANK:
                dest = tl.load(data_ptrs + peer).to(tl.pointer_type(dtype))
                dest = tl.multiple_of(dest + (cell * WORLD + RANK) * dim, 16)
                tl.store(dest + cols, mine, mask=inside)
        # Local loads issued now overlap the wait below.
        residual = tl.load(residual_ptr + here, mask=inside, other=0.0).to(tl.float32)
        weight = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        # Every thread has issued its stores before the signal; the release atomic (run by
        # one thread, as Triton runs scalar atomics) then makes them visible to the peer
        # before the flag.
        tl.debug_barrier()
        for peer in tl.static_range(WORLD):
            if peer != RANK:
                flags = tl.load(flag_ptrs + peer).to(tl.pointer_type(tl.int32))
                while tl.atomic_cas(flags + cell * WORLD + RANK, 0, 1, sem="release",
                                    scope="sys") != 0:
                    pass
        own_flags = tl.load(flag_ptrs + RANK).to(tl.pointer_type(tl.int32))
        for peer in tl.static_range(WORLD):
            if peer != RANK:
                while tl.atomic_cas(own_flags + cell * WORLD + peer, 1, 0, sem="acquire",
                                    scope="sys") != 1:
                    pass
        # The sum in rank order, in float32, rounded once to the model dtype (at MP=2 the
        # bits of an NCCL all-reduce; with more ranks NCCL rounds after each addition).
        own_data = tl.load(data_ptrs + RANK).to(tl.pointer_type(dtype))
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for peer in tl.static_range(WORLD):
            if peer == RANK:
                total += mine.to(tl.float32)
            else:
                src = tl.multiple_of(own_data + (cell * WORLD + peer) * dim, 16)
                # .cv: written by another GPU; not from a cache line of an earlier use
                total += tl.load(src + cols, mask=inside, other=0.0,
                                 cache_modifier=".cv").to(tl.float32)
        h = (residual + total.to(dtype).to(tl.float32)).to(dtype)
        tl.store(h_ptr + here, h, mask=inside)
        # RMSNorm as model.RMSNorm computes it (float32, rounded, then scaled), to within
        # rounding: the square root and the order of the sum differ.
        hf = h.to(tl.float32)
        inv_rms = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / dim + eps)
        normed = (hf * inv_rms).to(dtype).to(tl.float32) * weight
        tl.store(normed_ptr + here, normed.to(dtype), mask=inside)


def enable(model) -> Optional[PeerBuffers]:
    """Buffers for `model`'s decoding steps (max_batch_size rows), or None where the fused
    path cannot run: MP=1, no CUDA or Triton, a PyTorch without symmetric memory, or a
    model width that is not a multiple of 16 bytes.
    Collective: every model-parallel rank must call it."""
    dtype = model.norm.weight.dtype
    if (triton is None or model.rope.device.type != "cuda"
            or model.params.dim * dtype.itemsize % 16):
        return None
    group = symmetric_memory_group()
    if group is None:
        return None
    return PeerBuffers.allocate(group, model.params.max_batch_size, model.params.dim, dtype,
                                model.rope.device)
