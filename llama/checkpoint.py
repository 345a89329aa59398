"""Reading checkpoints in Meta's original format.

A model folder holds `params.json`, `tokenizer.model` and one `consolidated.NN.pth` per
model-parallel rank it was saved for. SPLIT_DIMS below is the one place that says how
each tensor is split across ranks; it drives loading (any shard count onto any world
size whose splits divide evenly) and the Hugging Face conversion.
"""

import json
import re
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .model import ModelArgs

# Dimension along which each weight is split between model-parallel ranks (fairscale:
# ColumnParallelLinear splits outputs, dim 0; RowParallelLinear and ParallelEmbedding
# split inputs/embedding dim, dim 1). Norm weights are replicated.
SPLIT_DIMS = {
    "tok_embeddings.weight": 1,
    "output.weight": 0,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
}
# Saved by Llama 1/2 tooling but never used: RoPE is recomputed from rope_theta.
IGNORED_KEYS = {"rope.freqs"}
REQUIRED_PARAMS = ("dim", "n_layers", "n_heads")


def split_dim(key: str) -> Optional[int]:
    """The split dimension of a state-dict key, or None for replicated tensors."""
    return SPLIT_DIMS.get(re.sub(r"^layers\.\d+\.", "", key))


def read_params(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / "params.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Code Llama model folder needs params.json")
    params = json.loads(path.read_text())
    unknown = set(params) - ModelArgs.field_names()
    if unknown:
        raise ValueError(
            f"{path} has unknown key(s) {sorted(unknown)}; known keys are "
            f"{sorted(ModelArgs.field_names())}"
        )
    missing = [k for k in REQUIRED_PARAMS if k not in params]
    if missing:
        raise ValueError(f"{path} lacks the required key(s) {missing}")
    return params


def shard_files(ckpt_dir: Path) -> List[Path]:
    files = sorted(Path(ckpt_dir).glob("*.pth"))
    if not files:
        raise FileNotFoundError(
            f"no checkpoint files (*.pth) found in {ckpt_dir}; download a model with "
            f"download.sh or point ckpt_dir at a folder holding consolidated.00.pth"
        )
    return files


def rank_slice(shards: List[Dict[str, torch.Tensor]], key: str, rank: int, world: int,
               files: List[Path]) -> torch.Tensor:
    """This rank's part of `key`, cut from the N saved shards for a world of `world` ranks."""
    parts = [s[key] for s in shards]
    dim = split_dim(key)
    if dim is None:
        return parts[0]
    if any(p.shape != parts[0].shape for p in parts):
        shapes = ", ".join(f"{f.name}: {tuple(p.shape)}" for f, p in zip(files, parts))
        raise ValueError(f"shards disagree on the shape of {key} ({shapes}); the folder mixes "
                         f"files of different models")
    size = parts[0].shape[dim]
    full = size * len(parts)
    if full % world:
        raise ValueError(
            f"{key} has {full} rows along dim {dim}, which do not split evenly over "
            f"{world} model-parallel processes; use a process count that divides it"
        )
    if len(parts) == world:
        return parts[rank]
    start, stop = rank * full // world, (rank + 1) * full // world
    pieces = []
    for i, part in enumerate(parts):  # keep the overlap of shard i with [start, stop)
        lo, hi = max(start, i * size), min(stop, (i + 1) * size)
        if lo < hi:
            pieces.append(part.narrow(dim, lo - i * size, hi - lo))
    return torch.cat(pieces, dim=dim)


def load_rank_state(ckpt_dir: Path, rank: int, world: int) -> Dict[str, torch.Tensor]:
    """The state dict of one model-parallel rank, read lazily through mmap so that only
    this rank's bytes are paged in."""
    files = shard_files(ckpt_dir)
    shards = [torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in files]
    keys = set(shards[0])
    for f, s in zip(files[1:], shards[1:]):
        if set(s) != keys:
            raise ValueError(f"{f} holds other keys than {files[0]}; the folder mixes models")
    return {k: rank_slice(shards, k, rank, world, files) for k in sorted(keys - IGNORED_KEYS)}


