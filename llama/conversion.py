"""The work of `python -m llama.convert`: llama/convert.py is its command line, whose
commands import this module when they run, so that their `--help` needs no torch.

Inputs are memory-mapped and converted one tensor at a time; each output file is written
as soon as it is complete, into `.NAME.partial` beside the output folder, renamed when
everything is in it (`staged`). to_hf keeps the original params.json inside config.json
(under hf.PARAMS_KEY) for from_hf to write back; rope.freqs, an unused buffer of Meta's
files, has no place in Hugging Face's layout and is not carried over.
"""

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from . import checkpoint, distributed, hf, hparams, prequantized
from . import quantize as quantization
from .model import ModelArgs, Transformer
from .tokenizer import Tokenizer

SIZE_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
# Room beyond the tensors' bytes: file headers, params.json, tokenizer.model, checklist.
SPARE_BYTES = 16 << 20


def parse_size(size) -> int:
    """Bytes in 5GB, 500MB, 2GiB or a plain number (GB = 10**9, as in transformers)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", str(size), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size {size!r} is not a size; write e.g. 5GB, 500MB or "
                         f"a number of bytes")
    return int(float(match.group(1)) * SIZE_UNITS[(match.group(2) or "").upper()])


def new_out_dir(out_dir) -> Path:
    """The output folder, created; refuse one that holds files, so nothing is mixed."""
    out = Path(out_dir)
    refuse_existing(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def refuse_existing(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; choose a new --out_dir")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} is not empty; choose a new --out_dir "
                              f"or empty it first")


def mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def check_space(folder: Path, need: int) -> None:
    """Refuse to start a conversion that cannot fit on the disk it writes to."""
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OSError(errno.ENOSPC, f"the disk mounted at {mount_point(folder)} has "
                      f"{gigabytes(free)} free, and this conversion writes {gigabytes(need)}; "
                      f"free some space or choose an --out_dir on another disk")


def disk_full(e: Exception) -> bool:
    """Whether a write failed for lack of space (safetensors reports it in its message)."""
    codes = (errno.ENOSPC, errno.EDQUOT)
    return getattr(e, "errno", None) in codes or "No space left on device" in str(e)


@contextlib.contextmanager
def staged(out_dir, need: int) -> Iterator[Path]:
    """A folder to write the output into: `.NAME.partial` beside out_dir, renamed to
    out_dir once everything is in it, and removed if the conversion fails. A killed
    conversion leaves no half-written out_dir, and running it again starts over."""
    out = Path(out_dir).absolute()
    refuse_existing(out)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        print(f"note: removing {tmp}, left by an interrupted conversion")
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)  # with the umask's permissions, kept by the rename
    try:
        check_space(tmp, need)
        try:
            yield tmp
        except Exception as e:
            if not disk_full(e):
                raise
            raise OSError(errno.ENOSPC, f"the disk mounted at {mount_point(tmp)} is full "
                          f"({e}); this conversion writes {gigabytes(need)}: free some "
                          f"space or choose an --out_dir on another disk") from None
        os.replace(tmp, out)  # out is absent or an empty folder, which rename replaces
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_torch(state: Dict[str, torch.Tensor], path: Path) -> None:
    # Through a Python file, so that a full disk raises OSError(ENOSPC) rather than
    # torch's "unexpected pos" error.
    with open(path, "wb") as f:
        torch.save(state, f)


def safetensors_writer():
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError(f"to_hf writes safetensors files: {hf.SAFETENSORS_MISSING}") from None

    def save(tensors: Dict[str, torch.Tensor], path: Path) -> None:
        save_file(tensors, str(path), metadata={"format": "pt"})
        os.chmod(path, 0o666 & ~umask())  # safetensors creates files readable by owner only
    return save


def copy_file(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)  # not shutil.copy: the new file follows the umask


def write_checklist(folder: Path) -> None:
    """checklist.chk as in Meta's downloads (`md5sum -c checklist.chk` checks it)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != "checklist.chk")
    lines = "".join(f"{checkpoint.md5(folder / n)}  {n}\n" for n in names)
    (folder / "checklist.chk").write_text(lines)


def check_shapes(args: ModelArgs, shapes: Dict[str, Tuple[int, ...]], source: str) -> List[str]:
    """The full (unsharded) shapes of a checkpoint against the model `args` describes,
    built on the meta device (no memory), with load_into's strict checks and messages.
    Returns the model's keys in order (embeddings, layer by layer, norm, output)."""
    distributed.initialize(1, torch.device("cpu"))  # fairscale layers ask for the MP size
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(args, max_batch_size=1))
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    checkpoint.check_state(model, meta, source)
    return list(model.state_dict())


