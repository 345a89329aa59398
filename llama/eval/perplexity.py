"""Perplexity of the model on a folder of source files.

Each file is encoded with BOS and cut into windows of max_seq_len - 1 tokens; each window
is scored after a BOS of its own (`generate(..., echo=True, logprobs=True)` with nothing
generated), so every token of every file is predicted once, a token at a window's start
from BOS alone. Reported: perplexity exp(mean negative log-likelihood per token) and bits
per byte (summed negative log2-likelihood over the files' UTF-8 bytes), which, unlike
per-token perplexity, compares models with different tokenizers.
"""

import math
from pathlib import Path
from typing import Dict, Iterator, List, Tuple


def source_files(folder, pattern: str = "*.py") -> List[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--files {folder} is not a folder")
    files = sorted(p for p in folder.rglob(pattern) if p.is_file())
    if not files:
        raise ValueError(f"no {pattern} files under {folder}; pass a folder of source files")
    return files


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; remove it from the folder") from None


def windows(tokens: List[int], bos: int, size: int) -> List[List[int]]:
    """[BOS] + each run of `size` - 1 tokens after the file's own BOS."""
    body = tokens[1:]
    return [[bos] + body[i:i + size - 1] for i in range(0, len(body), size - 1)]


def file_windows(generator, files: Dict[str, Path], max_seq_len: int
                 ) -> Iterator[Tuple[str, int, int, List[int]]]:
    """(file key, its number of windows, its size in UTF-8 bytes, window) for each window
    of each non-empty file, in order."""
    tok = generator.tokenizer
    for key, path in files.items():
        text = read_text(path)
        if not text:
            continue
        parts = windows(tok.encode(text, bos=True, eos=False), tok.bos_id, max_seq_len)
        for part in parts:
            yield key, len(parts), len(text.encode("utf-8")), part


def score_windows(generator, batch: List[List[int]]) -> List[Tuple[float, int]]:
    """(summed negative log-likelihood in nats, tokens scored) of each window."""
    _, logprobs = generator.generate(batch, max_gen_len=0, logprobs=True, echo=True)
    return [(-sum(lp[1:]), len(lp) - 1) for lp in logprobs]


def summarize(records: List[dict]) -> dict:
    tokens = sum(r["tokens"] for r in records)
    nll = sum(r["nll"] for r in records)
    size = sum(r["bytes"] for r in records)
    if not tokens:
        raise ValueError("no tokens were scored: the files are empty")
    return {"files": len(records), "tokens": tokens, "bytes": size,
            "nll_per_token": nll / tokens, "perplexity": math.exp(nll / tokens),
            "bits_per_byte": nll / math.log(2) / size}
