"""Convert checkpoints between Meta's format and Hugging Face's, or reshard them.

    python -m llama.convert to_hf --ckpt_dir CodeLlama-7b --out_dir CodeLlama-7b-hf
    python -m llama.convert from_hf --hf_dir CodeLlama-7b-hf --out_dir CodeLlama-7b-mp2 --mp 2
    python -m llama.convert reshard --ckpt_dir CodeLlama-34b --out_dir CodeLlama-34b-mp2 --mp 2

fire also accepts `to-hf`, `from-hf` and `--ckpt-dir`. Inputs are memory-mapped and
converted one tensor at a time, and each output file is written as soon as it is complete,
so host memory holds about one output file: a safetensors shard of at most
`--max_shard_size` for to_hf, one consolidated.NN.pth (the checkpoint divided by --mp)
for from_hf and reshard.

Tensors round-trip bit for bit, and params.json keeps its keys and values: to_hf keeps
the original params.json inside config.json (under "codellama_params") and from_hf writes
it back (indented like Meta's files) when config.json still describes the same model. rope.freqs, an unused buffer of Meta's files, has no place in Hugging Face's
layout and is not carried over.
"""

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from . import distributed
from .checkpoint import (
    IGNORED_KEYS,
    check_state,
    check_world_size,
    open_hf,
    open_meta,
    progress,
    read_params,
    split_dim,
    split_range,
)
from .hf import PARAMS_KEY, hf_config, hf_key, hf_params, read_hf_config, rope_heads, rope_permute
from .model import ModelArgs, Transformer
from .tokenizer import Tokenizer

SIZE_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


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
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} is not empty; choose a new --out_dir "
                              f"or empty it first")
    out.mkdir(parents=True, exist_ok=True)
    return out


def md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def write_checklist(folder: Path) -> None:
    """checklist.chk as in Meta's downloads (`md5sum -c checklist.chk` checks it)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != "checklist.chk")
    (folder / "checklist.chk").write_text("".join(f"{md5(folder / n)}  {n}\n" for n in names))


def check_shapes(args: ModelArgs, shapes: Dict[str, Tuple[int, ...]], source: str) -> List[str]:
    """The full (unsharded) shapes of a checkpoint against the model `args` describes,
    built on the meta device (no memory), with load_into's strict checks and messages.
    Returns the model's keys in order (embeddings, layer by layer, norm, output)."""
    distributed.initialize(1, torch.device("cpu"))  # fairscale layers ask for the MP size
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(args, max_batch_size=1))
    check_state(model, {k: torch.empty(s, device="meta") for k, s in shapes.items()}, source)
    return list(model.state_dict())


def positive_int(value, flag: str) -> None:
    # bool is an int to Python, and fire turns a bare flag into True.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{flag} must be a positive whole number, got {value!r}")


def check_split(args: ModelArgs, shapes: Dict[str, Tuple[int, ...]], mp, source: Path) -> None:
    """Refuse, before writing anything, an --mp that does not split every tensor evenly
    (and attention by whole heads)."""
    positive_int(mp, "--mp")
    check_world_size(args, mp, source)
    for key, shape in shapes.items():
        if split_dim(key) is not None:
            split_range(shape[split_dim(key)], mp, 0, key, split_dim(key))


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


