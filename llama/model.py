"""The Code Llama Transformer, model-parallel through fairscale.

The textbook Llama: each block is `h = x + attention(attention_norm(x))` followed by
`h + feed_forward(ffn_norm(h))`. Parameter names, shapes and the parallel split are
those of Meta's reference, with one difference in layout: the query, key and value
projections are stored as one matrix (`attention.wqkv`), and so are the two input
projections of the feed-forward block (`feed_forward.w13`), so every step runs one
product where the reference runs three or two. Loading and saving keep Meta's names:
`load_state_dict` fuses them and `state_dict` splits them again (stack_meta_parts).

The KV cache is a small module whose rows can sit at different positions, so a ragged
batch is prefilled in one pass and decoded without teacher forcing. Attention goes
through `torch.nn.functional.scaled_dot_product_attention`, with a mask that is correct
for any `start_pos` (chunked prefill works); steps of up to 16 tokens per row on CUDA
(decoding, speculative verify) use the Triton kernel of kernels.py, which reads each
row's length from the device.

Everything else that makes decoding fast on a GPU is applied from outside, on a model
built from this file: CUDA graphs and torch.compile (graphs.py), the fused sum over ranks
at MP>1 (allreduce.py), quantized products (quantize.py swaps the linear layers).
"""

import contextlib
from dataclasses import dataclass, fields
from typing import Dict, NamedTuple, Optional, Union
from unittest import mock

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fairscale
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size
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


# fairscale's layers, for their sharded parameters, with forwards for inference whose
# collectives torch.compile can trace (see distributed.all_reduce).
class ColumnParallelLinear(fairscale.ColumnParallelLinear):
    """Output features split over ranks; gathered only with gather_output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        return all_gather_last_dim(y) if self.gather_output else y


class RowParallelLinear(fairscale.RowParallelLinear):
    """Input features split over ranks (the input arrives split); the ranks' partial
    products are summed. allreduce.enable turns `reduce_output` off and sums them itself,
    together with the residual add and the next norm."""

    reduce_output = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        return all_reduce(y) if self.reduce_output else y


class ParallelEmbedding(fairscale.ParallelEmbedding):
    """Embedding dimension split over ranks; gathered."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return all_gather_last_dim(F.embedding(tokens, self.weight))


def column(in_features: int, out_features: int, gather_output: bool = False):
    # Weights come from strict loading, never from fairscale's init (see skip_fairscale_init).
    return ColumnParallelLinear(in_features, out_features, bias=False,
                                gather_output=gather_output, init_method=lambda x: x)


def row(in_features: int, out_features: int):
    return RowParallelLinear(in_features, out_features, bias=False, input_is_parallel=True,
                             init_method=lambda x: x)


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


CAUSAL = object()  # mask sentinel: causal attention aligned to the end of the keys


class StepInputs(NamedTuple):
    """What every layer's attention needs about the tokens of a forward pass."""

    positions: torch.Tensor  # (bsz, seqlen) absolute positions
    cos_sin: torch.Tensor  # their rows of the RoPE table
    mask: object  # see attend
    kv_len: int  # cache positions attention reads


