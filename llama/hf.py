"""The mapping between Meta's checkpoint layout and Hugging Face's (`LlamaForCausalLM`).

Pure translation, no file of weights is read here: tensor names both ways, config.json
<-> params.json, the RoPE reordering of the q/k projections, and the two small JSON files
of a Hugging Face folder (config.json and model.safetensors.index.json). Reading the
weights themselves, Meta's or Hugging Face's, is checkpoint.py's.
"""

import re
from pathlib import Path
from typing import Dict, Optional

import torch

from . import hparams
from .model import ModelArgs

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
# RoPE tables saved by Llama 1/2 tooling (Meta's key) and by transformers before 4.31
# (HF's suffix) but never used: RoPE is recomputed from rope_theta.
IGNORED_KEYS = {"rope.freqs"}
HF_IGNORED_SUFFIX = "rotary_emb.inv_freq"
# config.json key -> params.json key, for the numbers that mean the same in both.
HF_PARAMS = {
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "rms_norm_eps": "norm_eps",
    "rope_theta": "rope_theta",
    "vocab_size": "vocab_size",
}
HF_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "vocab_size")
# transformers' LlamaConfig defaults, for config.json files that leave these out.
HF_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0}
# Where llama.convert keeps the original params.json inside config.json, so that
# converting back writes the same keys and values.
PARAMS_KEY = "codellama_params"
INDEX = "model.safetensors.index.json"
SAFETENSORS_MISSING = ('this needs the safetensors package: pip install safetensors '
                       '(or pip install -e ".[hf]" in a checkout of this project)')


# ---- tensors --------------------------------------------------------------------------------

def rope_permute(w: torch.Tensor, n_heads: int, to_hf: bool) -> torch.Tensor:
    """Reorder q/k projection rows between Meta's interleaved RoPE pairs (2j, 2j+1) and
    HF's split halves (j, j + head_dim/2). The reordering stays inside each head, so it
    commutes with splitting the rows by whole heads between model-parallel ranks."""
    rows, cols = w.shape
    half = rows // n_heads // 2
    if to_hf:
        return w.view(n_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)
    return w.view(n_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)


def rope_heads(meta_key: str, args: ModelArgs) -> Optional[int]:
    """How many heads a full q or k projection holds; None for the other tensors."""
    if meta_key.endswith("attention.wq.weight"):
        return args.n_heads
    if meta_key.endswith("attention.wk.weight"):
        return args.kv_heads
    return None


def hf_key(meta_key: str) -> str:
    if meta_key in HF_TOP_KEYS:
        return HF_TOP_KEYS[meta_key]
    layer, rest = re.match(r"layers\.(\d+)\.(.+)", meta_key).groups()
    return f"model.layers.{layer}.{HF_LAYER_KEYS[rest]}"


def meta_key(hf_name: str) -> Optional[str]:
    """The Meta key of a Hugging Face tensor name; None if LlamaForCausalLM has no such
    weight."""
    top = {v: k for k, v in HF_TOP_KEYS.items()}
    if hf_name in top:
        return top[hf_name]
    layer_keys = {v: k for k, v in HF_LAYER_KEYS.items()}
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if match and match.group(2) in layer_keys:
        return f"layers.{match.group(1)}.{layer_keys[match.group(2)]}"
    return None