def load_folder(ckpt_dir: Path, rank: int, world: int):
    """(params dict, this rank's state dict, default tokenizer path) of a model folder."""
    params = read_params(ckpt_dir)
    return params, load_rank_state(ckpt_dir, rank, world), Path(ckpt_dir) / "tokenizer.model"


def random_state(model: torch.nn.Module, seed: int, device, dtype) -> Dict[str, torch.Tensor]:
    """Random weights for every parameter of `model` (this rank's shapes), made directly on
    `device`: for benchmarks and tests that need real shapes but no checkpoint."""
    g = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for key, p in model.state_dict().items():
        if key.endswith("norm.weight"):
            state[key] = torch.ones(p.shape, device=device, dtype=dtype)
        else:
            w = torch.randn(p.shape, generator=g, device=device, dtype=dtype)
            state[key] = w.mul_(p.shape[-1] ** -0.5 if "embeddings" not in key else 1.0)
    return state


def check_state(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """Strict loading: every parameter present, nothing unknown, every shape right."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {source} does not match the model built from params.json: "
            f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"checkpoint {source}: {key} has shape {tuple(tensor.shape)} per rank, the "
                f"model expects {tuple(expected[key].shape)}; params.json or the tokenizer "
                f"does not belong to these weights"
            )


def load_into(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str,
              device: torch.device, dtype: torch.dtype) -> None:
    """Check `state` strictly, then make it the model's parameters on device in dtype."""
    check_state(model, state, source)
    model.load_state_dict(
        {k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True
    )


# ---- Hugging Face layout --------------------------------------------------------------
# Meta key (per layer, after "layers.{i}.") -> HF key (after "model.layers.{i}.").
HF_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
HF_TOP_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def rope_permute(w: torch.Tensor, n_heads: int, to_hf: bool) -> torch.Tensor:
    """Reorder q/k projection rows between Meta's interleaved RoPE pairs (2j, 2j+1) and
    HF's split halves (j, j + head_dim/2)."""
    rows, cols = w.shape
    half = rows // n_heads // 2
    if to_hf:
        return w.view(n_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)
    return w.view(n_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)


def hf_key(meta_key: str) -> str:
    if meta_key in HF_TOP_KEYS:
        return HF_TOP_KEYS[meta_key]
    layer, rest = re.match(r"layers\.(\d+)\.(.+)", meta_key).groups()
    return f"model.layers.{layer}.{HF_LAYER_KEYS[rest]}"


def meta_to_hf(state: Dict[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    """A full (unsharded) Meta state dict in Hugging Face `LlamaForCausalLM` layout."""
    out = {}
    for key, w in state.items():
        if key in IGNORED_KEYS:
            continue
        if key.endswith("attention.wq.weight"):
            w = rope_permute(w, args.n_heads, to_hf=True)
        elif key.endswith("attention.wk.weight"):
            w = rope_permute(w, args.kv_heads, to_hf=True)
        out[hf_key(key)] = w
    return out


def hf_to_meta(state: Dict[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    """The inverse of meta_to_hf."""
    to_meta = {hf_key(k): k for k in
               list(HF_TOP_KEYS) + [f"layers.{i}.{r}" for i in range(args.n_layers)
                                    for r in HF_LAYER_KEYS]}
    out = {}
    for key, w in state.items():
        if key not in to_meta:
            raise ValueError(f"unexpected Hugging Face tensor {key}")
        meta = to_meta[key]
        if meta.endswith("attention.wq.weight"):
            w = rope_permute(w, args.n_heads, to_hf=False)
        elif meta.endswith("attention.wk.weight"):
            w = rope_permute(w, args.kv_heads, to_hf=False)
        out[meta] = w
    return out


def hf_config(args: ModelArgs) -> dict:
    """A `transformers` LlamaConfig dict with the same shapes as `args`."""
    return dict(
        architectures=["LlamaForCausalLM"], model_type="llama",
        vocab_size=args.vocab_size, hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.kv_heads,
        rms_norm_eps=args.norm_eps, rope_theta=float(args.rope_theta),
        max_position_embeddings=args.max_seq_len, tie_word_embeddings=False,
        hidden_act="silu", bos_token_id=1, eos_token_id=2,
    )
