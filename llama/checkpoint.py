"""Reading checkpoints: Meta's original format and Hugging Face's.

A Meta model folder holds `params.json`, `tokenizer.model` and one `consolidated.NN.pth`
per model-parallel rank it was saved for. A Hugging Face folder holds `config.json`,
`*.safetensors` (with `model.safetensors.index.json` when there are several) and, for
us, `tokenizer.model`. SPLIT_DIMS below is the one place that says how each tensor is
split across ranks; it drives loading (any shard count onto any world size whose splits
divide evenly), the Hugging Face conversion and llama/convert.py.

Files are memory-mapped and sliced, so a rank reads from disk only its own part.
"""

import ctypes
import json
import mmap
import re
import sys
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from tqdm import tqdm

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


def split_range(full: int, world: int, rank: int, key: str, dim: int) -> Tuple[int, int]:
    """[start, stop) of `rank`'s part of `full` rows along `dim` in a world of `world`."""
    if full % world:
        raise ValueError(
            f"{key} has {full} rows along dim {dim}, which do not split evenly over "
            f"{world} model-parallel processes; use a process count that divides it"
        )
    return rank * full // world, (rank + 1) * full // world


def check_heads_split(args: ModelArgs, world: int, source) -> None:
    """Refuse, before reading any weight, a world size that does not divide the heads."""
    for what, n in (("attention heads", args.n_heads), ("key/value heads", args.kv_heads)):
        if n % world:
            raise ValueError(
                f"{source}: {n} {what} do not split over {world} model-parallel processes; "
                f"run with a process count that divides {n}"
            )


def progress(items: Iterable, desc: str, rank: int = 0):
    """A progress bar on rank 0 when stderr is a terminal (tqdm's disable=None)."""
    return tqdm(items, desc=desc, disable=True if rank else None, leave=False)


# ---- memory-mapped tensors ---------------------------------------------------------------

