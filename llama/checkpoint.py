"""Reading checkpoints into a model: Meta's shards re-split for any world size, Hugging
Face folders through the mapping of hf.py, and strict loading.

A Meta model folder holds `params.json`, `tokenizer.model` and one `consolidated.NN.pth`
per model-parallel rank it was saved for (and, from Meta's download, `checklist.chk`). A
Hugging Face folder holds `config.json`, `*.safetensors` (with
`model.safetensors.index.json` when there are several) and, for us, `tokenizer.model`.
SPLIT_DIMS below is the one place that says how each tensor is split across ranks; it
drives loading (any shard count onto any world size whose splits divide evenly) and
llama/conversion.py.

Files are memory-mapped and sliced, so a rank reads from disk only its own part, and each
part is copied out of the file as the model takes it: parameters never share memory with
a checkpoint file, which could be rewritten or truncated under a running model.
"""

import ctypes
import hashlib
import mmap
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from tqdm import tqdm

from . import hf, hparams
from .hf import IGNORED_KEYS
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
REQUIRED_PARAMS = ("dim", "n_layers", "n_heads")
CACHE_SIZE_KEYS = {"max_seq_len", "max_batch_size"}
CPU = torch.device("cpu")
SHARD_NAME = re.compile(r"consolidated\.(\d\d)\.pth")
CHECKLIST_LINE = re.compile(r"([0-9a-fA-F]{32}) [ *](.+)")  # md5sum's text and binary modes


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


def split_sizes(args: ModelArgs) -> List[Tuple[int, str]]:
    """What model parallelism splits: whole heads, and the rows or columns of weights."""
    sizes = [(args.n_heads, "attention heads"), (args.kv_heads, "key/value heads"),
             (args.dim, "model dimensions"), (args.ffn_hidden_dim, "feed-forward dimensions")]
    return sizes + ([(args.vocab_size, "vocabulary entries")] if args.vocab_size > 0 else [])


def world_sizes(args: ModelArgs) -> List[int]:
    """The model-parallel sizes that split every weight of `args` evenly."""
    return [w for w in range(1, args.kv_heads + 1)
            if all(n % w == 0 for n, _ in split_sizes(args))]


