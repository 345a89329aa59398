"""The Code Llama Transformer, model-parallel through fairscale.

The parameter names, shapes and parallel split of every layer are those of Meta's
reference, so `consolidated.NN.pth` shards load as they are. Three things differ inside:

- the KV cache is a small module whose rows can sit at different positions, so a ragged
  batch is prefilled in one pass and decoded without teacher forcing;
- attention goes through `torch.nn.functional.scaled_dot_product_attention`, which never
  materialises the (seqlen x cache length) score matrix on GPU backends and takes a mask
  that is correct for any `start_pos` (chunked prefill works); decoding steps on CUDA use
  the Triton kernel of kernels.py, which reads each row's length from the device;
- each block's sum over model-parallel ranks comes together with the residual add and the
  next RMSNorm (add_summed), so that at MP>1 one kernel can do all three (allreduce.py).
"""

from dataclasses import dataclass, fields
from typing import Optional, Union

import contextlib
from unittest import mock

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size
from fairscale.nn.model_parallel import layers as fairscale
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from . import kernels
from .distributed import all_gather_last_dim, all_reduce


@dataclass
class ModelArgs:
    """Hyperparameters, as in a checkpoint's `params.json` plus the two cache sizes."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: same as n_heads (no grouped-query attention)
    vocab_size: int = -1  # set from the tokenizer at build time
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000
    max_batch_size: int = 32
    max_seq_len: int = 2048

    @classmethod
    def field_names(cls) -> set:
        return {f.name for f in fields(cls)}

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelArgs":
        """Shapes of a Code Llama size ("7b", "13b", "34b", "70b") or a tiny test model."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width: 2/3 of 4*dim, scaled, rounded up (11008 for 7B, 28672 for 70B)."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def num_params(self) -> int:
        """Parameter count of the whole model (all model-parallel ranks together)."""
        attention = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.kv_heads)
        layer = attention + 3 * self.dim * self.ffn_hidden_dim + 2 * self.dim
        return self.n_layers * layer + 2 * self.vocab_size * self.dim + self.dim

    def kv_cache_bytes(self, element_size: int) -> int:
        """Bytes of the preallocated KV cache, all ranks together."""
        return (2 * self.n_layers * self.max_batch_size * self.max_seq_len * self.kv_heads
                * self.head_dim * element_size)


# The shapes of the released models (vocab 32016 where the tokenizer has the infill
# pieces; 34B and the Python models have 32000).
PRESETS = {
    "7b": dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256, ffn_dim_multiplier=1.0,
               norm_eps=1e-5, rope_theta=1e6, vocab_size=32016),
    "13b": dict(dim=5120, n_layers=40, n_heads=40, multiple_of=256, ffn_dim_multiplier=1.0,
                norm_eps=1e-5, rope_theta=1e6, vocab_size=32016),
    "34b": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, multiple_of=256,
                ffn_dim_multiplier=1.0, norm_eps=1e-5, rope_theta=1e6, vocab_size=32000),
    "70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=10000, vocab_size=32016),
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
                 ffn_dim_multiplier=1.0, norm_eps=1e-5, rope_theta=1e6, vocab_size=512),
}


@contextlib.contextmanager
def skip_fairscale_init():
    """Build parallel layers without fairscale's weight initialisation.

    fairscale fills a full-size "master" matrix per layer and copies this rank's slice
    out of it. Our weights always come from strict loading afterwards, so that work is
    wasted; at MP>1 it allocates every whole matrix once, and when buffers are built on a
    GPU it copies between devices and fails. Parameters stay uninitialised placeholders
    (never touched, so they take no memory) until loading replaces them."""
    with mock.patch.object(fairscale, "_initialize_affine_weight",
                           lambda *args, **kwargs: None):
        yield


