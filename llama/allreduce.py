"""The sum over model-parallel ranks that ends each attention and feed-forward block,
fused with the residual add and the RMSNorm after it: one Triton kernel over symmetric
memory, for decoding at MP>1 on CUDA (`configure(symmetric_memory=True)`).

A transformer layer ends its attention and its feed-forward block with a row-parallel
product: every rank holds a partial sum of the output, the ranks add them up (an
all-reduce), then add the residual and normalise for the next product. Decoding a small
batch, the partials are a few kilobytes, so such an all-reduce costs latency, twice per
layer; an NCCL all-reduce plus the add and the norm is several times slower than this
kernel (docs/design.md has the measurements). The kernel:

1. each rank writes its partial into every peer's buffer (symmetric memory: allocations
   that the GPUs of the group map into each other's address space; the writes go over
   NVLink and are posted, so nobody waits for a round trip). Each 8-byte word it writes
   holds 4 bytes of the partial and 4 bytes of a call number (the "epoch", which every
   rank counts alike: NCCL's low-latency protocol). A GPU writes an aligned 8-byte word
   at once, so a reader that sees the epoch in a word also sees that word's data:
   no flags, no memory fences, one NVLink crossing per call;
2. it reads its own buffer until every word from every peer carries this call's epoch;
3. it sums the partials in rank order (every rank gets the same bits, so the ranks'
   residual streams stay identical), adds the residual and applies the RMSNorm.

The buffers come in two sets ("slots"), which the calls of a forward pass use alternately
(attention 0, feed-forward 1), so a rank never overwrites words a peer has yet to read:
it writes into a peer's slot again only after finishing the call in between, which
needed the peer's words of that call, which the peer writes only once it has finished
reading the slot. This holds when every rank makes the same sequence of calls (`fits`
depends only on shapes), in one stream, strictly alternating slots (each forward pass
makes pairs (slot 0, slot 1), one per layer, also when a CUDA graph replays them). An
exception inside a forward pass on one rank leaves its peers waiting (as it would in an
NCCL all-reduce).

Measured slower and dropped (docs/design.md): a flag raised after the data with a
release atomic, pulling the peers' partials instead of pushing them, and extra programs
that prefetch the next weight matrix into L2 while the ranks wait.
"""

import functools
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .distributed import all_reduce, symmetric_memory_group

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the fused path is never enabled there
    triton = None

SLOTS = 2


def _supported(dim: int, dtype: torch.dtype) -> bool:
    """Rows the kernel can exchange: 2- or 4-byte values (two or one per 4-byte half of a
    word) and a multiple of 16 bytes (aligned 16-byte accesses)."""
    return dtype.itemsize in (2, 4) and dim * dtype.itemsize % 16 == 0