def mapped_ranges(path: Path) -> List[Tuple[int, int]]:
    """Address ranges where this process maps `path` privately, as torch.load(mmap=True)
    and safetensors do; empty where /proc/self/maps does not exist (not Linux)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    target = str(Path(path).resolve())
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target and fields[1].endswith("p"):
            lo, hi = fields[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def _madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


_MADVISE = _madvise() if sys.platform.startswith("linux") else None


def release_pages(t: torch.Tensor, ranges: List[Tuple[int, int]]) -> None:
    """Forget the resident pages of `t`'s storage once what was needed has been copied out.

    A process keeps every page it has read of a file mapping until the mapping goes, which
    for a memory-mapped checkpoint is when its last tensor is freed; slicing a whole file
    (a dim-1 split reads every row) would hold the checkpoint's pages on top of the rank's
    copy. MADV_DONTNEED on a private mapping that nothing wrote to only drops the pages (the
    kernel reads the file again if they are touched), so it is done only for storages that
    lie inside a private mapping of one of the checkpoint's own files.
    """
    storage = t.untyped_storage()
    start, size = storage.data_ptr(), storage.nbytes()
    lo = start - start % mmap.PAGESIZE  # mappings start on a page, so lo stays inside
    if _MADVISE is None or not size or not any(a <= lo and start + size <= b for a, b in ranges):
        return
    _MADVISE(lo, start + size - lo, mmap.MADV_DONTNEED)


class MappedShards:
    """A checkpoint as memory-mapped views: `parts[key]` holds one view per saved shard
    (split along SPLIT_DIMS; one view for a Hugging Face tensor). Nothing is read from disk
    until a part is sliced. `hf_args` is set for Hugging Face tensors, whose q/k rows are
    in HF's RoPE order and are put back in Meta's order as they are read."""

    def __init__(self, parts: Dict[str, List[torch.Tensor]], files: List[Path],
                 hf_args: Optional[ModelArgs] = None, names: Optional[Dict[str, str]] = None):
        self.parts = parts
        self.hf_args = hf_args
        self.names = names or {}  # Meta key -> "file: tensor name", for error messages
        self.mapped = [r for f in files for r in mapped_ranges(f)]

    def keys(self) -> List[str]:
        return list(self.parts)

    def full_shape(self, key: str) -> Tuple[int, ...]:
        parts, dim = self.parts[key], split_dim(key)
        shape = list(parts[0].shape)
        if dim is not None:
            shape[dim] *= len(parts)
        return tuple(shape)

    def rank_shape(self, key: str, world: int) -> Tuple[int, ...]:
        """The shape of one rank's part of `key`, checked to split evenly (and, for
        Hugging Face q/k projections, to hold the heads config.json says)."""
        shape, dim = list(self.full_shape(key)), split_dim(key)
        heads = rope_heads(key, self.hf_args) if self.hf_args else None
        if heads:
            self._check_rope_rows(key, shape[0], heads)
        if dim is not None:
            start, stop = split_range(shape[dim], world, 0, key, dim)
            shape[dim] = stop - start
        return tuple(shape)

    def rank_state(self, rank: int, world: int) -> Dict[str, "Deferred"]:
        """One rank's state dict, each part to be read when load_into takes it."""
        return {k: Deferred(self, k, rank, world) for k in self.keys() if k not in IGNORED_KEYS}

    def release(self, key: str) -> None:
        for part in self.parts[key]:
            release_pages(part, self.mapped)

    def read(self, key: str, rank: int, world: int, copy: bool = False) -> torch.Tensor:
        """This rank's part of `key` for a world of `world` ranks, in Meta's layout.

        When the shard count equals the world size the part is a shard as it is: a view of
        the file, read only when used (unless `copy`). Otherwise it is a fresh tensor cut
        and joined from the shards, and the pages it was copied from are released.
        """
        piece = self._slice(key, rank, world, copy)
        heads = rope_heads(key, self.hf_args) if self.hf_args else None
        if heads:
            self._check_rope_rows(key, piece.shape[0] * world, heads)
            piece = rope_permute(piece, heads // world, to_hf=False)
            self.release(key)  # the permuted copy is what is kept
        return piece

    def _slice(self, key: str, rank: int, world: int, copy: bool) -> torch.Tensor:
        parts, dim = self.parts[key], split_dim(key)
        if len(parts) == world or dim is None:
            sources = [parts[rank if dim is not None else 0]]
            if not copy and len(parts) == world:
                return sources[0]
        else:
            size = parts[0].shape[dim]
            start, stop = split_range(size * len(parts), world, rank, key, dim)
            sources = []
            for i, part in enumerate(parts):  # keep the overlap of shard i with [start, stop)
                lo, hi = max(start, i * size), min(stop, (i + 1) * size)
                if lo < hi:
                    sources.append(part.narrow(dim, lo - i * size, hi - lo))
        piece = torch.cat(sources, dim=dim or 0)  # a copy, even of a single source
        self.release(key)
        return piece

    def _check_rope_rows(self, key: str, rows: int, heads: int) -> None:
        want = heads * self.hf_args.head_dim
        if rows != want:
            raise ValueError(
                f"{self.names.get(key, key)} has {rows} rows but config.json's {heads} heads "
                f"of {self.hf_args.head_dim} need {want}; this config.json does not belong "
                f"to these weights"
            )


class Deferred:
    """One rank's part of a checkpoint tensor, read only when load_into takes it: the state
    dict of a rank then costs no memory until the model's parameters are assigned one by
    one, so host memory never holds a whole rank's copy next to the model. `shape` is
    known before."""

    def __init__(self, src: MappedShards, key: str, rank: int, world: int):
        self.src, self.key, self.rank, self.world = src, key, rank, world
        self.shape = torch.Size(src.rank_shape(key, world))

    def load(self) -> torch.Tensor:
        return self.src.read(self.key, self.rank, self.world)

    def release(self) -> None:
        """Forget the file pages this part was read from (once it has been copied)."""
        self.src.release(self.key)


# ---- Meta's format ------------------------------------------------------------------------

def read_params(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / "params.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Code Llama model folder needs params.json")
    try:
        params = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); download the model again") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path} holds a {type(params).__name__}, not a JSON object of model "
                         f"hyperparameters; download the model again")
    unknown = set(params) - ModelArgs.field_names()
    if unknown:
        raise ValueError(
            f"{path} has unknown key(s) {sorted(unknown)}; known keys are "
            f"{sorted(ModelArgs.field_names())}"
        )
    missing = [k for k in REQUIRED_PARAMS if k not in params]
    if missing:
        raise ValueError(f"{path} lacks the required key(s) {missing}")
    for key in CACHE_SIZE_KEYS.intersection(params):
        warnings.warn(f"{path} sets {key}={params.pop(key)}, which is ignored: cache sizes "
                      f"are chosen when a model is built (Llama.build's {key}), not stored")
    return params


CACHE_SIZE_KEYS = {"max_seq_len", "max_batch_size"}


def shard_files(ckpt_dir: Path) -> List[Path]:
    files = sorted(Path(ckpt_dir).glob("*.pth"))
    if not files:
        raise FileNotFoundError(
            f"no checkpoint files (*.pth) found in {ckpt_dir}; download a model with "
            f"download.sh or point ckpt_dir at a folder holding consolidated.00.pth"
        )
    return files