# fairscale's layers, for their sharded parameters (names and shapes of the reference's),
# with forwards for inference: the local matmul, then the gather a column-parallel layer
# needs, written so that torch.compile traces it (see distributed.all_reduce). A
# row-parallel layer leaves its partial sum to add_summed, which sums over the ranks.
class ColumnParallelLinear(fairscale.ColumnParallelLinear):
    """Output features split over ranks; gathered only with gather_output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        return all_gather_last_dim(y) if self.gather_output else y


class RowParallelLinear(fairscale.RowParallelLinear):
    """Input features split over ranks (the input arrives split). Returns this rank's
    partial sum of the output: the caller adds the ranks' partials up together with the
    residual and the next norm (see add_summed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class ParallelEmbedding(fairscale.ParallelEmbedding):
    """Embedding dimension split over ranks; gathered."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return all_gather_last_dim(F.embedding(tokens, self.weight))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, then scale in the model dtype, as the reference does.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_table(head_dim: int, end: int, theta: float) -> torch.Tensor:
    """cos and sin of every (position, frequency) pair: shape (end, head_dim // 2, 2), float32.

    Computed in float32 exactly like the reference's complex `freqs_cis`, but stored as
    real numbers so that the rotation compiles and runs on devices without complex support.
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2j], x[2j+1]) of the last dim (Meta's interleaved layout).

    x: (bsz, seqlen, heads, head_dim); cos_sin: (bsz, seqlen, head_dim // 2, 2).
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    re, im = pairs.unbind(-1)
    cos, sin = cos_sin[:, :, None].unbind(-1)
    rotated = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Preallocated keys and values, (max_batch_size, kv_heads, max_seq_len, head_dim).

    Keys are stored after RoPE. Each row writes at its own positions, so rows of a batch
    may hold sequences of different lengths.
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, kv_heads: int, head_dim: int):
        super().__init__()
        shape = (max_batch_size, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape), persistent=False)
        self.register_buffer("v", torch.zeros(shape), persistent=False)

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        """Write k, v (bsz, seqlen, heads, head_dim) at positions (bsz, seqlen); return the
        first kv_len cached positions of those rows as (bsz, heads, kv_len, head_dim)."""
        bsz = k.shape[0]
        rows = torch.arange(bsz, device=k.device)[:, None]
        self.k[rows, :, positions] = k.to(self.k.dtype)
        self.v[rows, :, positions] = v.to(self.v.dtype)
        return self.k[:bsz, :, :kv_len], self.v[:bsz, :, :kv_len]