def meta_to_hf(state: Dict[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    """A full (unsharded) Meta state dict in Hugging Face `LlamaForCausalLM` layout."""
    out = {}
    for key, w in state.items():
        if key in IGNORED_KEYS:
            continue
        heads = rope_heads(key, args)
        out[hf_key(key)] = rope_permute(w, heads, to_hf=True) if heads else w
    return out


def hf_to_meta(state: Dict[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    """The inverse of meta_to_hf."""
    out = {}
    for name, w in state.items():
        key = meta_key(name)
        if key is None:
            raise ValueError(f"unexpected Hugging Face tensor {name}")
        heads = rope_heads(key, args)
        out[key] = rope_permute(w, heads, to_hf=False) if heads else w
    return out


# ---- config.json ----------------------------------------------------------------------------

def hf_config(args: ModelArgs) -> dict:
    """A `transformers` LlamaConfig dict with the same shapes as `args`."""
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama")
    config.update({hf: getattr(args, key) for hf, key in HF_PARAMS.items()})
    config.update(
        num_key_value_heads=args.kv_heads, rope_theta=float(args.rope_theta),
        intermediate_size=args.ffn_hidden_dim, max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2,
    )
    return config


def hf_tokenizer_config(max_length: int) -> dict:
    """tokenizer_config.json for a folder holding Meta's tokenizer.model: without it
    `transformers` loads the tokenizer with no BOS in front of a prompt, which every
    Llama model was trained with."""
    return {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
            "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "model_max_length": max_length}


def hf_rope(config: dict, key: str, default):
    """A RoPE setting of config.json: transformers 4 writes rope_theta and rope_scaling at
    the top level, transformers 5 writes both inside rope_parameters."""
    for outer in ("rope_parameters", "rope_scaling"):
        inner = config.get(outer) or {}
        if isinstance(inner, dict) and key in inner:
            return inner[key]
    return config.get(key, default)


def hf_rope_type(config: dict) -> str:
    return hf_rope(config, "rope_type", hf_rope(config, "type", "default"))


def hf_values(config: dict) -> dict:
    """config.json's numbers under params.json's names (ffn_hidden_dim for
    intermediate_size), transformers' defaults filled in."""
    values = {**HF_DEFAULTS, **config}
    values["rope_theta"] = hf_rope(config, "rope_theta", HF_DEFAULTS["rope_theta"])
    out = {key: values[hf] for hf, key in HF_PARAMS.items() if hf in values}
    return {**out, "ffn_hidden_dim": config["intermediate_size"]}


def read_hf_config(hf_dir: Path) -> dict:
    """config.json of a Hugging Face folder, checked to describe a model we can run."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Hugging Face model folder needs "
                                f"config.json")
    config = hparams.read_json(path)
    if config.get("model_type", "llama") != "llama":
        raise ValueError(f"{path} is for a {config['model_type']!r} model; only Llama "
                         f"(model_type 'llama') checkpoints can be read")
    missing = [k for k in HF_REQUIRED if k not in config]
    if missing:
        raise ValueError(f"{path} lacks the required key(s) {missing}")
    names = {key: hf for hf, key in HF_PARAMS.items()}
    hparams.check(hf_values(config), path, {**names, "ffn_hidden_dim": "intermediate_size"})
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    unsupported = [
        (f"RoPE scaling {hf_rope_type(config)!r}", hf_rope_type(config) != "default"),
        ("attention_bias=true", bool(config.get("attention_bias"))),
        ("mlp_bias=true", bool(config.get("mlp_bias"))),
        ("tie_word_embeddings=true", bool(config.get("tie_word_embeddings"))),
        (f"hidden_act={config.get('hidden_act')!r}", config.get("hidden_act", "silu") != "silu"),
        (f"head_dim={config.get('head_dim')}", config.get("head_dim", head_dim) != head_dim),
    ]
    bad = [what for what, is_bad in unsupported if is_bad]
    if bad:
        raise ValueError(f"{path} asks for {', '.join(bad)}, which Code Llama's architecture "
                         f"does not have; this folder holds a different model")
    return config


def ffn_params(dim: int, intermediate: int, source) -> dict:
    """multiple_of (and ffn_dim_multiplier) for which ModelArgs.ffn_hidden_dim is exactly
    `intermediate`. multiple_of=256 gives the released 7B, 13B and 34B widths; rounding up
    to a multiple of `intermediate` itself gives it back whenever 2/3 of 4*dim does not
    exceed it (70B's 28672); a multiplier of intermediate/(2/3 of 4*dim) covers the rest
    (int() may land one below `intermediate`, and rounding up restores it)."""
    base = int(2 * (4 * dim) / 3)
    candidates = [dict(multiple_of=256), dict(multiple_of=intermediate),
                  dict(multiple_of=intermediate, ffn_dim_multiplier=intermediate / base)]
    for params in candidates:
        if intermediate > 0 and ModelArgs(dim=dim, **params).ffn_hidden_dim == intermediate:
            return params
    raise ValueError(f"{source}: intermediate_size {intermediate} cannot be expressed with "
                     f"hidden_size {dim}; it must be a positive number")


def hf_params(config: dict, source) -> dict:
    """params.json fields for a config.json checked by read_hf_config (n_kv_heads only
    under grouped-query attention, as in Meta's files)."""
    params = hf_values(config)
    intermediate = params.pop("ffn_hidden_dim")
    if params.get("n_kv_heads") in (None, params["n_heads"]):
        params.pop("n_kv_heads", None)
    params.update(ffn_params(params["dim"], intermediate, source))
    return params


# ---- safetensors files ------------------------------------------------------------------------

def safe_open(path: Path):
    """A safetensors file opened for reading, its damage reported with its name."""
    try:
        from safetensors import SafetensorError, safe_open as open_file
    except ImportError:
        raise ImportError(f"{path} is a Hugging Face weight file: "
                          f"{SAFETENSORS_MISSING}") from None
    try:
        return open_file(str(path), framework="pt", device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{path} cannot be read as safetensors ({e}): it is incomplete or "
                         f"damaged; download it again") from None


def weight_files(hf_dir: Path) -> Dict[str, Path]:
    """Tensor name -> .safetensors file, from model.safetensors.index.json or, without
    one, from the files themselves."""
    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX
    if index.is_file():
        weight_map = hparams.read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map; download it again")
        for name in set(weight_map.values()):
            # Plain names only: an index must not point outside its folder.
            if not isinstance(name, str) or Path(name).name != name or not name:
                raise ValueError(f"{index} names the weight file {name!r}, which is not a "
                                 f"file name in {hf_dir}; download the index again")
        files = {name: hf_dir / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise FileNotFoundError(f"{index} names {f.name}, which is not in {hf_dir}; "
                                        f"download every shard the index lists")
        return files
    paths = sorted(hf_dir.glob("*.safetensors"))
    if not paths:
        raise FileNotFoundError(
            f"no *.safetensors weights in {hf_dir}; save the model with transformers' "
            f"save_pretrained (safetensors is its default) or use Meta's consolidated.*.pth"
        )
    files = {}
    for path in paths:
        with safe_open(path) as f:
            for name in f.keys():
                if name in files:  # a second copy of a file, under another name
                    raise ValueError(f"{name} is in both {files[name]} and {path}; remove the "
                                     f"file that does not belong to this model")
                files[name] = path
    return files