def check_world_size(args: ModelArgs, world: int, source) -> None:
    """Refuse, before reading any weight, a world size that does not split the model."""
    for n, what in split_sizes(args):
        if n % world:
            *most, last = [str(w) for w in world_sizes(args)]
            sizes = f"{', '.join(most)} or {last}" if most else last
            raise ValueError(
                f"{source}: {n} {what} do not split over {world} model-parallel processes; "
                f"this model runs on {sizes} process(es)"
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
        heads = hf.rope_heads(key, self.hf_args) if self.hf_args else None
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

    def read(self, key: str, rank: int, world: int, device=CPU, dtype=None) -> torch.Tensor:
        """This rank's part of `key` for a world of `world` ranks, in Meta's layout, on
        `device` in `dtype` (None: as stored). Always a new tensor, never a view of a file
        (which could be rewritten or truncated under a running model), and made with one
        copy where the part is one piece of one shard; the file pages it was copied from
        are released."""
        sources, dim = self._sources(key, rank, world)
        heads = hf.rope_heads(key, self.hf_args) if self.hf_args else None
        if len(sources) == 1 and not heads:
            piece = sources[0].to(device=device, dtype=dtype, copy=True)
        else:
            piece = torch.cat(sources, dim=dim)
            if heads:
                self._check_rope_rows(key, piece.shape[0] * world, heads)
                piece = hf.rope_permute(piece, heads // world, to_hf=False)
            piece = piece.to(device=device, dtype=dtype)
        self.release(key)
        return piece

    def _sources(self, key: str, rank: int, world: int) -> Tuple[List[torch.Tensor], int]:
        """The views of the shards that make up this rank's part, and the dimension along
        which they join."""
        parts, dim = self.parts[key], split_dim(key)
        if dim is None:
            return parts[:1], 0
        size = parts[0].shape[dim]
        start, stop = split_range(size * len(parts), world, rank, key, dim)
        sources = []
        for i, part in enumerate(parts):  # keep the overlap of shard i with [start, stop)
            lo, hi = max(start, i * size), min(stop, (i + 1) * size)
            if lo < hi:
                sources.append(part.narrow(dim, lo - i * size, hi - lo))
        return sources, dim

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

    def load(self, device=CPU, dtype=None) -> torch.Tensor:
        """This part as a new tensor on `device` in `dtype` (see MappedShards.read)."""
        return self.src.read(self.key, self.rank, self.world, device, dtype)


# ---- Meta's format ------------------------------------------------------------------------

def md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()


def check_small_files(ckpt_dir: Path) -> None:
    """params.json and tokenizer.model against checklist.chk, when the folder has one: a
    stale or edited folder is caught for the price of hashing two small files (the shards,
    gigabytes, are download.sh's to check)."""
    listing = Path(ckpt_dir) / "checklist.chk"
    if not listing.is_file():
        return
    lines = listing.read_text(errors="replace").splitlines()
    digests = {m.group(2): m.group(1) for m in map(CHECKLIST_LINE.fullmatch, lines) if m}
    for name in ("params.json", "tokenizer.model"):
        path = Path(ckpt_dir) / name
        if name in digests and path.is_file() and md5(path) != digests[name].lower():
            raise ValueError(
                f"{path} differs from the file checklist.chk lists (md5 {digests[name]}): it "
                f"was edited or belongs to another download; download it again, or, if you "
                f"changed it on purpose, update its line in {listing}")


def read_params(ckpt_dir: Path, quantized: bool = False) -> dict:
    """params.json of a Meta folder: known keys, values that can work (hparams.check), and
    with checklist.chk, the same as downloaded. A pre-quantized folder's "quantization"
    entry (prequantized.py reads it) is left out with `quantized`, refused without."""
    path = Path(ckpt_dir) / "params.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Code Llama model folder needs params.json")
    check_small_files(ckpt_dir)
    params = hparams.read_json(path)
    if "quantization" in params and not quantized:
        raise ValueError(f"{ckpt_dir} holds pre-quantized weights (params.json says "
                         f"quantization {params['quantization']}); load it with Llama.build, "
                         f"or convert the original checkpoint instead")
    params.pop("quantization", None)
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
    hparams.check(params, path)
    return params


def shard_files(ckpt_dir: Path) -> List[Path]:
    """consolidated.00.pth, .01, ...: every file named like a shard, and no other .pth (a
    training folder's rng_state.pth is not a shard)."""
    files = sorted(Path(ckpt_dir).glob("consolidated*.pth"))
    stray = [f for f in files if not SHARD_NAME.fullmatch(f.name)]
    if stray:
        raise ValueError(f"{stray[0]} is not a shard name (consolidated.NN.pth): a second "
                         f"copy of a download? Remove it or move it out of {ckpt_dir}")
    if not files:
        raise FileNotFoundError(
            f"no checkpoint files (consolidated.NN.pth) found in {ckpt_dir}; download a "
            f"model with download.sh or point ckpt_dir at a folder holding consolidated.00.pth"
        )
    for number, f in enumerate(files):
        if f.name != f"consolidated.{number:02d}.pth":
            raise FileNotFoundError(f"{ckpt_dir} has {f.name} but not "
                                    f"consolidated.{number:02d}.pth; download the missing shard")
    return files


def map_shard(f: Path) -> Dict[str, torch.Tensor]:
    """One consolidated.NN.pth, memory-mapped (nothing read yet), tensors only."""
    try:
        shard = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:  # torch's own message advises weights_only=False: no
        raise ValueError(
            f"{f} holds Python objects besides tensors, which are not loaded because "
            f"unpickling them can run any code; use the files of Meta's download or of "
            f"llama.convert, or save the model's state_dict of tensors alone") from None
    except (RuntimeError, EOFError) as e:  # not a zip archive that torch.load can map
        raise ValueError(
            f"{f} cannot be read as a PyTorch checkpoint ({str(e).splitlines()[0]}): it "
            f"is incomplete or damaged (download it again; download.sh resumes and checks "
            f"it against checklist.chk), or not in torch.save's zip format (load it and "
            f"save it again with torch.save)") from None
    if not isinstance(shard, dict):
        raise ValueError(f"{f} holds a {type(shard).__name__}, not a state dict of tensors; "
                         f"it is not a model checkpoint")
    for key, value in shard.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{f} holds {key}, a {type(value).__name__}, where a tensor "
                             f"belongs; it is not a model checkpoint")
    return shard