def attend(q, k, v, mask) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads.

    q: (bsz, heads, seqlen, head_dim); k, v: (bsz, kv_heads, kv_len, head_dim).
    mask: None (every key visible), CAUSAL (query i sees keys up to kv_len - seqlen + i:
    a prefill chunk after kv_len - seqlen cached tokens, run by flash kernels without a
    materialised mask), key counts (an integer (bsz,) tensor, where kernels.available:
    one query per row, which sees its row's first counts[b] keys), or a boolean
    (bsz, 1, seqlen, kv_len) tensor, True where visible.
    """
    seqlen, kv_len = q.shape[2], k.shape[2]
    if isinstance(mask, torch.Tensor) and mask.dtype in (torch.int32, torch.int64):
        return kernels.decode_attention(q, k, v, mask)
    if seqlen == 1 and kv_len > MASKED_SDPA_MAX_LEN and isinstance(mask, torch.Tensor):
        return attend_one_query(q, k, v, mask)
    gqa = k.shape[1] != q.shape[1]
    if mask is CAUSAL:
        if seqlen == kv_len:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        mask = causal_lower_right(seqlen, kv_len)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


# Without Triton (so without kernels.decode_attention), a masked decoding step over more
# cache positions than this uses attend_one_query. Without
# a mask, SDPA's flash kernels read a 100k-token cache near the copy bandwidth (4.5 TB/s on
# an H200); with one, it falls back to kernels that give each (row, head) pair one thread
# block, so at batch 1 most of the GPU idles (benchmarks/decode_attention.py measures both).
MASKED_SDPA_MAX_LEN = 16384
_BMM_OUT_DTYPE = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 8)


def attend_one_query(q, k, v, mask) -> torch.Tensor:
    """attend() for one query position per row (decoding), as two batched matrix products
    that cuBLAS spreads over the whole GPU along the keys. The scores and softmax are
    float32 (only the probabilities are rounded to the model dtype for the product with
    the values). Shapes as in attend(); mask None or (bsz, 1, 1, kv_len)."""
    bsz, heads, _, hd = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    # Query heads that share a key/value head are adjacent (SDPA's enable_gqa layout),
    # so each group is the rows of one product: keys are read once per group.
    qg = q.reshape(bsz * kv_heads, group, hd)
    kt = k.reshape(bsz * kv_heads, kv_len, hd).transpose(1, 2)
    if q.dtype == torch.float32:
        scores = torch.bmm(qg, kt)
    elif q.is_cuda and _BMM_OUT_DTYPE:
        scores = torch.bmm(qg, kt, out_dtype=torch.float32)
    else:
        scores = torch.bmm(qg.float(), kt.float())
    scores = scores.view(bsz, kv_heads, group, kv_len) * hd ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask.view(bsz, 1, 1, kv_len), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(bsz * kv_heads, group, kv_len)
    out = torch.bmm(probs, v.reshape(bsz * kv_heads, kv_len, hd))
    return out.view(bsz, heads, 1, hd)


CAUSAL = object()  # sentinel: causal attention aligned to the end of the keys


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        world = get_model_parallel_world_size()
        self.n_local_heads = args.n_heads // world
        self.n_local_kv_heads = args.kv_heads // world
        self.head_dim = args.head_dim
        identity = lambda x: x  # weights come from the checkpoint; loading is strict

        def column(out_features):
            return ColumnParallelLinear(
                args.dim, out_features, bias=False, gather_output=False, init_method=identity
            )

        self.wq = column(args.n_heads * self.head_dim)
        self.wk = column(args.kv_heads * self.head_dim)
        self.wv = column(args.kv_heads * self.head_dim)
        self.wo = RowParallelLinear(
            args.n_heads * self.head_dim, args.dim, bias=False, input_is_parallel=True,
            init_method=identity,
        )
        self.cache = KVCache(
            args.max_batch_size, args.max_seq_len, self.n_local_kv_heads, self.head_dim
        )
        self.wqkv: Optional[torch.Tensor] = None  # set by fuse(): wq, wk, wv in one matrix

    def fuse(self) -> None:
        """Concatenate wq, wk, wv into one matrix (one matmul instead of three, which
        matters when decoding is bound by launches and memory reads); the three weights
        become views into it, so the state dict is unchanged."""
        self.wqkv = fuse_weights(self.wq, self.wk, self.wv)

    def forward(self, x, cos_sin, positions, mask, kv_len):
        """This rank's partial sum of the attention output (see RowParallelLinear)."""
        bsz, seqlen, _ = x.shape
        n_q, n_kv, hd = self.n_local_heads, self.n_local_kv_heads, self.head_dim
        if self.wqkv is None:
            xqkv = torch.cat([self.wq(x), self.wk(x), self.wv(x)], dim=-1)
        else:
            xqkv = F.linear(x, self.wqkv)
        # q and k sit side by side: rotate them in one pass.
        qk, v = xqkv.split([(n_q + n_kv) * hd, n_kv * hd], dim=-1)
        qk = apply_rope(qk.view(bsz, seqlen, n_q + n_kv, hd), cos_sin)
        q, k = qk.split([n_q, n_kv], dim=2)
        keys, values = self.cache.update(positions, k, v.view(bsz, seqlen, n_kv, hd), kv_len)
        out = attend(q.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype), mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


def fuse_weights(*layers: nn.Module) -> torch.Tensor:
    """One tensor holding the weights of `layers` stacked along dim 0; each layer's
    weight is re-pointed at its rows of it (no extra memory once the old ones are freed)."""
    fused = torch.cat([layer.weight.detach() for layer in layers])
    start = 0
    for layer in layers:
        rows = layer.weight.shape[0]
        layer.weight.data = fused[start:start + rows]
        start += rows
    return fused


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        identity = lambda x: x
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False,
                                       init_method=identity)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True,
                                    init_method=identity)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False,
                                       init_method=identity)

        self.w13: Optional[torch.Tensor] = None  # set by fuse(): w1 and w3 in one matrix

    def fuse(self) -> None:
        self.w13 = fuse_weights(self.w1, self.w3)

    def forward(self, x):
        """This rank's partial sum of the block's output (see RowParallelLinear)."""
        if self.w13 is None:
            h = F.silu(self.w1(x)) * self.w3(x)
        else:
            gate, up = F.linear(x, self.w13).chunk(2, dim=-1)
            h = F.silu(gate) * up
        # An identity view whose input torch.compile must write to memory: without it, at
        # batch 1, inductor evaluates silu(gate) * up inside the w2 product's reduction,
        # where every program recomputes it over the whole hidden width. Writing it once
        # made 13B decode 3.7% (MP=1) and 4.5% (MP=2) faster on H200s (benchmarks/NOTES.md,
        # v8). Eager, a free view.
        return self.w2(torch.as_strided(h, h.shape, h.stride()))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, normed, next_norm, cos_sin, positions, mask, kv_len, peers=None):
        """x: the residual stream; normed: attention_norm(x), made by the step before.
        Returns this block's output and next_norm of it (the next block's attention_norm,
        or the final norm), so that each sum over ranks is fused with the norm after it."""
        partial = self.attention(normed, cos_sin, positions, mask, kv_len)
        h, normed = add_summed(partial, x, self.ffn_norm, peers, slot=0)
        return add_summed(self.feed_forward(normed), h, next_norm, peers, slot=1)


def add_summed(partial, residual, norm: RMSNorm, peers=None, slot: int = 0):
    """(h, norm(h)) where h = residual + partial summed over the model-parallel ranks.

    With `peers` (allreduce.PeerBuffers, from configure(symmetric_memory=True) at MP>1)
    and a batch that fits them, one kernel does the sum, the add and the norm; `slot`
    alternates between a layer's two calls (see allreduce.py). Otherwise an all-reduce
    (nothing at MP=1), an add and the norm."""
    if peers is not None and peers.fits(partial, norm.weight):
        return peers.sum_add_norm(partial, residual, norm.weight, norm.eps, slot)
    h = residual + all_reduce(partial)
    return h, norm(h)