def open_meta(ckpt_dir: Path) -> MappedShards:
    """The consolidated.NN.pth files of a folder, memory-mapped, checked to be shards of
    one model (same keys, same shapes)."""
    files = shard_files(ckpt_dir)
    shards = []
    for f in files:
        try:
            shards.append(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
        except (RuntimeError, EOFError) as e:  # not a zip archive that torch.load can map
            raise ValueError(
                f"{f} cannot be read as a PyTorch checkpoint ({str(e).splitlines()[0]}): it "
                f"is incomplete or damaged (download it again; download.sh resumes and checks "
                f"it against checklist.chk), or not in torch.save's zip format (load it and "
                f"save it again with torch.save)") from None
    keys = list(shards[0])
    for f, s in zip(files[1:], shards[1:]):
        if set(s) != set(keys):
            raise ValueError(f"{f} holds other keys than {files[0]}; the folder mixes models")
    for key in keys:
        if any(s[key].shape != shards[0][key].shape for s in shards):
            shapes = ", ".join(f"{f.name}: {tuple(s[key].shape)}" for f, s in zip(files, shards))
            raise ValueError(f"shards disagree on the shape of {key} ({shapes}); the folder "
                             f"mixes files of different models")
    return MappedShards({k: [s[k] for s in shards] for k in keys}, files)


def load_rank_state(ckpt_dir: Path, rank: int, world: int) -> Dict[str, torch.Tensor]:
    """The state dict of one model-parallel rank, read now. Shards that are exactly this
    rank's part stay views of the file; resharded parts are copies whose source pages are
    released, so host memory holds about this rank's weights, not the checkpoint."""
    state = open_meta(ckpt_dir).rank_state(rank, world)
    return {k: part.load() for k, part in progress(state.items(), f"loading {ckpt_dir}", rank)}


# ---- Hugging Face's format ----------------------------------------------------------------
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
# Saved by transformers before 4.31 but never used: RoPE is recomputed from rope_theta.
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


def hf_rope(config: dict, key: str, default):
    """A RoPE setting of config.json: transformers 4 writes rope_theta and rope_scaling at
    the top level, transformers 5 writes both inside rope_parameters."""
    for outer in ("rope_parameters", "rope_scaling"):
        inner = config.get(outer) or {}
        if key in inner:
            return inner[key]
    return config.get(key, default)


def hf_rope_type(config: dict) -> str:
    return hf_rope(config, "rope_type", hf_rope(config, "type", "default"))


def read_hf_config(hf_dir: Path) -> dict:
    """config.json of a Hugging Face folder, checked to describe a model we can run."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Hugging Face model folder needs "
                                f"config.json")
    config = json.loads(path.read_text())
    if config.get("model_type", "llama") != "llama":
        raise ValueError(f"{path} is for a {config['model_type']!r} model; only Llama "
                         f"(model_type 'llama') checkpoints can be read")
    missing = [k for k in HF_REQUIRED if k not in config]
    if missing:
        raise ValueError(f"{path} lacks the required key(s) {missing}")
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
    """params.json fields for a config.json (n_kv_heads only under grouped-query
    attention, as in Meta's files)."""
    values = {**HF_DEFAULTS, **config}
    values["rope_theta"] = hf_rope(config, "rope_theta", HF_DEFAULTS["rope_theta"])
    params = {key: values[hf] for hf, key in HF_PARAMS.items() if hf in values}
    if params.get("n_kv_heads") in (None, params["n_heads"]):
        params.pop("n_kv_heads", None)
    params.update(ffn_params(params["dim"], config["intermediate_size"], source))
    return params


def safe_open(path: Path):
    try:
        from safetensors import safe_open as open_file
    except ImportError as e:
        raise ImportError("reading Hugging Face folders needs the safetensors package: "
                          "pip install safetensors") from e
    return open_file(str(path), framework="pt", device="cpu")


def hf_weight_files(hf_dir: Path) -> Dict[str, Path]:
    """Tensor name -> .safetensors file, from model.safetensors.index.json or, without
    one, from the files themselves."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map; download it again")
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
            files.update({name: path for name in f.keys()})
    return files


def open_hf(hf_dir: Path, args: ModelArgs) -> MappedShards:
    """A Hugging Face folder's tensors as memory-mapped views under Meta's key names."""
    files = hf_weight_files(hf_dir)
    parts, names = {}, {}
    for path in sorted(set(files.values())):
        with safe_open(path) as f:
            for name in f.keys():
                if name.endswith(HF_IGNORED_SUFFIX):
                    continue
                key = meta_key(name)
                if key is None:
                    raise ValueError(f"{path} holds {name}, which is not a weight of "
                                     f"LlamaForCausalLM; this folder holds a different model")
                parts[key] = [f.get_tensor(name)]  # a view of the file; nothing read yet
                names[key] = f"{path}: {name}"
    return MappedShards(parts, sorted(set(files.values())), hf_args=args, names=names)


# ---- either format ------------------------------------------------------------------------

def is_hf_folder(ckpt_dir: Path) -> bool:
    """config.json and no *.pth: where a folder has both formats, Meta's files win."""
    ckpt_dir = Path(ckpt_dir)
    return (ckpt_dir / "config.json").is_file() and not any(ckpt_dir.glob("*.pth"))


def load_folder(ckpt_dir: Path, rank: int, world: int):
    """(params dict, this rank's state dict, default tokenizer path) of a model folder in
    Meta's format or Hugging Face's. The state dict's values are Deferred parts (with
    shape and dtype) that load_into reads one at a time."""
    ckpt_dir = Path(ckpt_dir)
    if is_hf_folder(ckpt_dir):
        params = hf_params(read_hf_config(ckpt_dir), ckpt_dir / "config.json")
        args = ModelArgs(**params)
        check_heads_split(args, world, ckpt_dir / "config.json")
        state = open_hf(ckpt_dir, args).rank_state(rank, world)
    else:
        if not (ckpt_dir / "params.json").is_file() and not any(ckpt_dir.glob("*.pth")):
            raise FileNotFoundError(
                f"no checkpoint in {ckpt_dir}: expected params.json with consolidated.NN.pth "
                f"(Meta's format) or config.json with *.safetensors (Hugging Face's)"
            )
        params = read_params(ckpt_dir)
        check_heads_split(ModelArgs(**params), world, ckpt_dir / "params.json")
        state = open_meta(ckpt_dir).rank_state(rank, world)
    return params, state, ckpt_dir / "tokenizer.model"


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
            f"checkpoint {source} does not match the model built from its params.json or "
            f"config.json: missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    for key, tensor in state.items():
        got, want = tuple(tensor.shape), tuple(expected[key].shape)
        if got != want:
            # One dimension a whole number of times too small: shards may be missing.
            differ = [(g, w) for g, w in zip(got, want) if g != w]
            short = (len(got) == len(want) and len(differ) == 1 and 0 < differ[0][0]
                     and differ[0][1] % differ[0][0] == 0)
            hint = (f", or the folder lacks shards (it holds 1/{differ[0][1] // differ[0][0]} "
                    f"of this weight)" if short else "")
            raise ValueError(
                f"checkpoint {source}: {key} has shape {got} per rank, the model expects "
                f"{want}; params.json or the tokenizer does not belong to these weights{hint}"
            )


def load_into(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str,
              device: torch.device, dtype: torch.dtype) -> None:
    """Check `state` strictly, then make it the model's parameters on device in dtype.

    Parameters are replaced one at a time and taken out of `state` (which is empty
    afterwards): each placeholder of the model is freed as its real weight arrives, and
    Deferred parts are read just then, so neither host nor device memory ever holds two
    copies of the weights. A tensor already on `device` in `dtype` is used as it is (a
    memory-mapped one stays so: no copy at all); when one is converted instead, the file
    pages it was read from are released.
    """
    check_state(model, state, source)
    stack_fused(model, state)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    for key in progress(list(state), f"loading {source}", rank):
        part = state.pop(key)
        lazy = isinstance(part, (Deferred, Stacked))
        tensor = part.load() if lazy else part
        moved = tensor.to(device=device, dtype=dtype)
        if moved is not tensor and lazy:
            part.release()
        assign(model, key, moved)
    trim_heap()


class Stacked:
    """The parts of a fused weight (tensors or Deferred), concatenated when loaded."""

    def __init__(self, parts: list):
        self.parts = parts

    def load(self) -> torch.Tensor:
        return torch.cat([p.load() if isinstance(p, Deferred) else p for p in self.parts])

    def release(self) -> None:
        for p in self.parts:
            if isinstance(p, Deferred):
                p.release()


def stack_fused(model: torch.nn.Module, state: dict) -> None:
    """Replace, in `state` (Meta's key names), the parts of each fused parameter of the
    model (model.stack_meta_parts) with one Stacked entry under the fused name."""
    for name, module in model.named_modules():
        for fused, parts in getattr(module, "meta_parts", {}).items():
            prefix = f"{name}." if name else ""
            state[prefix + fused] = Stacked([state.pop(prefix + p) for p in parts])


def assign(model: torch.nn.Module, key: str, tensor: torch.Tensor) -> None:
    """model.load_state_dict({key: tensor}, assign=True) without walking every module."""
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters.get(name)
    if old is None:  # a persistent buffer
        setattr(module, name, tensor)
    else:
        setattr(module, name, torch.nn.Parameter(tensor, requires_grad=old.requires_grad))


def trim_heap() -> None:
    """Give freed heap memory back to the system. glibc keeps it otherwise, and the
    placeholder weights the model was built with (fairscale materialises them when the
    model-parallel size is above 1) would stay resident next to the real ones."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
