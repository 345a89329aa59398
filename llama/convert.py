"""Convert checkpoints between Meta's format and Hugging Face's, reshard or quantize them.

examples:
    python -m llama.convert to_hf --ckpt_dir CodeLlama-7b --out_dir CodeLlama-7b-hf
    python -m llama.convert from_hf --hf_dir CodeLlama-7b-hf --out_dir CodeLlama-7b-mp2 --mp 2
    python -m llama.convert reshard --ckpt_dir CodeLlama-34b --out_dir CodeLlama-34b-mp2 --mp 2
    python -m llama.convert quantize --ckpt_dir CodeLlama-7b --out_dir CodeLlama-7b-int4 --bits 4

Commands and options may also be written with hyphens (to-hf, --ckpt-dir), and options
given in order without their names (reshard IN OUT --mp 2). Inputs are memory-mapped and
converted one tensor at a time, and each output file is written as soon as it is
complete, so host memory holds about one output file: a safetensors shard of at most
--max_shard_size for to_hf, one consolidated.NN.pth (the checkpoint divided by --mp) for
from_hf and reshard, one rank's quantized file for quantize. The output is written into
.NAME.partial beside the output folder and renamed when complete, so an interrupted
conversion leaves no half-written folder; free space is checked first.

Tensors round-trip bit for bit, and params.json keeps its keys and values: to_hf keeps
the original params.json inside config.json and from_hf writes it back when config.json
still describes the same model. quantize writes the layout of llama/prequantized.py, with
the pieces that quantizing the stored weights while loading gives. A mistake (a bad
option, a folder that cannot be converted, a full disk, a missing package) prints one
line and exits with status 1; no command, or an unknown one, exits with status 2.
"""

from typing import List, Optional

from . import cli

# The commands below are the command line: their signatures and docstrings make --help,
# and each imports the work (llama/conversion.py, which needs torch) only when it runs.
DEFAULT_GROUP_SIZE = 128  # llama.quantize.DEFAULT_GROUP_SIZE, which a test keeps equal
USER_ERRORS = (ValueError, OSError, ImportError)


def to_hf(ckpt_dir: str, out_dir: str, max_shard_size: str = "5GB",
          max_position_embeddings: int = 16384) -> None:
    """Meta folder -> Hugging Face folder.

    Writes safetensors shards, model.safetensors.index.json, config.json,
    tokenizer.model and tokenizer_config.json (pip install safetensors, or pip install
    -e ".[hf]").

    Args:
        ckpt_dir: Meta folder to convert (params.json, consolidated.NN.pth, tokenizer.model)
        out_dir: new folder to write (absent or empty)
        max_shard_size: largest safetensors file: 5GB, 500MB, 2GiB or a number of bytes
            (GB = 10**9, as in transformers)
        max_position_embeddings: the context length config.json declares; Code Llama
            was trained for 16384 positions
    """
    from . import conversion
    conversion.to_hf(ckpt_dir, out_dir, max_shard_size, max_position_embeddings)
    print(f"wrote {out_dir}")


def from_hf(hf_dir: str, out_dir: str, mp: int = 1) -> None:
    """Hugging Face folder -> Meta folder.

    Writes consolidated.NN.pth for --mp model-parallel processes, params.json,
    tokenizer.model and checklist.chk.

    Args:
        hf_dir: Hugging Face Llama folder to convert (config.json, *.safetensors)
        out_dir: new folder to write (absent or empty)
        mp: model-parallel processes to write shards for (consolidated.00.pth and on)
    """
    from . import conversion
    conversion.from_hf(hf_dir, out_dir, mp)
    print(f"wrote {out_dir}")


def reshard(ckpt_dir: str, out_dir: str, mp: int) -> None:
    """Meta folder -> Meta folder for another number of processes.

    Bit-exact; params.json and tokenizer.model are copied as they are, checklist.chk is
    written anew.

    Args:
        ckpt_dir: Meta folder to reshard
        out_dir: new folder to write (absent or empty)
        mp: model-parallel processes to write shards for (consolidated.00.pth and on)
    """
    from . import conversion
    conversion.reshard(ckpt_dir, out_dir, mp)
    print(f"wrote {out_dir}")


def quantize(ckpt_dir: str, out_dir: str, bits: int, mp: int = 1,
             group_size: int = DEFAULT_GROUP_SIZE) -> None:
    """Meta folder -> pre-quantized folder, which Llama.build loads without quantizing.

    The linear layers are stored in int8 (--bits 8) or int4 in groups of --group_size
    inputs (--bits 4); the output projection, embedding and norms as they are. The
    layout is llama/prequantized.py's.

    Args:
        ckpt_dir: Meta folder to quantize (not already quantized)
        out_dir: new folder to write (absent or empty)
        bits: 8 or 4
        mp: model-parallel processes to write shards for (consolidated.00.pth and on)
        group_size: int4 only: inputs that share one scale, an even number that divides
            every layer's input width per process
    """
    from . import conversion
    conversion.quantize(ckpt_dir, out_dir, bits, mp, group_size)
    print(f"wrote {out_dir}")


COMMANDS = {"to_hf": to_hf, "from_hf": from_hf, "reshard": reshard, "quantize": quantize}


def main(argv: Optional[List[str]] = None) -> None:
    """The command line (also installed as codellama-convert). A user error prints one
    line and exits with status 1; anything else is a bug and keeps its traceback."""
    cli.run_commands(COMMANDS, __doc__, argv, repeatable=(), errors=USER_ERRORS, status=1)


if __name__ == "__main__":
    main()