class PeerBuffers:
    """Where the ranks exchange partial sums: per rank, SLOTS x capacity x world rows of
    8-byte words (entry [slot, row, r] receives rank r's partial of a `dim`-wide row of
    `dtype`, 4 bytes of it per word) and a device table of every rank's address of them;
    and this rank's call count per (slot, row), the epoch of its last call there. Built
    by `allocate` (collective); tests build one by hand."""

    def __init__(self, data: torch.Tensor, epochs: torch.Tensor, data_ptrs: torch.Tensor,
                 rank: int, dim: int, dtype: torch.dtype):
        self.data = data  # kept alive: the table points into it
        self.epochs, self.data_ptrs, self.rank = epochs, data_ptrs, rank
        self.capacity, self.dim, self.dtype = data.shape[1], dim, dtype

    @classmethod
    def allocate(cls, group, capacity: int, dim: int, dtype: torch.dtype,
                 device: torch.device) -> "PeerBuffers":
        """Symmetric-memory buffers for `group` (every rank must call this together)."""
        from torch.distributed import _symmetric_memory as symm_mem

        if not _supported(dim, dtype):
            raise ValueError(f"rows of {dim} {dtype} values: the kernel needs 2- or 4-byte "
                             f"values and rows of a multiple of 16 bytes")
        world = dist.get_world_size(group)
        words = dim * dtype.itemsize // 4
        data = symm_mem.empty((SLOTS, capacity, world, words), dtype=torch.int64,
                              device=device)
        data.zero_()  # epoch 0 in every word: the first call's epoch is 1
        epochs = torch.zeros((SLOTS, capacity), dtype=torch.int32, device=device)
        data_ptrs, rank = _addresses(data, group)
        torch.cuda.synchronize(device)
        # Every rank's buffer is zeroed before anyone writes into it.
        dist.barrier(group, device_ids=[torch.cuda.current_device()])
        return cls(data, epochs, data_ptrs, rank, dim, dtype)

    def fits(self, partial: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether a call with this partial sum and norm weight can go through the kernel:
        the buffers' dtype and width, and no more rows than they hold. It depends only on
        shapes and dtypes, so every rank decides the same way."""
        return (partial.dtype == weight.dtype == self.dtype
                and partial.shape[-1] == self.dim
                and partial.numel() <= self.capacity * self.dim
                and partial.device == self.data.device)

    def sum_add_norm(self, partial: torch.Tensor, residual: torch.Tensor,
                     weight: torch.Tensor, eps: float, slot: int):
        """(h, rmsnorm(h) * weight) where h = residual + partial summed over the ranks."""
        return sum_add_norm(partial, residual, weight, eps, self.data_ptrs, self.epochs,
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


# Declared pure, although it writes into the peers' memory and counts epochs: declaring
# those mutated would make torch.compile copy them around every call. So the compiler
# would drop a call whose outputs nobody uses; in the model every call's outputs feed the
# next call, which keeps all of them, in the model's order (tests/kernels_worker.py counts
# the epochs of a compiled pass). For the same reason the step must not be compiled with
# mode="reduce-overhead", whose CUDA graphs would count epochs in a copy: the library
# captures its own graphs (graphs.py).
@torch.library.custom_op("llama::sum_add_norm", mutates_args=())
def sum_add_norm(partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float, data_ptrs: torch.Tensor, epochs: torch.Tensor, rank: int,
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
        partial, residual, weight, h, normed, data_ptrs, epochs, first_cell, dim, eps,
        RANK=rank, WORLD=data_ptrs.numel(), BLOCK=block, PACK=4 // partial.element_size(),
        num_warps=8 if block >= 4096 else 4)
    return h, normed


@sum_add_norm.register_fake
def _(partial, residual, weight, eps, data_ptrs, epochs, rank, first_cell):
    return (torch.empty(residual.shape, dtype=residual.dtype, device=residual.device),
            torch.empty(residual.shape, dtype=residual.dtype, device=residual.device))


if triton is not None:
    @triton.jit
    def _to_words(values, PACK: tl.constexpr, BLOCK: tl.constexpr):
        """BLOCK values of 4 // PACK bytes -> BLOCK // PACK 32-bit words of their bits."""
        if PACK == 1:
            return values.to(tl.uint32, bitcast=True)
        else:
            low, high = tl.split(tl.reshape(values.to(tl.uint16, bitcast=True),
                                            [BLOCK // 2, 2]))
            return low.to(tl.uint32) | (high.to(tl.uint32) << 16)

    @triton.jit
    def _from_words(words, dtype: tl.constexpr, PACK: tl.constexpr, BLOCK: tl.constexpr):
        """The inverse of _to_words, into values of `dtype`."""
        if PACK == 1:
            return words.to(dtype, bitcast=True)
        else:
            low = (words & 0xFFFF).to(tl.uint16)
            high = (words >> 16).to(tl.uint16)
            return tl.reshape(tl.join(low, high), [BLOCK]).to(dtype, bitcast=True)

    @triton.jit
    def _sum_add_norm_kernel(partial_ptr, residual_ptr, weight_ptr, h_ptr, normed_ptr,
                             data_ptrs, epochs_ptr, first_cell, dim, eps,
                             RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr,
                             PACK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < dim
        dtype: tl.constexpr = partial_ptr.dtype.element_ty
        WORDS: tl.constexpr = BLOCK // PACK
        w = tl.arange(0, WORDS)
        words = dim // PACK
        w_inside = w < words
        here = row * dim + cols
        cell = first_cell + row  # this row's place in every rank's buffers
        epoch = tl.load(epochs_ptr + cell) + 1  # every rank counts its calls per cell alike
        tag = epoch.to(tl.uint32).to(tl.uint64) << 32
        mine = tl.load(partial_ptr + here, mask=inside, other=0.0)
        stamped = _to_words(mine, PACK, BLOCK).to(tl.uint64) | tag
        # Write our partial into every peer's buffer, at entry (cell, RANK). Entries are
        # 16-byte aligned (rows are a multiple of 16 bytes): the hints give 16-byte
        # stores, each two whole words.
        for peer in tl.static_range(WORLD):
            if peer != RANK:
                dest = tl.load(data_ptrs + peer).to(tl.pointer_type(tl.uint64))
                dest = tl.multiple_of(dest + (cell * WORLD + RANK) * words, 16)
                tl.store(dest + w, stamped, mask=w_inside)
        # A compiler may not move the stores past this point, so never into or after the
        # wait below (both ranks would then wait for words nobody has written).
        tl.debug_barrier()
        # Local loads issued now overlap the wait below.
        residual = tl.load(residual_ptr + here, mask=inside, other=0.0).to(tl.float32)
        weight = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        # The sum in rank order, in float32, rounded once to the model dtype (at MP=2 the
        # bits of an NCCL all-reduce; with more ranks NCCL rounds after each addition).
        own = tl.load(data_ptrs + RANK).to(tl.pointer_type(tl.uint64))
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for peer in tl.static_range(WORLD):
            if peer == RANK:
                total += mine.to(tl.float32)
            else:
                src = tl.multiple_of(own + (cell * WORLD + peer) * words, 16) + w
                # volatile: written by another GPU; read again until every word is this
                # call's (masked-off words count as arrived)
                got = tl.load(src, mask=w_inside, other=tag, volatile=True)
                while tl.max(((got >> 32) != (tag >> 32)).to(tl.int32), axis=0) > 0:
                    got = tl.load(src, mask=w_inside, other=tag, volatile=True)
                total += _from_words(got.to(tl.uint32), dtype, PACK, BLOCK).to(tl.float32)
        tl.store(epochs_ptr + cell, epoch)
        h = (residual + total.to(dtype).to(tl.float32)).to(dtype)
        tl.store(h_ptr + here, h, mask=inside)
        # RMSNorm as model.RMSNorm computes it (float32, rounded, then scaled), to within
        # rounding: the square root and the order of the sum differ.
        hf = h.to(tl.float32)
        inv_rms = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / dim + eps)
        normed = (hf * inv_rms).to(dtype).to(tl.float32) * weight
        tl.store(normed_ptr + here, normed.to(dtype), mask=inside)


def enable(model) -> Optional[PeerBuffers]:
    """Install the fused sums on `model` for its decoding steps (max_batch_size rows) and
    return their buffers, or return None and leave the model as it is where the fused
    path cannot run: MP=1, no CUDA or Triton, a PyTorch without symmetric memory, a dtype
    other than 2 or 4 bytes, or a model width that is not a multiple of 16 bytes.
    Collective: every model-parallel rank must call it."""
    dtype = model.norm.weight.dtype
    if (triton is None or model.rope.device.type != "cuda"
            or not _supported(model.params.dim, dtype)):
        return None
    group = symmetric_memory_group()
    if group is None:
        return None
    peers = PeerBuffers.allocate(group, model.params.max_batch_size, model.params.dim, dtype,
                                 model.rope.device)
    install(model, peers)
    return peers


def install(model, peers: PeerBuffers) -> None:
    """Make `model` end each attention and feed-forward block with sum_add_norm: its
    row-parallel products (wo, w2) stop summing over the ranks, and its forward_hidden
    becomes fused_forward_hidden. The model's own code and weights are unchanged."""
    for layer in model.layers:
        layer.attention.wo.reduce_output = False
        layer.feed_forward.w2.reduce_output = False
    model.forward_hidden = functools.partial(fused_forward_hidden, model, peers)


def uninstall(model) -> None:
    """Undo install: the model's plain forward_hidden and summing products again."""
    for layer in model.layers:
        layer.attention.wo.reduce_output = True
        layer.feed_forward.w2.reduce_output = True
    vars(model).pop("forward_hidden", None)


def installed(model) -> bool:
    return "forward_hidden" in vars(model)


def fused_forward_hidden(model, peers: PeerBuffers, tokens, start_pos, kv_len=None):
    """Transformer.forward_hidden with each block's sum over ranks fused with the residual
    add and the norm that follows it: the next block's attention_norm, or the final norm.
    So each block takes the residual stream and its normed copy, made by the block before.
    A forward pass with more rows than the buffers hold (a prefill) sums through NCCL."""
    inputs = model.step_inputs(tokens, start_pos, kv_len)
    x = model.tok_embeddings(tokens)
    normed = model.layers[0].attention_norm(x)
    norms = [layer.attention_norm for layer in model.layers[1:]] + [model.norm]
    for layer, next_norm in zip(model.layers, norms):
        partial = layer.attention(normed, inputs)
        h, normed = _add_summed(peers, partial, x, layer.ffn_norm, slot=0)
        x, normed = _add_summed(peers, layer.feed_forward(normed), h, next_norm, slot=1)
    return normed


def _add_summed(peers: PeerBuffers, partial, residual, norm, slot: int):
    """(h, norm(h)) where h = residual + partial summed over the ranks; `slot` alternates
    between a layer's two calls (see the module docstring)."""
    if peers.fits(partial, norm.weight):
        return peers.sum_add_norm(partial, residual, norm.weight, norm.eps, slot)
    h = residual + all_reduce(partial)
    return h, norm(h)