def open_meta(ckpt_dir: Path) -> MappedShards:
    """The consolidated.NN.pth files of a folder, memory-mapped, checked to be shards of
    one model (same keys, same shapes)."""
    files = shard_files(ckpt_dir)
    shards = [map_shard(f) for f in files]
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


# ---- Hugging Face's format ----------------------------------------------------------------

def open_hf(hf_dir: Path, args: ModelArgs) -> MappedShards:
    """A Hugging Face folder's tensors as memory-mapped views under Meta's key names."""
    files = hf.weight_files(hf_dir)
    parts, names = {}, {}
    for path in sorted(set(files.values())):
        with hf.safe_open(path) as f:
            for name in f.keys():
                if name.endswith(hf.HF_IGNORED_SUFFIX):
                    continue
                key = hf.meta_key(name)
                if key is None:
                    raise ValueError(f"{path} holds {name}, which is not a weight of "
                                     f"LlamaForCausalLM; this folder holds a different model")
                parts[key] = [f.get_tensor(name)]  # a view of the file; nothing read yet
                names[key] = f"{path}: {name}"
    return MappedShards(parts, sorted(set(files.values())), hf_args=args, names=names)


# ---- either format ------------------------------------------------------------------------

def is_hf_folder(ckpt_dir: Path) -> bool:
    """config.json and no consolidated*.pth: where a folder has both formats, Meta's files
    win; other .pth files (a training folder's rng_state.pth) say nothing."""
    ckpt_dir = Path(ckpt_dir)
    return (ckpt_dir / "config.json").is_file() and not any(ckpt_dir.glob("consolidated*.pth"))


def load_folder(ckpt_dir: Path, rank: int, world: int):
    """(params dict, this rank's state dict, default tokenizer path) of a model folder in
    Meta's format or Hugging Face's. The state dict's values are Deferred parts (with
    shape and dtype) that load_into reads one at a time."""
    ckpt_dir = Path(ckpt_dir)
    if is_hf_folder(ckpt_dir):
        params = hf.hf_params(hf.read_hf_config(ckpt_dir), ckpt_dir / "config.json")
        args = ModelArgs(**params)
        check_world_size(args, world, ckpt_dir / "config.json")
        state = open_hf(ckpt_dir, args).rank_state(rank, world)
    else:
        if not (ckpt_dir / "params.json").is_file() and not any(ckpt_dir.glob("consolidated*")):
            raise FileNotFoundError(
                f"no checkpoint in {ckpt_dir}: expected params.json with consolidated.NN.pth "
                f"(Meta's format) or config.json with *.safetensors (Hugging Face's)"
            )
        params = read_params(ckpt_dir)
        check_world_size(ModelArgs(**params), world, ckpt_dir / "params.json")
        state = open_meta(ckpt_dir).rank_state(rank, world)
    return params, state, ckpt_dir / "tokenizer.model"


class RandomPart:
    """A random weight made when loaded, on its device (see random_state)."""

    def __init__(self, shape, seed: int, scale: Optional[float]):
        self.shape, self.seed, self.scale = tuple(shape), seed, scale

    def load(self, device: torch.device, dtype: Optional[torch.dtype]) -> torch.Tensor:
        if self.scale is None:  # a norm's weight
            return torch.ones(self.shape, device=device, dtype=dtype)
        g = torch.Generator(device=device).manual_seed(self.seed)
        return torch.randn(self.shape, generator=g, device=device, dtype=dtype).mul_(self.scale)