def positive_int(value, flag: str) -> None:
    # hparams.is_count refuses bools: fire turns a bare flag into True.
    if not hparams.is_count(value):
        raise ValueError(f"{flag} must be a positive whole number, got {value!r}")


def check_split(args: ModelArgs, shapes: Dict[str, Tuple[int, ...]], mp, source: Path) -> None:
    """Refuse, before writing anything, an --mp that does not split every tensor evenly
    (and attention by whole heads)."""
    positive_int(mp, "--mp")
    checkpoint.check_world_size(args, mp, source)
    for key, shape in shapes.items():
        dim = checkpoint.split_dim(key)
        if dim is not None:
            checkpoint.split_range(shape[dim], mp, 0, key, dim)


def check_tokenizer(folder: Path, vocab_size: int, weights: str) -> Optional[Path]:
    """The folder's tokenizer.model, checked against the embedding; None if it has none."""
    path = folder / "tokenizer.model"
    if not path.is_file():
        print(f"note: {folder} has no tokenizer.model; the output will have none either")
        return None
    n_words = Tokenizer(str(path)).n_words
    if n_words != vocab_size:
        raise ValueError(
            f"{path} has {n_words} pieces but the weights in {weights} embed {vocab_size} "
            f"tokens; put the tokenizer.model of this model in {folder}"
        )
    return path


def read_meta(ckpt_dir: Path, **overrides):
    """(params.json, the shards, their full shapes, ModelArgs) of a Meta folder; the
    vocabulary size is taken from the embedding (params.json usually leaves it to the
    tokenizer), checked against params.json and the model."""
    params = checkpoint.read_params(ckpt_dir)
    src = checkpoint.open_meta(ckpt_dir)
    shapes = {k: src.full_shape(k) for k in src.keys() if k not in checkpoint.IGNORED_KEYS}
    if "tok_embeddings.weight" not in shapes:
        raise ValueError(f"the checkpoint in {ckpt_dir} has no tok_embeddings.weight; it is "
                         f"not a Code Llama checkpoint")
    vocab = shapes["tok_embeddings.weight"][0]
    if params.get("vocab_size", -1) > 0 and params["vocab_size"] != vocab:
        raise ValueError(f"{ckpt_dir / 'params.json'} says vocab_size {params['vocab_size']} "
                         f"but the checkpoint embeds {vocab} tokens; fix vocab_size")
    args = ModelArgs(**{**params, "vocab_size": vocab, **overrides})
    check_shapes(args, shapes, str(ckpt_dir))
    return params, src, shapes, args


def tensor_bytes(src: checkpoint.MappedShards, keys: List[str]) -> int:
    return sum(src.parts[k][0].element_size() * torch.Size(src.full_shape(k)).numel()
               for k in keys)


def plan_files(sizes: List[Tuple[str, int]], max_bytes: int) -> List[List[str]]:
    """Tensors grouped, in order, into files of at most max_bytes (a larger tensor gets a
    file of its own), as transformers' save_pretrained does."""
    files, current, used = [], [], 0
    for name, size in sizes:
        if current and used + size > max_bytes:
            files.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    return files + [current] if current else files