def attend(q, k, v, mask) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads.

    q: (bsz, heads, seqlen, head_dim); k, v: (bsz, kv_heads, kv_len, head_dim).
    mask: None (every key visible), CAUSAL (query i sees keys up to kv_len - seqlen + i:
    a prefill chunk after kv_len - seqlen cached tokens, run by flash kernels without a
    materialised mask), key counts (an integer (bsz,) tensor, where kernels.available,
    for up to kernels.MAX_QUERIES queries per row: the last one sees its row's first
    counts[b] keys, each one before it a key fewer), or a boolean (bsz, 1, seqlen,
    kv_len) tensor, True where visible.
    """
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
        return kernels.decode_attention(q, k, v, mask)
    seqlen, kv_len = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]
    if mask is CAUSAL:
        if seqlen == kv_len:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        mask = causal_lower_right(seqlen, kv_len)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def attention_mask(start_pos, positions: torch.Tensor, seqlen: int, kv_len: int,
                   head_dim: int):
    """The cheapest mask that is right for this call (see `attend`)."""
    if isinstance(start_pos, int) and kv_len == start_pos + seqlen:
        # Every row holds exactly the keys before and in this chunk.
        return None if seqlen == 1 else CAUSAL
    if seqlen <= kernels.MAX_QUERIES and kernels.available(positions.device, head_dim):
        # Decode and verify steps: each row sees the keys up to its last position.
        return positions[:, -1] + 1
    key_pos = torch.arange(kv_len, device=positions.device)
    return (key_pos <= positions[..., None])[:, None]


def stack_meta_parts(module: nn.Module, parts: Dict[str, tuple]) -> None:
    """Let `module` load and save its fused weights under Meta's names.

    parts: for each fused parameter (relative name), the Meta keys stacked in it, in
    order. `load_state_dict` given the Meta keys concatenates them (the reference's
    checkpoints load as they are); `state_dict` splits the fused weight into views with
    Meta's names and shapes, in Meta's key order, so what it returns is what the
    reference would save. checkpoint.load_into reads `module.meta_parts` to do the same
    while loading tensor by tensor."""
    module.meta_parts = parts

    def fuse(module, state, prefix, *_):
        for fused, names in parts.items():
            keys = [prefix + n for n in names]
            if all(k in state for k in keys):
                state[prefix + fused] = torch.cat([state.pop(k) for k in keys])

    def split(module, state, prefix, *_):
        ours = [k for k in state if k.startswith(prefix)]
        items = [(k, state.pop(k)) for k in ours]
        for key, value in items:
            names = parts.get(key[len(prefix):])
            # Quantized weights (integer codes, with scales beside them) stay fused.
            if names is None or not isinstance(value, torch.Tensor) \
                    or not value.is_floating_point():
                state[key] = value
                continue
            rows = [module.meta_rows(name) for name in names]
            for name, piece in zip(names, value.split(rows)):
                state[prefix + name] = piece

    module.register_load_state_dict_pre_hook(fuse)
    module.register_state_dict_post_hook(split)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        world = get_model_parallel_world_size()
        self.n_local_heads = args.n_heads // world
        self.n_local_kv_heads = args.kv_heads // world
        self.head_dim = hd = args.head_dim
        self.wqkv = column(args.dim, (args.n_heads + 2 * args.kv_heads) * hd)
        self.wo = row(args.n_heads * hd, args.dim)
        self.cache = KVCache(args.max_batch_size, args.max_seq_len, self.n_local_kv_heads, hd)
        stack_meta_parts(self, {"wqkv.weight": ("wq.weight", "wk.weight", "wv.weight")})

    def meta_rows(self, name: str) -> int:
        """This rank's rows of Meta's wq, wk or wv."""
        heads = self.n_local_heads if name == "wq.weight" else self.n_local_kv_heads
        return heads * self.head_dim

    def forward(self, x: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        n_q, n_kv, hd = self.n_local_heads, self.n_local_kv_heads, self.head_dim
        # q and k sit side by side: rotate them in one pass.
        qk, v = self.wqkv(x).split([(n_q + n_kv) * hd, n_kv * hd], dim=-1)
        qk = apply_rope(qk.view(bsz, seqlen, n_q + n_kv, hd), inputs.cos_sin)
        q, k = qk.split([n_q, n_kv], dim=2)
        keys, values = self.cache.update(inputs.positions, k, v.view(bsz, seqlen, n_kv, hd),
                                         inputs.kv_len)
        out = attend(q.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype), inputs.mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w13 = column(dim, 2 * hidden_dim)
        self.w2 = row(hidden_dim, dim)
        self.hidden_local = hidden_dim // get_model_parallel_world_size()
        stack_meta_parts(self, {"w13.weight": ("w1.weight", "w3.weight")})

    def meta_rows(self, name: str) -> int:
        return self.hidden_local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        h = F.silu(gate) * up
        # An identity view that torch.compile must write to memory: otherwise, at batch 1,
        # inductor computes silu(gate) * up inside the w2 product's reduction, where every
        # program recomputes it over the whole hidden width. Eager, a free view.
        return self.w2(torch.as_strided(h, h.shape, h.stride()))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), inputs)
        return h + self.feed_forward(self.ffn_norm(h))


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
        self.tok_embeddings = ParallelEmbedding(params.vocab_size, params.dim,
                                                init_method=lambda x: x)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = column(params.dim, params.vocab_size, gather_output=True)
        # One row per cache position (the reference made twice as many, never read).
        self.register_buffer(
            "rope", rope_table(params.head_dim, params.max_seq_len, params.rope_theta),
            persistent=False,
        )

    def reset_buffers(self) -> None:
        """Fill the RoPE table and empty the KV caches: for a model whose tensors were
        allocated without values (`to_empty`, after building it on the meta device)."""
        p = self.params
        self.rope.copy_(rope_table(p.head_dim, p.max_seq_len, p.rope_theta))
        for layer in self.layers:
            layer.attention.cache.k.zero_()
            layer.attention.cache.v.zero_()

    def step_inputs(self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor],
                    kv_len: Optional[int] = None) -> StepInputs:
        """Positions, RoPE rows and mask for `tokens` placed at `start_pos` (an int, or a
        tensor with one start per row). kv_len is computed when not given, which costs a
        host sync for tensor starts."""
        bsz, seqlen = tokens.shape
        offsets = torch.arange(seqlen, device=self.rope.device)
        if isinstance(start_pos, int):
            positions = (start_pos + offsets).expand(bsz, seqlen)
        else:
            positions = start_pos.to(self.rope.device)[:, None] + offsets
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
        return StepInputs(positions, cos_sin, mask, kv_len)

    def forward_hidden(self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor],
                       kv_len: Optional[int] = None) -> torch.Tensor:
        """Final normalised hidden states (bsz, seqlen, dim), updating the KV cache.

        kv_len: how many cache positions attention reads; at least the largest position
        plus one (see step_inputs). Not wrapped in inference_mode itself, so that
        torch.compile can trace it (inductor mishandles some views under inference_mode);
        callers disable autograd."""
        inputs = self.step_inputs(tokens, start_pos, kv_len)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, inputs)
        return self.norm(h)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: Union[int, torch.Tensor]):
        """Float32 logits (bsz, seqlen, vocab_size) for every position of `tokens`."""
        return self.output(self.forward_hidden(tokens, start_pos)).float()