def attention_mask(start_pos, positions: torch.Tensor, seqlen: int, kv_len: int,
                   head_dim: int):
    """The cheapest mask that is right for this call (see `attend`)."""
    if isinstance(start_pos, int) and kv_len == start_pos + seqlen:
        # Every row holds exactly the keys before and in this chunk.
        return None if seqlen == 1 else CAUSAL
    if seqlen == 1 and kernels.available(positions.device, head_dim):
        return positions[:, 0] + 1  # decoding: each row sees the keys up to its position
    key_pos = torch.arange(kv_len, device=positions.device)
    return (key_pos <= positions[..., None])[:, None]


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        if params.n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {params.n_layers}")
        world = get_model_parallel_world_size()
        for name, size in [("n_heads", params.n_heads), ("n_kv_heads", params.kv_heads),
                           ("dim", params.dim), ("vocab_size", params.vocab_size),
                           ("FFN hidden size", params.ffn_hidden_dim)]:
            if size % world:
                raise ValueError(
                    f"{name} = {size} is not divisible by the model-parallel size {world}; "
                    f"run with a number of processes that divides it"
                )
        identity = lambda x: x
        self.tok_embeddings = ParallelEmbedding(params.vocab_size, params.dim,
                                                init_method=identity)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, bias=False,
                                           init_method=identity)
        # Symmetric-memory buffers for fused sums over ranks (allreduce.py); set by
        # Llama.configure(symmetric_memory=True) at MP>1 on CUDA.
        self.peers = None
        # One row per cache position (the reference made twice as many, never read).
        self.register_buffer(
            "rope", rope_table(params.head_dim, params.max_seq_len, params.rope_theta),
            persistent=False,
        )

    def positions(self, start_pos: Union[int, torch.Tensor], bsz: int, seqlen: int):
        """Absolute positions (bsz, seqlen) of the tokens, from one start or one per row."""
        device = self.rope.device
        offsets = torch.arange(seqlen, device=device)
        if isinstance(start_pos, int):
            return (start_pos + offsets).expand(bsz, seqlen)
        return start_pos.to(device)[:, None] + offsets

    def forward_hidden(self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor],
                       kv_len: Optional[int] = None) -> torch.Tensor:
        """Final normalised hidden states (bsz, seqlen, dim) for `tokens` placed at
        `start_pos` (an int, or a tensor with one start per row), updating the KV cache.

        kv_len: how many cache positions attention reads; at least the largest position
        plus one. Computed when not given (which costs a host sync for tensor starts).
        Not wrapped in inference_mode itself, so that torch.compile can trace it (inductor
        mishandles some views under inference_mode); callers disable autograd.
        """
        bsz, seqlen = tokens.shape
        positions = self.positions(start_pos, bsz, seqlen)
        if kv_len is None:
            lowest, highest = (int(v) for v in torch.aminmax(positions))
            if lowest < 0:  # would index the RoPE table and the cache from their ends
                raise ValueError(f"start_pos must be >= 0, got {start_pos}")
            kv_len = highest + 1
        elif isinstance(start_pos, int) and start_pos < 0:
            raise ValueError(f"start_pos must be >= 0, got {start_pos}")
        max_seq_len, max_batch = self.params.max_seq_len, self.params.max_batch_size
        if kv_len > max_seq_len or bsz > max_batch:
            raise ValueError(
                f"{bsz} rows up to position {kv_len} do not fit the KV cache of "
                f"{max_batch} rows x {max_seq_len} positions; raise max_batch_size/max_seq_len"
            )
        mask = attention_mask(start_pos, positions, seqlen, kv_len, self.params.head_dim)
        cos_sin = self.rope[positions].float()  # float32 even after a model-wide .to(dtype)
        h = self.tok_embeddings(tokens)
        normed = self.layers[0].attention_norm(h)
        for i, layer in enumerate(self.layers):
            last = i + 1 == len(self.layers)
            next_norm = self.norm if last else self.layers[i + 1].attention_norm
            h, normed = layer(h, normed, next_norm, cos_sin, positions, mask, kv_len,
                              self.peers)
        return normed

    def fuse(self) -> "Transformer":
        """Fuse each layer's q/k/v and w1/w3 projections (see Attention.fuse)."""
        for layer in self.layers:
            layer.attention.fuse()
            layer.feed_forward.fuse()
        return self

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor]):
        """Float32 logits (bsz, seqlen, vocab_size) for every position of `tokens`."""
        return self.output(self.forward_hidden(tokens, start_pos)).float()