def random_state(model: torch.nn.Module, seed: int) -> dict:
    """Random weights for every parameter of `model` (this rank's shapes, Meta's names),
    each made when load_into loads it, on the device and in the dtype it loads to: for
    benchmarks and tests that need real shapes but no checkpoint."""
    state = {}
    for i, (key, p) in enumerate(model.state_dict().items()):
        scale = None if key.endswith("norm.weight") else (
            1.0 if "embeddings" in key else p.shape[-1] ** -0.5)
        state[key] = RandomPart(p.shape, seed * 1_000_003 + i, scale)
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
              device: torch.device, dtype: torch.dtype, entries=None,
              prepared: bool = False) -> None:
    """Check `state` strictly, then make it the model's parameters on device in dtype.

    Parameters are replaced one at a time and taken out of `state` (which is empty
    afterwards): each placeholder of the model is freed as its real weight arrives, and
    lazy parts (anything with `load(device, dtype)`, such as Deferred) are read just
    then, so neither host nor device memory ever holds two copies of the weights. A
    weight holding NaN or infinity is refused by name. `entries(key, tensor)`, if given,
    turns each loaded tensor into the state-dict entries to assign (quantization);
    `prepared`: the caller has already run prepare_state on `state`.
    """
    if not prepared:
        prepare_state(model, state, source)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    for key in progress(list(state), f"loading {source}", rank):
        part = state.pop(key)
        tensor = load(part, device, dtype)
        if tensor.is_floating_point() and not all_finite(tensor):
            raise not_finite(key, part, dtype, source)
        for name, value in (entries(key, tensor) if entries else {key: tensor}).items():
            assign(model, name, value)
        del tensor


def prepare_state(model: torch.nn.Module, state: dict, source: str) -> None:
    """Check `state` strictly against the model (Meta's names), then stack the parts of
    each fused weight (stack_fused)."""
    check_state(model, state, source)
    stack_fused(model, state)


class Stacked:
    """The parts of a fused weight (tensors or lazy parts), concatenated when loaded."""

    def __init__(self, keys: List[str], parts: list):
        self.keys, self.parts = keys, parts
        self.shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])

    def load(self, device: torch.device, dtype: Optional[torch.dtype]) -> torch.Tensor:
        return torch.cat([load(p, device, dtype) for p in self.parts])


def stack_fused(model: torch.nn.Module, state: dict) -> None:
    """Replace, in `state` (Meta's key names), the parts of each fused parameter of the
    model (model.stack_meta_parts) with one Stacked entry under the fused name."""
    for name, module in model.named_modules():
        for fused, parts in getattr(module, "meta_parts", {}).items():
            prefix = f"{name}." if name else ""
            keys = [prefix + p for p in parts]
            state[prefix + fused] = Stacked(keys, [state.pop(k) for k in keys])


def load(part, device: torch.device, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """A state entry, lazy or a tensor, on `device` in `dtype` (None: as stored)."""
    if hasattr(part, "load"):
        return part.load(device, dtype)
    return part.to(device=device, dtype=dtype)


def all_finite(t: torch.Tensor) -> bool:
    # A sum is one fast reduction, non-finite whenever an element is; only a non-finite
    # sum (which finite elements could in theory reach) needs the elementwise test.
    return bool(t.sum(dtype=torch.float32).isfinite()) or bool(t.isfinite().all())


def not_finite(key: str, part, dtype: torch.dtype, source: str) -> ValueError:
    """The error for a weight that is not finite on the device: in the file, or only once
    converted to a dtype whose range it exceeds. A fused weight names its part."""
    if isinstance(part, Stacked):
        key, part = next((k, p) for k, p in zip(part.keys, part.parts)
                         if not all_finite(load(p, CPU, dtype)))
    if all_finite(load(part, CPU, None)):
        return ValueError(f"checkpoint {source}: {key} exceeds the range of {dtype}; load it "
                          f"in a wider dtype (torch.bfloat16 or torch.float32)")
    return ValueError(f"checkpoint {source}: {key} holds NaN or infinite values; the file "
                      f"is damaged (download it again) or the weights diverged in training")


def assign(model: torch.nn.Module, key: str, tensor: torch.Tensor) -> None:
    """model.load_state_dict({key: tensor}, assign=True) without walking every module."""
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters.get(name)
    if old is None:  # a persistent buffer
        setattr(module, name, tensor)
    else:
        setattr(module, name, torch.nn.Parameter(tensor, requires_grad=old.requires_grad))
