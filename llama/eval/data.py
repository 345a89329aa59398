"""Benchmark data: JSON-lines files (optionally gzipped), fetched once from their official
repository into ~/.cache/codellama and checked against a pinned SHA-256, or given by path.

No file is read from anywhere else: a user without network passes `--data PATH`.
"""

import gzip
import hashlib
import json
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional


class Source(NamedTuple):
    url: str
    sha256: str  # the pinned digest of the file at that URL
    filename: str


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "codellama"


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fetch(source: Source, folder: Optional[Path] = None) -> Path:
    """The cached copy of `source`, downloaded first if missing. A download whose SHA-256
    differs from the pinned one is deleted and refused."""
    folder = folder or cache_dir()
    path = folder / source.filename
    if path.exists():
        check_digest(path, source)
        return path
    folder.mkdir(parents=True, exist_ok=True)
    print(f"downloading {source.url} to {path}")
    with tempfile.NamedTemporaryFile(dir=folder, delete=False) as tmp:
        try:
            with urllib.request.urlopen(source.url, timeout=60) as response:
                for block in iter(lambda: response.read(1 << 20), b""):
                    tmp.write(block)
        except OSError as e:
            os.unlink(tmp.name)
            raise ConnectionError(f"could not download {source.url} ({e}); download it "
                                  f"yourself and pass its path with --data") from e
    check_digest(Path(tmp.name), source)
    os.replace(tmp.name, path)
    return path


def check_digest(path: Path, source: Source) -> None:
    actual = sha256_of(path)
    if actual != source.sha256:
        path.unlink()
        raise ValueError(f"{path} has SHA-256 {actual}, not the expected {source.sha256} "
                         f"of {source.url}; it was deleted: run again to download it anew, "
                         f"or pass a good copy with --data")


ONE_OBJECT_PER_LINE = "the file must hold one JSON object per line"


def read_jsonl(path) -> List[dict]:
    """Rows of a .jsonl or .jsonl.gz file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {number} is not a JSON object"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} ({e}); {ONE_OBJECT_PER_LINE}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}; {ONE_OBJECT_PER_LINE}")
            rows.append(row)
    return rows


def check_rows(rows: List[dict], fields, path) -> List[dict]:
    """Refuse a file that lacks a field of the benchmark's rows (the wrong file)."""
    for i, row in enumerate(rows):
        missing = [f for f in fields if f not in row]
        if missing:
            raise ValueError(f"record {i + 1} of {path} has no {', '.join(missing)}: it is "
                             f"not a file of this benchmark")
    return rows


def by_id(rows: List[dict], key: str = "task_id") -> Dict[str, dict]:
    table = {}
    for row in rows:
        if row[key] in table:
            raise ValueError(f"task {row[key]!r} appears twice in the data")
        table[row[key]] = row
    return table
