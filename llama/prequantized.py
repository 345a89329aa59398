"""Pre-quantized checkpoint folders, as `python -m llama.convert quantize` writes them.

Meta's layout with quantized linear layers: `params.json` (the model's keys plus
"quantization": {"mode", "group_size", "mp", "skip"}), `tokenizer.model`,
`checklist.chk` and one `consolidated.NN.pth` per model-parallel rank holding exactly that
rank's state: each quantized layer under the model's own (fused) names, as quantize.py's
pieces (`<layer>.weight` codes, `<layer>.scales`, for int4 `<layer>.zeros`), and every
other tensor (embedding, norms, the layers in "skip") as the source stored it, split as
Meta splits it. Int4 groups were cut from each rank's own slice, so a folder loads only
at the process count it was written for: resharding would move group boundaries.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

from . import checkpoint, hparams
from .quantize import check_mode

KEY = "quantization"
PIECE_SUFFIXES = (".scales", ".zeros")


@dataclass(frozen=True)
class Stored:
    """How a folder's weights are quantized."""
    mode: str
    group_size: Optional[int]  # int4's; None for int8
    mp: int
    skip: tuple

    def to_json(self) -> dict:
        return {"mode": self.mode, "group_size": self.group_size, "mp": self.mp,
                "skip": list(self.skip)}


def read(ckpt_dir) -> Optional[Stored]:
    """The quantization params.json records, or None for an ordinary folder."""
    path = Path(ckpt_dir) / "params.json"
    if not path.is_file():
        return None
    entry = hparams.read_json(path).get(KEY)
    if entry is None:
        return None
    try:
        mode = check_mode(entry["mode"])
        group_size = int(entry["group_size"]) if mode == "int4" else None
        stored = Stored(mode, group_size, int(entry["mp"]), tuple(entry["skip"]))
    except (TypeError, KeyError, ValueError) as error:
        raise ValueError(f"{path}: {KEY!r} must be {{\"mode\": \"int8\" or \"int4\", "
                         f"\"group_size\": int, \"mp\": int, \"skip\": [layer names]}}, "
                         f"got {entry!r} ({error}); write the folder again with "
                         f"python -m llama.convert quantize") from None
    if stored.mp < 1:
        raise ValueError(f"{path}: {KEY} mp must be at least 1, got {stored.mp}")
    return stored


def check_request(stored: Stored, quantize: Optional[str], world: int, ckpt_dir) -> str:
    """The mode to build with: the folder's. A different `quantize`, or a process count
    other than the one the folder was written for, is refused with what to do."""
    if quantize is not None and quantize != stored.mode:
        check_mode(quantize)
        raise ValueError(
            f"{ckpt_dir} holds {stored.mode} weights (params.json), not {quantize}; pass "
            f"quantize={stored.mode!r} or None to load it, or load the original checkpoint "
            f"with quantize={quantize!r} (or write a {quantize} folder from it: python -m "
            f"llama.convert quantize --ckpt_dir ORIGINAL --out_dir NEW --bits {quantize[3:]} "
            f"--mp {world})")
    if world != stored.mp:
        raise ValueError(
            f"{ckpt_dir} was quantized for {stored.mp} model-parallel process(es), and this "
            f"run has {world}; run it with {stored.mp}, or convert the original checkpoint "
            f"again with python -m llama.convert quantize ... --mp {world}")
    return stored.mode


def is_piece(key: str, tensor: torch.Tensor) -> bool:
    """A quantized layer's piece (codes, scales, zeros): kept as stored when loading."""
    return not tensor.is_floating_point() or key.endswith(PIECE_SUFFIXES)


class AsStored:
    """A lazy part that loads in its stored dtype whatever dtype the model asks for."""

    def __init__(self, part):
        self.part, self.shape = part, part.shape

    def load(self, device: torch.device, dtype: Optional[torch.dtype]) -> torch.Tensor:
        return self.part.load(device, None)


def load_folder(ckpt_dir, rank: int, stored: Stored):
    """(params dict, this rank's state dict of lazy parts, default tokenizer path): rank
    `rank` reads its own consolidated.NN.pth, memory-mapped, one tensor at a time."""
    ckpt_dir = Path(ckpt_dir)
    params = checkpoint.read_params(ckpt_dir, quantized=True)
    files = checkpoint.shard_files(ckpt_dir)
    if len(files) != stored.mp:
        raise ValueError(f"{ckpt_dir} has {len(files)} consolidated.NN.pth but params.json "
                         f"says it was quantized for {stored.mp} processes; the folder is "
                         f"incomplete or mixed: write it again with python -m llama.convert "
                         f"quantize")
    tensors = checkpoint.map_shard(files[rank])
    source = checkpoint.MappedShards({k: [v] for k, v in tensors.items()}, [files[rank]])
    state: Dict[str, object] = {}
    for key, tensor in tensors.items():
        if key in checkpoint.IGNORED_KEYS:
            continue
        part = checkpoint.Deferred(source, key, 0, 1)  # the whole file is this rank's
        state[key] = AsStored(part) if is_piece(key, tensor) else part
    return params, state, ckpt_dir / "tokenizer.model"