def to_hf(ckpt_dir: str, out_dir: str, max_shard_size="5GB",
          max_position_embeddings: int = 16384) -> None:
    """Meta folder -> Hugging Face folder (safetensors shards of at most max_shard_size,
    model.safetensors.index.json, config.json, tokenizer.model and its
    tokenizer_config.json). Code Llama was trained for 16384 positions, hence
    max_position_embeddings' default."""
    save = safetensors_writer()
    positive_int(max_position_embeddings, "--max_position_embeddings")
    ckpt_dir, max_bytes = Path(ckpt_dir), parse_size(max_shard_size)
    params, src, shapes, args = read_meta(ckpt_dir, max_seq_len=max_position_embeddings)
    tokenizer = check_tokenizer(ckpt_dir, args.vocab_size, str(ckpt_dir))
    keys = list(shapes)
    groups = plan_files([(k, tensor_bytes(src, [k])) for k in keys], max_bytes)
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    total = tensor_bytes(src, keys)
    with staged(out_dir, total + SPARE_BYTES) as out:
        bar = checkpoint.progress(range(len(keys)), f"writing {out_dir}")
        weight_map = {}
        for name, group in zip(names, groups):
            tensors = {}
            for key in group:
                w, heads = src.read(key, 0, 1), hf.rope_heads(key, args)
                tensors[hf.hf_key(key)] = hf.rope_permute(w, heads, to_hf=True) if heads else w
                bar.update()
            save(tensors, out / name)
            weight_map.update({k: name for k in tensors})
        bar.close()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / hf.INDEX).write_text(json.dumps(index, indent=2))
        dtype = src.parts["tok_embeddings.weight"][0].dtype
        config = {**hf.hf_config(args), "torch_dtype": str(dtype).replace("torch.", ""),
                  hf.PARAMS_KEY: params}
        (out / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer:
            copy_file(tokenizer, out / "tokenizer.model")
            (out / "tokenizer_config.json").write_text(
                json.dumps(hf.hf_tokenizer_config(max_position_embeddings), indent=2))


# What must agree for a kept params.json to describe the model of a config.json.
SAME_MODEL = ("dim", "n_layers", "n_heads", "kv_heads", "ffn_hidden_dim", "norm_eps",
              "rope_theta", "vocab_size")


def original_params(config: dict, params: dict) -> dict:
    """The params.json that to_hf kept in config.json, if config.json still describes the
    same model (it may have been edited since); else `params`, derived from config.json."""
    kept = config.get(hf.PARAMS_KEY)
    if (not isinstance(kept, dict) or set(kept) - ModelArgs.field_names()
            or set(checkpoint.REQUIRED_PARAMS) - set(kept)):
        return params
    try:
        hparams.check(kept, hf.PARAMS_KEY)
    except ValueError:  # edited into something that cannot work: config.json decides
        return params
    if kept.get("vocab_size", -1) <= 0:  # left to the tokenizer, as in Meta's 7B-34B files
        kept = {**kept, "vocab_size": params["vocab_size"]}
    a, b = ModelArgs(**kept), ModelArgs(**params)
    same = all(getattr(a, f) == getattr(b, f) for f in SAME_MODEL)
    return config[hf.PARAMS_KEY] if same else params


def write_ranks(src: checkpoint.MappedShards, keys: List[str], mp: int, out: Path) -> None:
    """consolidated.NN.pth for `mp` ranks, one at a time."""
    for rank in range(mp):
        state = {k: src.read(k, rank, mp)
                 for k in checkpoint.progress(keys, f"writing {out} ({rank + 1}/{mp})")}
        save_torch(state, out / f"consolidated.{rank:02d}.pth")
        del state  # before the next rank's part is read


def from_hf(hf_dir: str, out_dir: str, mp: int = 1) -> None:
    """Hugging Face folder -> Meta folder for `mp` model-parallel processes
    (consolidated.NN.pth, params.json, tokenizer.model, checklist.chk)."""
    hf_dir = Path(hf_dir)
    config = hf.read_hf_config(hf_dir)
    params = hf.hf_params(config, hf_dir / "config.json")
    args = ModelArgs(**params)
    src = checkpoint.open_hf(hf_dir, args)
    shapes = {k: src.full_shape(k) for k in src.keys()}
    order = check_shapes(args, shapes, str(hf_dir))
    check_split(args, shapes, mp, hf_dir / "config.json")
    tokenizer = check_tokenizer(hf_dir, args.vocab_size, str(hf_dir))
    with staged(out_dir, tensor_bytes(src, order) + SPARE_BYTES) as out:
        write_ranks(src, order, mp, out)
        kept = original_params(config, params)
        (out / "params.json").write_text(json.dumps(kept, indent=4))
        if tokenizer:
            copy_file(tokenizer, out / "tokenizer.model")
        write_checklist(out)


def reshard(ckpt_dir: str, out_dir: str, mp: int) -> None:
    """Meta folder -> Meta folder for `mp` model-parallel processes; bit-exact, params.json
    and tokenizer.model copied as they are."""
    ckpt_dir = Path(ckpt_dir)
    _, src, shapes, args = read_meta(ckpt_dir)
    check_split(args, shapes, mp, ckpt_dir / "params.json")
    tokenizer = check_tokenizer(ckpt_dir, args.vocab_size, str(ckpt_dir))
    with staged(out_dir, tensor_bytes(src, src.keys()) + SPARE_BYTES) as out:
        write_ranks(src, src.keys(), mp, out)
        copy_file(ckpt_dir / "params.json", out / "params.json")
        if tokenizer:
            copy_file(tokenizer, out / "tokenizer.model")
        write_checklist(out)


@dataclasses.dataclass(frozen=True)
class Planned:
    """One tensor of a pre-quantized rank file: the model's (fused) key, the Meta keys
    stacked in it, whether it is a quantized layer's weight, and whether its inputs are
    split over ranks (a row-parallel layer)."""
    name: str
    keys: List[str]
    quantized: bool
    row_parallel: bool


def quantization_plan(args: ModelArgs) -> List[Planned]:
    """The model's parameters in order, as Llama.build quantizes them (all linear layers
    but quantize.KEPT), from a model built on the meta device at MP=1."""
    distributed.initialize(1, torch.device("cpu"))  # fairscale layers ask for the MP size
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(args, max_batch_size=1))
    fused = {}
    for prefix, module in model.named_modules():
        for name, parts in getattr(module, "meta_parts", {}).items():
            fused[f"{prefix}.{name}"] = [f"{prefix}.{part}" for part in parts]
    layers = set(quantization.linear_layers(model, quantization.KEPT))
    return [Planned(name, fused.get(name, [name]), name.rpartition(".")[0] in layers,
                    checkpoint.split_dim(fused.get(name, [name])[0]) == 1)
            for name, _ in model.named_parameters()]