def meta_args(ckpt_dir: Path, params: dict, shapes: Dict[str, Tuple[int, ...]],
              **overrides) -> ModelArgs:
    """ModelArgs of a Meta folder, the vocabulary size taken from the embedding (params.json
    usually leaves it to the tokenizer), checked against params.json and the model."""
    if "tok_embeddings.weight" not in shapes:
        raise ValueError(f"the checkpoint in {ckpt_dir} has no tok_embeddings.weight; it is "
                         f"not a Code Llama checkpoint")
    vocab = shapes["tok_embeddings.weight"][0]
    if params.get("vocab_size", -1) > 0 and params["vocab_size"] != vocab:
        raise ValueError(f"{ckpt_dir / 'params.json'} says vocab_size {params['vocab_size']} "
                         f"but the checkpoint embeds {vocab} tokens; fix vocab_size")
    args = ModelArgs(**{**params, "vocab_size": vocab, **overrides})
    check_shapes(args, shapes, str(ckpt_dir))
    return args


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
    model.safetensors.index.json, config.json, tokenizer.model). Code Llama was trained
    for 16384 positions, hence max_position_embeddings' default."""
    from safetensors.torch import save_file

    positive_int(max_position_embeddings, "--max_position_embeddings")
    ckpt_dir, max_bytes = Path(ckpt_dir), parse_size(max_shard_size)
    params = read_params(ckpt_dir)
    src = open_meta(ckpt_dir)
    keys = [k for k in src.keys() if k not in IGNORED_KEYS]
    shapes = {k: src.full_shape(k) for k in keys}
    args = meta_args(ckpt_dir, params, shapes, max_seq_len=max_position_embeddings)
    tokenizer = check_tokenizer(ckpt_dir, args.vocab_size, str(ckpt_dir))
    out = new_out_dir(out_dir)

    def nbytes(key):
        return src.parts[key][0].element_size() * torch.Size(shapes[key]).numel()

    groups = plan_files([(k, nbytes(k)) for k in keys], max_bytes)
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    bar = progress(range(len(keys)), f"writing {out}")
    weight_map = {}
    for name, group in zip(names, groups):
        tensors = {}
        for key in group:
            w, heads = src.read(key, 0, 1), rope_heads(key, args)
            tensors[hf_key(key)] = rope_permute(w, heads, to_hf=True) if heads else w
            bar.update()
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    bar.close()
    index = {"metadata": {"total_size": sum(nbytes(k) for k in keys)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    dtype = src.parts["tok_embeddings.weight"][0].dtype
    config = {**hf_config(args), "torch_dtype": str(dtype).replace("torch.", ""),
              PARAMS_KEY: params}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        shutil.copy(tokenizer, out / "tokenizer.model")


# What must agree for a kept params.json to describe the model of a config.json.
SAME_MODEL = ("dim", "n_layers", "n_heads", "kv_heads", "ffn_hidden_dim", "norm_eps",
              "rope_theta", "vocab_size")


def original_params(config: dict, params: dict) -> dict:
    """The params.json that to_hf kept in config.json, if config.json still describes the
    same model (it may have been edited since); else `params`, derived from config.json."""
    kept = config.get(PARAMS_KEY)
    if not isinstance(kept, dict) or set(kept) - ModelArgs.field_names():
        return params
    if kept.get("vocab_size", -1) <= 0:  # left to the tokenizer, as in Meta's 7B-34B files
        kept = {**kept, "vocab_size": params["vocab_size"]}
    a, b = ModelArgs(**kept), ModelArgs(**params)
    same = all(getattr(a, f) == getattr(b, f) for f in SAME_MODEL)
    return config[PARAMS_KEY] if same else params


def from_hf(hf_dir: str, out_dir: str, mp: int = 1) -> None:
    """Hugging Face folder -> Meta folder for `mp` model-parallel processes
    (consolidated.NN.pth, params.json, tokenizer.model, checklist.chk)."""
    hf_dir = Path(hf_dir)
    config = read_hf_config(hf_dir)
    params = hf_params(config, hf_dir / "config.json")
    args = ModelArgs(**params)
    src = open_hf(hf_dir, args)
    shapes = {k: src.full_shape(k) for k in src.keys()}
    order = check_shapes(args, shapes, str(hf_dir))
    check_split(args, shapes, mp, hf_dir / "config.json")
    tokenizer = check_tokenizer(hf_dir, args.vocab_size, str(hf_dir))
    out = new_out_dir(out_dir)
    for rank in range(mp):
        state = {k: src.read(k, rank, mp)
                 for k in progress(order, f"writing {out} ({rank + 1}/{mp})")}
        torch.save(state, out / f"consolidated.{rank:02d}.pth")
        del state  # before the next rank's part is read
    (out / "params.json").write_text(json.dumps(original_params(config, params), indent=4))
    if tokenizer:
        shutil.copy(tokenizer, out / "tokenizer.model")
    write_checklist(out)


def reshard(ckpt_dir: str, out_dir: str, mp: int) -> None:
    """Meta folder -> Meta folder for `mp` model-parallel processes; bit-exact, params.json
    and tokenizer.model copied as they are."""
    ckpt_dir = Path(ckpt_dir)
    params = read_params(ckpt_dir)
    src = open_meta(ckpt_dir)
    shapes = {k: src.full_shape(k) for k in src.keys() if k not in IGNORED_KEYS}
    args = meta_args(ckpt_dir, params, shapes)
    check_split(args, shapes, mp, ckpt_dir / "params.json")
    tokenizer = check_tokenizer(ckpt_dir, args.vocab_size, str(ckpt_dir))
    out = new_out_dir(out_dir)
    for rank in range(mp):
        state = {k: src.read(k, rank, mp)
                 for k in progress(src.keys(), f"writing {out} ({rank + 1}/{mp})")}
        torch.save(state, out / f"consolidated.{rank:02d}.pth")
        del state
    shutil.copy(ckpt_dir / "params.json", out / "params.json")
    if tokenizer:
        shutil.copy(tokenizer, out / "tokenizer.model")
    write_checklist(out)


def main(argv: Optional[List[str]] = None) -> None:
    import fire

    fire.Fire({"to_hf": to_hf, "from_hf": from_hf, "reshard": reshard}, command=argv)


if __name__ == "__main__":
    main()