def planned_bytes(src: checkpoint.MappedShards, plan: List[Planned], mode: str,
                  group_size: int, mp: int) -> int:
    """Bytes of all rank files; refuses first an int4 group size that does not tile a
    rank's input width."""
    total = 0
    for entry in plan:
        shapes = [src.rank_shape(k, mp) for k in entry.keys]
        if not entry.quantized:
            total += mp * sum(src.parts[k][0].element_size() * torch.Size(s).numel()
                              for k, s in zip(entry.keys, shapes))
            continue
        rows, width = sum(s[0] for s in shapes), shapes[0][1]
        if mode == "int4":
            try:
                quantization.check_group_size(width, group_size)
            except ValueError as error:
                raise ValueError(f"{entry.name} at --mp {mp}: {error}") from None
        pieces = quantization.pieces_shapes(rows, width, mode, group_size).values()
        total += mp * sum(torch.Size(s).numel() * d.itemsize for s, d in pieces)
    return total


def quantized_rank(src: checkpoint.MappedShards, plan: List[Planned], mode: str,
                   group_size: int, rank: int, mp: int) -> Dict[str, torch.Tensor]:
    """One rank's state: quantized layers as their pieces under the fused names (the
    pieces of the whole matrix, sliced: int8 rows take the whole row's scale), the rest
    as stored."""
    state = {}
    for entry in checkpoint.progress(plan, f"quantizing rank {rank + 1}/{mp}"):
        tensor = torch.cat([src.read(k, rank, mp) for k in entry.keys])
        if not entry.quantized:
            state[entry.name] = tensor
            continue
        absmax = None
        if mode == "int8" and entry.row_parallel and mp > 1:
            absmax = quantization.row_absmax(src.read(entry.keys[0], 0, 1))
        pieces = quantization.quantize_weight(tensor, mode, group_size, absmax)
        layer = entry.name.rpartition(".")[0]
        state.update({f"{layer}.{name}": piece for name, piece in pieces.items()})
    return state


def quantize(ckpt_dir: str, out_dir: str, bits: int, mp: int = 1,
             group_size: int = quantization.DEFAULT_GROUP_SIZE) -> None:
    """Meta folder -> pre-quantized folder for `mp` model-parallel processes, which
    Llama.build loads without quantizing (see llama/prequantized.py): the linear layers
    in int8 (--bits 8) or int4 in groups of --group_size inputs (--bits 4), the output
    projection, embedding and norms as stored."""
    modes = {8: "int8", 4: "int4"}
    if isinstance(bits, bool) or bits not in modes:
        raise ValueError(f"--bits must be 8 or 4, got {bits!r}")
    mode = modes[bits]
    positive_int(group_size, "--group_size")
    ckpt_dir = Path(ckpt_dir)
    params, src, shapes, args = read_meta(ckpt_dir)
    check_split(args, shapes, mp, ckpt_dir / "params.json")
    plan = quantization_plan(args)
    need = planned_bytes(src, plan, mode, group_size, mp)
    tokenizer = check_tokenizer(ckpt_dir, args.vocab_size, str(ckpt_dir))
    stored = prequantized.Stored(mode, group_size if mode == "int4" else None, mp,
                                 quantization.KEPT)
    with staged(out_dir, need + SPARE_BYTES) as out:
        for rank in range(mp):
            state = quantized_rank(src, plan, mode, group_size, rank, mp)
            save_torch(state, out / f"consolidated.{rank:02d}.pth")
            del state  # before the next rank's
        params = {**params, prequantized.KEY: stored.to_json()}
        (out / "params.json").write_text(json.dumps(params, indent=4))
        if tokenizer:
            copy_file(tokenizer, out / "tokenizer.model")
        write_checklist(out)

