"""Train the bundled demo model, models/CodeLlama-demo, from scratch.

A 13.4M-parameter Code Llama-shaped model (dim 384, 8 layers, 6 query heads of 64,
2 key/value heads, SwiGLU width 768, RMSNorm, RoPE theta 1e6, untied output, vocab 4096;
26 MB in bf16; loads with 1 or 2 model-parallel ranks) with its own SentencePiece BPE
tokenizer carrying the Code Llama infilling pieces, trained on Python source that may be
redistributed (the standard library and the permissively licensed packages installed
beside it) with the Code Llama fill-in-the-middle objective, and written in Meta's
original checkpoint format (consolidated.00.pth in bf16, params.json, tokenizer.model,
checklist.chk).

Pipeline (everything is seeded; a second run with the same arguments on the same Python
with the same packages gives the same data, tokenizer and initial weights):

1. Corpus: the .py files under sysconfig.get_paths()["stdlib"] and, for the full model,
   those of every distribution installed in this Python's own site-packages whose licence
   metadata names a permissive licence (MIT, BSD, Apache, PSF, ISC, ...) and no copyleft
   one (GPL, LGPL, MPL, ...; licence_of/is_permissive), keyed "site-packages/<path>".
   Left out: test suites (any folder named test, tests or idle_test, or starting with
   test_/tests_), protobuf-generated *_pb2.py, files over 200 KB or with a line over 1,000
   characters (generated tables), and exact duplicates (vendored copies). Each file goes to
   a split by the SHA-256 of its key: 2% "test" (held out: only tools/eval_demo_model.py
   reads it), 2% "valid" (monitoring and choice of the final weights), the rest "train";
   a text that is held out is never trained on, even under another path. At most
   max_train_chars (500M) characters are trained on.
2. Tokenizer: SentencePiece BPE trained on the lines of the standard library's train
   files only, so it is the same whatever packages are installed (vocab 4096, exact,
   divisible by 8; identity normalisation, byte fallback, split digits, whitespace-only
   pieces, extra whitespace kept) with the user-defined pieces "☺" (the anchor of
   Tokenizer.encode_infilling) and ▁<PRE> ▁<SUF> ▁<MID> ▁<EOT>.
3. Samples, fresh for every epoch: each file is cut at line boundaries into chunks of
   25-100% of 3600 characters; each chunk is one document. With probability 0.9 it becomes
   a fill-in-the-middle sample (Code Llama paper, section 2.3): prefix/middle/suffix cut at
   two uniform random character positions, or (50% of FIM samples) the middle is exactly
   one non-blank line with its newline, which is what the single-line infilling benchmark
   asks for; then half PSM and half SPM, laid out by the library itself:
       llama.prompts.infilling_prompt_tokens(tok, prefix, suffix, suffix_first)
       + tok.encode_infilling(middle) + [tok.eot_id]
   The other 10%: tok.encode(text, bos=True, eos=True). Samples whose text would encode to
   a control token are dropped. A sample longer than the context is cut in two at a line
   boundary and each half resampled, so no sample straddles two contexts (the paper applies
   FIM only to documents that are not cut across contexts). Samples are shuffled and packed
   best-fit into rows of 1024 tokens; the loss covers every token of a sample after its
   first, never across samples, never padding.
4. Training: transformers.LlamaForCausalLM with the config from
   llama.hf.hf_config, compiled with torch.compile on CUDA, AdamW (0.9, 0.95,
   weight decay 0.1 on matrices), peak lr 2e-3, 200 warmup steps, cosine decay to 10%,
   gradient clipping at 1.0, no dropout (the data is large for this model), bf16
   autocast on CUDA, batch 64 x 1024 tokens. Eight epochs of samples are prepared (each
   freshly FIM-transformed and packed; about 99M tokens per epoch with Python 3.12 and the
   lent H200's packages), and training runs for as many of their steps as fit the time:
   after the first 35 steps the step count is cut so that optimisation ends inside this
   invocation's budget (--minutes less --reserve_s) and --plan_minutes; the cosine
   schedule follows the new count. On one H200 this runs at ~2M tokens/s.
   The validation loss is measured every 250 steps; the final weights are those with the
   lowest one (--select best).
5. Export: llama.hf.hf_to_meta (undoes the RoPE permutation of wq/wk), bf16,
   written with params.json, tokenizer.model and checklist.chk; then the folder is loaded
   with llama.Llama.build and its float32 logits on a held-out sample are compared with the
   Hugging Face model's (float32, same bf16-rounded weights): this proves the conversion.

Time budget and resuming: the script stops --reserve_s before --minutes of wall time
have passed (data preparation included), saves model, optimizer, step, RNG states and data
position to <work_dir>/train_state.pt and exits with status 75; running the same command
again resumes from there. The state holds tensors and plain values only and is loaded with
torch.load(weights_only=True), so a train_state.pt from elsewhere cannot run code. Prepared
data and the tokenizer are cached in work_dir. When training is complete the folder and
the stats JSON are written and the exit status is 0; running again after that only
re-exports and re-verifies.

Nothing is half-written or lost: the state, the stats and the data cache's meta.json are
written through a temporary file and a rename; the model folder is written beside
--out_dir and swapped in when complete. An --out_dir must be absent or empty, or hold only
a model folder's four files and --overwrite be given (checked before training starts).

    PYTHONPATH=. python tools/train_demo_model.py --work_dir out/demo-train \
        --out_dir models/CodeLlama-demo --overwrite --stats out/demo-train/train_stats.json
    PYTHONPATH=. python tools/train_demo_model.py --tiny --work_dir /tmp/demo-tiny  # CPU test
"""

import argparse
import bisect
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import platform
import random
import re
import secrets
import shutil
import sys
import sysconfig
import time
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from llama.checkpoint import md5  # noqa: E402
from llama.model import ModelArgs  # noqa: E402
from llama.prompts import infilling_prompt_tokens  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402

INFILL_PIECES = ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]
ANCHOR = "☺"
EXIT_UNFINISHED = 75  # EX_TEMPFAIL: the time budget ran out; run the same command again

# ---- configuration -------------------------------------------------------------------
FULL = dict(
    # model (params.json)
    # Deep and narrow: infilling (PSM) needs several layers to look up where the prefix
    # ended; a 4-layer, 512-wide first version could complete code but not fill lines.
    dim=384, n_layers=8, n_heads=6, n_kv_heads=2, multiple_of=256, ffn_dim_multiplier=0.75,
    norm_eps=1e-5, rope_theta=1000000,
    # tokenizer
    vocab_size=4096, character_coverage=0.9999,
    # corpus and samples
    site_packages=True, max_train_chars=500_000_000,
    max_file_bytes=200_000, test_permille=20, valid_permille=20, max_files=None,
    chunk_chars=3600, fim_rate=0.9, line_fim_rate=0.5, spm_rate=0.5,
    # optimisation
    ctx=1024, batch_size=64, epochs=8, max_steps=None, lr=2e-3, min_lr_ratio=0.1,
    warmup_steps=200, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, dropout=0.0,
    eval_every=250, valid_rows=256, log_every=100, seed=20240824,
)
TINY = dict(
    FULL,
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=1.0,
    vocab_size=1024, site_packages=False, max_file_bytes=30_000, max_files=48, test_permille=100,
    valid_permille=100, chunk_chars=900, ctx=256, batch_size=8, epochs=2, max_steps=40,
    lr=3e-3, warmup_steps=5, eval_every=10, valid_rows=16, log_every=5, dropout=0.1,
)
PARAM_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "ffn_dim_multiplier",
              "norm_eps", "rope_theta")
# Keys that must not change between a run and its resumption.
STATE_KEYS = tuple(k for k in FULL if k not in ("log_every",))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- corpus --------------------------------------------------------------------------
TEST_DIRS = {"test", "tests", "idle_test"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_excluded(rel: Path) -> bool:
    """site-packages, test suites (test/, tests/, idlelib/idle_test, lib2to3/tests, ...) and
    encodings/ (generated 256-entry character tables: they teach nothing about code and
    made the held-out perplexity look far better than the model is)."""
    if rel.parts and rel.parts[0] == "encodings":
        return True
    for part in rel.parts[:-1]:
        if part in ("site-packages", "dist-packages", "__pycache__") or part in TEST_DIRS:
            return True
        if part.startswith(("test_", "tests_")):
            return True
    return rel.name.startswith("test_")


def split_of(rel: str, cfg: dict) -> str:
    """'test' (held out), 'valid' or 'train', by the SHA-256 of the relative POSIX path."""
    bucket = int(hashlib.sha256(rel.encode("utf-8")).hexdigest(), 16) % 1000
    if bucket < cfg["test_permille"]:
        return "test"
    if bucket < cfg["test_permille"] + cfg["valid_permille"]:
        return "valid"
    return "train"


SITE_PREFIX = "site-packages/"
# Licences whose code may be redistributed and learned from freely. A distribution is used
# only if its licence metadata names one of these and none of the copyleft families
# (conservative: "MIT OR GPL" is left out, and so is anything without licence metadata).
PERMISSIVE = re.compile(r"\b(MIT|BSD|0BSD|APACHE|ASL|PSF|PYTHON SOFTWARE FOUNDATION|ISC|"
                        r"UNLICENSE|ZLIB|BSL|CC0|PUBLIC DOMAIN)", re.I)
COPYLEFT = re.compile(r"\b(A?GPL|LGPL|GNU|MPL|MOZILLA|EPL|ECLIPSE|EUPL|CDDL|CC-BY-SA|OSL)", re.I)


def licence_of(dist) -> str:
    """The licence metadata of an installed distribution as one string: License-Expression,
    a short License field (long ones are whole licence texts) and the License classifiers."""
    meta = dist.metadata
    parts = [meta.get("License-Expression") or ""]
    field = (meta.get("License") or "").strip()
    if len(field) <= 200:
        parts.append(field)
    parts += [c for c in (meta.get_all("Classifier") or []) if c.startswith("License ::")]
    return " | ".join(p for p in parts if p)


def is_permissive(licence: str) -> bool:
    return bool(PERMISSIVE.search(licence)) and not COPYLEFT.search(licence)


def site_packages_files():
    """[(key, path)] for the .py files of the permissively licensed distributions installed
    in this Python's own site-packages (not PYTHONPATH or user folders), key being
    "site-packages/<path relative to site-packages>"; and {distribution: (version,
    licence, files)} for the record."""
    import importlib.metadata as metadata

    roots = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    files, used = [], {}
    for dist in sorted(metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        name = dist.metadata["Name"] or ""
        if name.lower() in EXCLUDED_DISTRIBUTIONS or not dist.files:
            continue
        licence = licence_of(dist)
        if not is_permissive(licence):
            continue
        count = 0
        for f in dist.files:
            if not str(f).endswith(".py") or str(f).endswith("_pb2.py"):
                continue
            path = Path(dist.locate_file(f)).resolve()
            root = next((r for r in roots if path.is_relative_to(r)), None)
            if root is None:
                continue
            files.append((SITE_PREFIX + path.relative_to(root).as_posix(), path))
            count += 1
        if count:
            used[name] = (dist.version, licence, count)
    return files, used


# Our own package (when pip-installed) is not training data; pip and setuptools vendor
# copies of other projects whose licences their metadata does not list.
EXCLUDED_DISTRIBUTIONS = {"codellama", "pip", "setuptools"}


def list_corpus(cfg: dict, root: Optional[Path] = None):
    """({split: [(key, text), ...]} sorted by key, {distribution: (version, licence, .py
    files)} of the site-packages used). Keys are paths relative to the standard
    library, or "site-packages/<path>" for the permissively licensed packages (cfg
    "site_packages"). Files that are not UTF-8, or over max_file_bytes, or with a line over
    1,000 characters (generated tables) are skipped; so is every file whose exact text was
    already taken (vendored copies), so a held-out text is never trained on.
    With cfg["max_files"] (the --tiny mode) each split keeps only its first files in hash
    order, max_files for train and max(3, max_files // 12) for the others."""
    root = root or stdlib_root()
    candidates = [(path.relative_to(root).as_posix(), path) for path in sorted(root.rglob("*.py"))
                  if not is_excluded(path.relative_to(root))]
    distributions = {}
    if cfg.get("site_packages"):
        site, distributions = site_packages_files()
        candidates += site
    splits: Dict[str, List[Tuple[str, str]]] = {"train": [], "valid": [], "test": []}
    taken = set()  # SHA-256 of every text taken: each text once, in one split only
    for key, path in sorted(candidates):
        if (is_excluded(Path(key.removeprefix(SITE_PREFIX))) or not path.is_file()
                or path.stat().st_size > cfg["max_file_bytes"]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if not text.strip() or digest in taken or max(map(len, text.splitlines())) > 1000:
            continue
        taken.add(digest)
        splits[split_of(key, cfg)].append((key, text))
    if cfg.get("max_train_chars"):
        # Over the cap, the standard library is kept whole and site-packages files are
        # taken in the order of their key's hash (a random but fixed sample).
        budget = cfg["max_train_chars"] - sum(len(t) for k, t in splits["train"]
                                              if not k.startswith(SITE_PREFIX))
        kept = set()
        for k, t in sorted((f for f in splits["train"] if f[0].startswith(SITE_PREFIX)),
                           key=lambda f: hashlib.sha256(f[0].encode()).hexdigest()):
            if len(t) <= budget:
                kept.add(k)
                budget -= len(t)
        splits["train"] = [f for f in splits["train"]
                           if not f[0].startswith(SITE_PREFIX) or f[0] in kept]
    stdlib_train = sum(1 for k, _ in splits["train"] if not k.startswith(SITE_PREFIX))
    if not cfg.get("max_files") and stdlib_train < 300:
        raise SystemExit(f"only {stdlib_train} training files under {root}: this Python "
                         f"installation lacks most of its standard library's .py sources")
    if cfg.get("max_files"):
        def key(item):
            return hashlib.sha256(item[0].encode()).hexdigest()
        for name, limit in (("train", cfg["max_files"]),
                            ("valid", max(3, cfg["max_files"] // 12)),
                            ("test", max(3, cfg["max_files"] // 12))):
            splits[name] = sorted(sorted(splits[name], key=key)[:limit])
    return splits, distributions


def corpus_fingerprint(splits) -> str:
    h = hashlib.sha256()
    for name in sorted(splits):
        for rel, text in splits[name]:
            h.update(f"{name}\0{rel}\0".encode())
            h.update(hashlib.sha256(text.encode("utf-8")).digest())
    return h.hexdigest()


# ---- tokenizer -----------------------------------------------------------------------
def train_tokenizer(train_files, cfg: dict, path: Path) -> None:
    """SentencePiece BPE on the lines of the train files (newlines fall back to the byte
    piece <0x0A>, as in Llama's tokenizer). The thread count is fixed and no path is
    passed, because the trainer spec stored in the model file records both: the file is
    then the same on every machine."""
    import io

    import sentencepiece as spm

    spm.set_random_generator_seed(cfg["seed"])
    lines = [line for _, text in train_files for line in text.split("\n") if line]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=cfg["vocab_size"],
        model_type="bpe",
        character_coverage=cfg["character_coverage"],
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        user_defined_symbols=[ANCHOR] + INFILL_PIECES,
        max_sentence_length=8192,
        num_threads=16,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())


def check_tokenizer(path: Path, vocab_size: int) -> Tokenizer:
    """The properties the library relies on; raises AssertionError if one fails."""
    tok = Tokenizer(str(path))
    sp = tok.sp_model
    assert tok.n_words == vocab_size and vocab_size % 8 == 0, (tok.n_words, vocab_size)
    assert tok.supports_infilling, "infilling pieces missing"
    assert sp.piece_to_id(ANCHOR) != sp.unk_id(), "anchor ☺ missing"
    assert (tok.bos_id, tok.eos_id) == (1, 2) and sp.unk_id() == 0
    ids = tok.encode_infilling("\n    x")
    assert ids and not tok.token_piece(ids[0]).startswith("▁"), \
        [tok.token_piece(i) for i in ids]
    for s in ["\n    x", " x", "x", "", "  return a\n", "\tif x:\n\t\tpass  \n", "☺☺ ok ",
              "def f(a, b=12345):\n    return a + b  # ünïcödé 漢字 🙂\n"]:
        got = tok.decode_infilling(tok.encode_infilling(s))
        assert got == s, (s, got)
        assert not tok.control_ids.intersection(tok.encode_infilling(s))
    code = "import os\n\n\nclass A:\n    def f(self, x):\n        return x  # done\n"
    assert tok.decode(tok.encode(code, bos=True, eos=True)) == code
    return tok


# ---- samples -------------------------------------------------------------------------
def chunk_text(text: str, rng: random.Random, max_chars: int) -> List[str]:
    """Cut a file at line boundaries into chunks of 25-100% of max_chars characters
    (lines longer than max_chars are cut first)."""
    pieces = []
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            pieces.append(line[:max_chars])
            line = line[max_chars:]
        if line:
            pieces.append(line)
    chunks, cur, size = [], [], 0
    target = rng.randint(max_chars // 4, max_chars)
    for piece in pieces:
        if cur and size + len(piece) > target:
            chunks.append("".join(cur))
            cur, size = [], 0
            target = rng.randint(max_chars // 4, max_chars)
        cur.append(piece)
        size += len(piece)
    if cur:
        chunks.append("".join(cur))
    return chunks


def fim_split(text: str, rng: random.Random, line_rate: float) -> Tuple[str, str, str, str]:
    """(prefix, middle, suffix, kind): one whole non-blank line with its newline as the
    middle (kind 'line'), or a cut at two uniform random character positions ('random')."""
    if rng.random() < line_rate:
        lines = text.splitlines(keepends=True)
        candidates = [i for i, line in enumerate(lines) if line.strip()]
        if candidates:
            i = rng.choice(candidates)
            return "".join(lines[:i]), lines[i], "".join(lines[i + 1:]), "line"
    a, b = sorted(rng.randint(0, len(text)) for _ in range(2))
    return text[:a], text[a:b], text[b:], "random"


def make_sample(tok: Tokenizer, text: str, rng: random.Random, cfg: dict):
    """(token ids, kind) of one training document, or (None, 'skipped') when its text
    would encode to control tokens."""
    if rng.random() < cfg["fim_rate"]:
        prefix, middle, suffix, kind = fim_split(text, rng, cfg["line_fim_rate"])
        suffix_first = rng.random() < cfg["spm_rate"]
        try:
            prompt = infilling_prompt_tokens(tok, prefix, suffix, suffix_first)
        except ValueError:
            return None, "skipped"
        mid = tok.encode_infilling(middle)
        if tok.control_ids.intersection(mid):
            return None, "skipped"
        return prompt + mid + [tok.eot_id], f"{kind}_{'spm' if suffix_first else 'psm'}"
    ids = tok.encode(text, bos=True, eos=True)
    if tok.control_ids.intersection(ids):
        return None, "skipped"
    return ids, "plain"


def document_samples(tok, text, rng, cfg, out: list, kinds: dict) -> None:
    ids, kind = make_sample(tok, text, rng, cfg)
    kinds[kind] = kinds.get(kind, 0) + 1
    if ids is None:
        return
    if len(ids) <= cfg["ctx"]:
        out.append(np.asarray(ids, dtype=np.uint16))
        return
    kinds[kind] -= 1
    kinds["resplit"] = kinds.get("resplit", 0) + 1
    lines = text.splitlines(keepends=True)
    cut = sum(len(x) for x in lines[: len(lines) // 2]) if len(lines) > 1 else len(text) // 2
    for part in (text[:cut], text[cut:]):
        if part:
            document_samples(tok, part, rng, cfg, out, kinds)


def pack(samples: List[np.ndarray], ctx: int, pad_id: int, buffer: int = 512):
    """Best-fit packing into rows of ctx tokens: each row takes, while any fits, the longest
    of the next `buffer` samples that fits its remaining space. Returns (tokens uint16
    (rows, ctx), has_target bool (rows, ctx)), has_target[r, t] meaning tokens[r, t+1] is
    the target at position t (same sample)."""
    pending: List[Tuple[int, int]] = []  # sorted (length, index) of the buffered samples
    nxt = 0
    rows = []

    def refill():
        nonlocal nxt
        while len(pending) < buffer and nxt < len(samples):
            bisect.insort(pending, (len(samples[nxt]), nxt))
            nxt += 1

    refill()
    while pending:
        space, row = ctx, []
        while pending:
            i = bisect.bisect_right(pending, (space, len(samples))) - 1
            if i < 0:
                break
            length, index = pending.pop(i)
            row.append(samples[index])
            space -= length
            refill()
        rows.append(row)
    tokens = np.full((len(rows), ctx), pad_id, dtype=np.uint16)
    has_target = np.zeros((len(rows), ctx), dtype=bool)
    for r, row in enumerate(rows):
        pos = 0
        for s in row:
            tokens[r, pos:pos + len(s)] = s
            has_target[r, pos:pos + len(s) - 1] = True
            pos += len(s)
    return tokens, has_target


_WORKER: dict = {}


def _init_worker(tokenizer_path: str, files: dict, cfg: dict) -> None:
    _WORKER.update(tok=Tokenizer(tokenizer_path), files=files, cfg=cfg)
    torch.set_num_threads(1)


def _shard_rows(task: Tuple[str, int, int]):
    """Packed rows of one shard (files i with i % n_shards == shard) of one epoch
    ('0', '1', ...) or of the validation set ('valid')."""
    tag, shard, n_shards = task
    tok, cfg = _WORKER["tok"], _WORKER["cfg"]
    files = _WORKER["files"]["valid" if tag == "valid" else "train"][shard::n_shards]
    samples, kinds = [], {}
    for rel, text in files:
        rng = random.Random(f"{cfg['seed']}/{tag}/{rel}")
        for chunk in chunk_text(text, rng, cfg["chunk_chars"]):
            document_samples(tok, chunk, rng, cfg, samples, kinds)
    random.Random(f"{cfg['seed']}/shuffle/{tag}/{shard}").shuffle(samples)
    tokens, has_target = pack(samples, cfg["ctx"], tok.eos_id)
    n_tokens = int(sum(len(s) for s in samples))
    return task, tokens, has_target, kinds, n_tokens


def prepare_data(cfg: dict, work_dir: Path, workers: int) -> dict:
    """Corpus, tokenizer and packed rows for all epochs, cached in work_dir/data-<key>."""
    t0 = time.time()
    splits, distributions = list_corpus(cfg)
    fingerprint = corpus_fingerprint(splits)
    data_cfg = {k: cfg[k] for k in ("vocab_size", "character_coverage", "chunk_chars",
                                    "fim_rate", "line_fim_rate", "spm_rate", "ctx", "epochs",
                                    "seed", "max_file_bytes", "test_permille",
                                    "valid_permille", "max_files", "site_packages")}
    key = hashlib.sha256(json.dumps([fingerprint, data_cfg], sort_keys=True).encode()).hexdigest()
    data_dir = work_dir / f"data-{key[:12]}"
    meta_path = data_dir / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        log(f"using cached data {data_dir} ({meta['train_rows']} train rows)")
    else:
        data_dir.mkdir(parents=True, exist_ok=True)
        counts = {k: len(v) for k, v in splits.items()}
        chars = {k: sum(len(t) for _, t in v) for k, v in splits.items()}
        log(f"corpus: Python {platform.python_version()} stdlib {stdlib_root()}"
            f"{f' + {len(distributions)} site-packages distributions' if distributions else ''}"
            f": files {counts}, characters {chars}")
        tok_path = data_dir / "tokenizer.model"
        t1 = time.time()
        # The tokenizer is learnt from the standard library alone: the same pieces on
        # every machine, whatever packages are installed.
        train_tokenizer([f for f in splits["train"] if not f[0].startswith(SITE_PREFIX)],
                        cfg, tok_path)
        tok = check_tokenizer(tok_path, cfg["vocab_size"])
        assert tok.n_words <= 65536, "token ids are stored as uint16"
        plain = sum(len(tok.encode(t, bos=False, eos=False)) for _, t in splits["valid"])
        log(f"tokenizer: {tok.n_words} pieces in {time.time() - t1:.1f}s; "
            f"{chars['valid'] / max(plain, 1):.2f} characters per token on the valid split")
        t1 = time.time()
        # Each epoch is cut into shards of files, packed in parallel; the rows of an epoch
        # are then shuffled across shards.
        n_shards = max(1, workers)
        tasks = [(str(e), i, n_shards) for e in range(cfg["epochs"]) for i in range(n_shards)]
        tasks.append(("valid", 0, 1))
        ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        files = {"train": splits["train"], "valid": splits["valid"]}
        with ctx.Pool(workers, _init_worker, (str(tok_path), files, cfg)) as pool:
            results = {r[0]: r for r in pool.imap_unordered(_shard_rows, tasks)}
        epochs_tok, epochs_tgt = [], []
        for e in range(cfg["epochs"]):
            parts = [results[(str(e), i, n_shards)] for i in range(n_shards)]
            tok_e = np.concatenate([r[1] for r in parts])
            order = np.random.default_rng([cfg["seed"], e]).permutation(len(tok_e))
            epochs_tok.append(tok_e[order])
            epochs_tgt.append(np.concatenate([r[2] for r in parts])[order])
        train_tok, train_tgt = np.concatenate(epochs_tok), np.concatenate(epochs_tgt)
        valid = results[("valid", 0, 1)]
        np.save(data_dir / "train_tokens.npy", train_tok)
        np.save(data_dir / "train_targets.npy", train_tgt)
        np.save(data_dir / "valid_tokens.npy", valid[1])
        np.save(data_dir / "valid_targets.npy", valid[2])
        train_parts = [r for task, r in results.items() if task[0] != "valid"]
        kinds: Dict[str, int] = {}
        for r in train_parts:
            for k, v in r[3].items():
                kinds[k] = kinds.get(k, 0) + v
        sample_tokens = sum(r[4] for r in train_parts)
        meta = dict(
            key=key, corpus_fingerprint=fingerprint, python_version=platform.python_version(),
            python_implementation=platform.python_implementation(),
            stdlib=str(stdlib_root()), files=counts, characters=chars,
            stdlib_files={k: sum(not rel.startswith(SITE_PREFIX) for rel, _ in v)
                          for k, v in splits.items()},
            distributions={name: dict(version=v, licence=lic, files=n)
                           for name, (v, lic, n) in distributions.items()},
            test_files=[rel for rel, _ in splits["test"]],
            valid_files=[rel for rel, _ in splits["valid"]],
            characters_per_token_valid=chars["valid"] / max(plain, 1),
            train_rows=int(len(train_tok)), valid_rows=int(len(valid[1])),
            train_tokens_per_epoch=sample_tokens / cfg["epochs"],
            packing_efficiency=sample_tokens / train_tok.size,
            sample_kinds=kinds, seconds=None,
        )
        meta["seconds"] = round(time.time() - t0, 1)
        write_json(meta_path, meta)  # written last: its presence marks a complete cache
        log(f"samples: {sum(kinds.values())} documents over {cfg['epochs']} epochs {kinds}; "
            f"{meta['train_tokens_per_epoch']:.0f} tokens/epoch, {len(train_tok)} rows of "
            f"{cfg['ctx']}, packing {meta['packing_efficiency']:.1%}, "
            f"{time.time() - t1:.1f}s")
    meta["dir"] = str(data_dir)
    meta["splits"] = splits
    return meta


# ---- model ---------------------------------------------------------------------------
def model_args(cfg: dict) -> ModelArgs:
    return ModelArgs(**{k: cfg[k] for k in PARAM_KEYS}, vocab_size=cfg["vocab_size"],
                     max_seq_len=cfg["ctx"])


def hf_model(args: ModelArgs, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama.hf import hf_config

    config = LlamaConfig(**hf_config(args))
    config._attn_implementation = attn
    rope = getattr(config, "rope_parameters", None) or {}  # transformers >= 5
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    assert theta == float(args.rope_theta), f"transformers ignored rope_theta: {theta}"
    return LlamaForCausalLM(config)


def add_dropout(model, p: float) -> None:
    """Dropout on the embeddings and on the output of every attention and MLP block
    (LlamaForCausalLM has only attention-probability dropout). Active in train() only."""
    if p <= 0:
        return

    def hook(module, inputs, output):
        if not module.training:
            return output
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, True),) + tuple(output[1:])
        return F.dropout(output, p, True)

    model.model.embed_tokens.register_forward_hook(hook)
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def hf_state(model) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().float().clone() for k, v in model.state_dict().items()
            if not k.endswith("rotary_emb.inv_freq")}


def meta_state(state: Dict[str, torch.Tensor], args: ModelArgs) -> "OrderedDict":
    """bf16 state dict with Meta's key names, in Meta's module order."""
    from llama.hf import HF_LAYER_KEYS, hf_to_meta

    meta = hf_to_meta(state, args)
    order = ["tok_embeddings.weight"]
    for i in range(args.n_layers):
        order += [f"layers.{i}.{k}" for k in HF_LAYER_KEYS]
    order += ["norm.weight", "output.weight"]
    assert sorted(order) == sorted(meta), set(order) ^ set(meta)
    return OrderedDict((k, meta[k].to(torch.bfloat16).contiguous().clone()) for k in order)


EXPORT_FILES = ("consolidated.00.pth", "params.json", "tokenizer.model", "checklist.chk")


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an --out_dir whose content would be lost: the export replaces the whole
    folder, so it must be absent or empty, or hold only a model folder's four files and
    --overwrite must say that replacing them is wanted."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise SystemExit(f"--out_dir {out_dir} exists and is not a folder; choose another "
                         f"--out_dir")
    names = sorted(p.name for p in out_dir.iterdir())
    others = [n for n in names if n not in EXPORT_FILES]
    if others:
        raise SystemExit(f"--out_dir {out_dir} holds files this script does not write "
                         f"({', '.join(others)}); the export replaces the whole folder, so "
                         f"choose another --out_dir or move them away")
    if names and not overwrite:
        raise SystemExit(f"--out_dir {out_dir} already holds a model ({', '.join(names)}); "
                         f"add --overwrite to replace it, or choose another --out_dir")


def temp_sibling(path: Path) -> Path:
    """A hidden, unused name beside path for writing before a rename."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def write_json(path: Path, obj) -> None:
    """Write through a temporary file and a rename, so that a failed write (a full disk,
    a kill) leaves the previous file, never half of a new one."""
    tmp = temp_sibling(path)
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(json.dumps(obj, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_dir(new: Path, dest: Path) -> None:
    """Put folder new in place of dest; the old dest is removed only once new is there."""
    if not dest.exists() and not dest.is_symlink():
        os.replace(new, dest)
        return
    old = temp_sibling(dest)
    os.replace(dest, old)
    os.replace(new, dest)
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old)


def write_folder(out_dir: Path, state: "OrderedDict", cfg: dict, tokenizer_path: Path,
                 overwrite: bool) -> dict:
    """Write the model folder beside out_dir and swap it in when complete: a failure
    leaves the previous folder as it was and no half-written one under its name."""
    check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out_dir)
    tmp.mkdir()  # follows the umask, unlike tempfile.mkdtemp's 0700
    try:
        torch.save(state, tmp / "consolidated.00.pth")
        params = {k: cfg[k] for k in PARAM_KEYS}
        (tmp / "params.json").write_text(json.dumps(params, indent=4))
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        names = ["consolidated.00.pth", "params.json", "tokenizer.model"]
        sums = {n: md5(tmp / n) for n in names}
        (tmp / "checklist.chk").write_text("".join(f"{sums[n]}  {n}\n" for n in names))
        size = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dict(md5=sums, folder_bytes=size, params=params)


# ---- training ------------------------------------------------------------------------
def lr_at(step: int, total: int, cfg: dict) -> float:
    peak, warm = cfg["lr"], cfg["warmup_steps"]
    if step < warm:
        return peak * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    floor = peak * cfg["min_lr_ratio"]
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_tensors(tokens: np.ndarray, targets: np.ndarray, device):
    x = torch.from_numpy(tokens.astype(np.int64))
    nxt = torch.from_numpy(np.concatenate([tokens[:, 1:], tokens[:, :1]], 1).astype(np.int64))
    y = torch.where(torch.from_numpy(np.array(targets, dtype=bool)), nxt, -100)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def loss_of(model, x, y, autocast):
    with autocast():
        logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)


@torch.no_grad()
def valid_loss(model, tokens, targets, cfg, device, autocast) -> float:
    model.eval()
    total, count = 0.0, 0
    rows = min(len(tokens), cfg["valid_rows"])
    for i in range(0, rows, cfg["batch_size"]):
        x, y = batch_tensors(tokens[i:i + cfg["batch_size"]], targets[i:i + cfg["batch_size"]],
                             device)
        n = int((y != -100).sum())
        total += float(loss_of(model, x, y, autocast)) * n
        count += n
    model.train()
    return total / max(count, 1)


def rng_state(device) -> dict:
    # Tensors and plain Python values only (numpy's key array becomes a tensor): the state
    # must load with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), python=random.getstate(),
                 numpy=(kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                        int(has_gauss), float(gauss)))
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


STATE_FIELDS = ("config", "data_key", "model", "optimizer", "rng", "progress")


def save_state(path: Path, payload: dict) -> None:
    tmp = temp_sibling(path)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_state(path: Path) -> dict:
    """The state save_state wrote. weights_only=True: a train_state.pt from somewhere
    else may hold tensors and plain values, never code that runs when it is loaded."""
    advice = "delete it or use a fresh --work_dir"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # PyTorch's own message suggests weights_only=False, the very thing to avoid.
        raise SystemExit(f"{path} holds Python objects other than tensors and plain values, "
                         f"so this script did not write it (or an older version did) and "
                         f"will not load it: loading could run code; {advice}") from None
    except (RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"{path} cannot be read ({first}); {advice}") from None
    if (not isinstance(saved, dict) or not set(STATE_FIELDS) <= set(saved)
            or not all(isinstance(saved[k], dict) for k in ("config", "progress", "rng"))):
        raise SystemExit(f"{path} is not a training state of this script (that is a "
                         f"dictionary of {', '.join(STATE_FIELDS)}); {advice}")
    return saved


def param_count(args: ModelArgs) -> int:
    hd, kv, hidden = args.head_dim, args.kv_heads, args.ffn_hidden_dim
    layer = args.dim * (2 * args.n_heads * hd + 2 * kv * hd) + 3 * args.dim * hidden + 2 * args.dim
    return 2 * args.vocab_size * args.dim + args.n_layers * layer + args.dim


# ---- verification --------------------------------------------------------------------
def verify(out_dir: Path, state: "OrderedDict", args: ModelArgs, sample: str, cfg: dict,
           device) -> dict:
    """Load the written folder with llama.Llama.build (float32) and compare its logits
    on a held-out sample with LlamaForCausalLM's (float32, the same bf16-rounded weights)."""
    from llama import Llama
    from llama.hf import meta_to_hf

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        llama = Llama.build(str(out_dir), max_seq_len=cfg["ctx"], max_batch_size=2,
                            device=device, dtype=torch.float32)
        ids = llama.tokenizer.encode(sample, bos=True, eos=False)[: cfg["ctx"]]
        tokens = torch.tensor([ids], device=device)
        ours = llama.model.forward(tokens, 0)[0].float().cpu()
        ref = hf_model(args, "eager").to(device).eval()
        ref.load_state_dict({k: v.float() for k, v in meta_to_hf(state, args).items()},
                            strict=True)
        with torch.no_grad():
            theirs = ref(input_ids=tokens, use_cache=False).logits[0].float().cpu()
        diff = (ours - theirs).abs().max().item()
        scale = theirs.abs().max().item()
        agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
        # And the real inference path: greedy infilling of one held-out line.
        lines = sample.splitlines(keepends=True)
        k = next((i for i in range(len(lines) // 2, len(lines)) if lines[i].strip()), 0)
        pre = "".join(lines[max(0, k - 12):k])
        suf = "".join(lines[k + 1:k + 6])
        fill = llama.text_infilling([pre], [suf], temperature=0, max_gen_len=48)[0]
        result = dict(tokens=len(ids), max_abs_logit_diff=diff, max_abs_logit=scale,
                      argmax_agreement=agree, ok=diff <= 1e-3 * max(1.0, scale) and agree > 0.99,
                      infill_example=dict(prefix_tail=pre[-200:], suffix_head=suf[:200],
                                          expected=lines[k], generated=fill["generation"]))
        del llama, ref
        return result
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


# ---- main ----------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="out/demo-train",
                   help="data cache, tokenizer, resumable train_state.pt (default out/demo-train)")
    p.add_argument("--out_dir", default=None,
                   help="model folder to write (default models/CodeLlama-demo; "
                        "with --tiny <work_dir>/model)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out_dir that already holds a model folder")
    p.add_argument("--stats", default=None,
                   help="training stats JSON (default <work_dir>/train_stats.json)")
    p.add_argument("--minutes", type=float, default=8.0,
                   help="wall-clock budget of this invocation, data preparation included")
    p.add_argument("--reserve_s", type=float, default=75.0,
                   help="seconds kept free at the end for saving, export and verification")
    p.add_argument("--plan_minutes", type=float, default=11.0,
                   help="cap on total optimisation time over all runs: if the measured "
                        "throughput says the planned steps would take longer, fewer are run")
    p.add_argument("--tiny", action="store_true",
                   help="tiny corpus subset, tiny model, few steps: a CPU smoke test")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on CUDA)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="processes for data preparation")
    p.add_argument("--select", choices=["best", "last"], default="best",
                   help="final weights: lowest validation loss (default) or the last step")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--max_steps", type=int, default=None)
    p.add_argument("--prepare_only", action="store_true",
                   help="prepare corpus, tokenizer and samples (cached in work_dir), then stop")
    p.add_argument("--stop_after_steps", type=int, default=None,
                   help="testing: stop this invocation after N steps as if out of time")
    return p.parse_args(argv)


def main(argv=None) -> int:
    t_start = time.time()
    opts = parse_args(argv)
    cfg = dict(TINY if opts.tiny else FULL)
    for k in ("epochs", "batch_size", "lr", "max_steps"):
        if getattr(opts, k) is not None:
            cfg[k] = getattr(opts, k)
    deadline = t_start + opts.minutes * 60 - opts.reserve_s
    work_dir = Path(opts.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    out_dir = Path(opts.out_dir or (work_dir / "model" if opts.tiny else ROOT / "models/CodeLlama-demo"))
    stats_path = Path(opts.stats or work_dir / "train_stats.json")
    check_out_dir(out_dir, opts.overwrite)  # now, not after the training it would waste
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args = model_args(cfg)
    log(f"python {platform.python_version()}, torch {torch.__version__}, device {device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; "
        f"model {param_count(args) / 1e6:.2f}M parameters, head_dim {args.head_dim}, "
        f"FFN {args.ffn_hidden_dim}; budget {opts.minutes} min")

    data = prepare_data(cfg, work_dir, max(1, opts.workers))
    tok_path = Path(data["dir"]) / "tokenizer.model"
    check_tokenizer(tok_path, cfg["vocab_size"])
    if opts.prepare_only:
        log(f"data ready in {data['dir']} ({time.time() - t_start:.0f}s)")
        return 0
    train_tok = np.load(Path(data["dir"]) / "train_tokens.npy", mmap_mode="r")
    train_tgt = np.load(Path(data["dir"]) / "train_targets.npy", mmap_mode="r")
    valid_tok = np.load(Path(data["dir"]) / "valid_tokens.npy")
    valid_tgt = np.load(Path(data["dir"]) / "valid_targets.npy")
    planned_steps = len(train_tok) // cfg["batch_size"]
    if cfg["max_steps"]:
        planned_steps = min(planned_steps, cfg["max_steps"])

    torch.manual_seed(cfg["seed"])
    model = hf_model(args).to(device)
    add_dropout(model, cfg["dropout"])
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["weight_decay"]},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), eps=1e-8,
        **({"fused": True} if device.type == "cuda" else {}))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        import contextlib
        autocast = contextlib.nullcontext

    run_cfg = {k: cfg[k] for k in STATE_KEYS}
    state_path = work_dir / "train_state.pt"
    st = dict(step=0, total_steps=planned_steps, planned=False, best_valid=float("inf"),
              best_step=-1, best_state=None, history=[], valid_history=[], train_seconds=0.0,
              runs=[])
    if state_path.is_file():
        saved = load_state(state_path)
        if saved["config"] != run_cfg or saved["data_key"] != data["key"]:
            changed = sorted(k for k in run_cfg if saved["config"].get(k) != run_cfg[k])
            raise SystemExit(f"{state_path} belongs to another configuration or corpus "
                             f"(changed: {changed or 'corpus'}); use a fresh --work_dir")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        set_rng_state(saved["rng"], device)
        st = saved["progress"]
        log(f"resumed from {state_path} at step {st['step']}/{st['total_steps']}")
    else:
        log(f"starting: {planned_steps} steps of {cfg['batch_size']}x{cfg['ctx']} tokens "
            f"({cfg['epochs']} epochs, {len(train_tok)} rows)")
    st["runs"].append(dict(start_step=st["step"], python=platform.python_version(),
                           device=str(device), gpu=torch.cuda.get_device_name(device)
                           if device.type == "cuda" else None))

    def checkpoint_payload():
        # Data position: rows are consumed in order, batch_size per step.
        return dict(config=run_cfg, data_key=data["key"], model=model.state_dict(),
                    optimizer=opt.state_dict(), rng=rng_state(device), progress=st,
                    next_row=st["step"] * cfg["batch_size"])

    use_compile = opts.compile if opts.compile is not None else device.type == "cuda"
    step_model = torch.compile(model) if use_compile else model
    steps_this_run, t_last_save = 0, time.time()
    t_mark, tokens_mark, loss_acc, loss_n = None, 0, 0.0, 0
    unfinished = False
    while st["step"] < st["total_steps"]:
        if time.time() > deadline or (opts.stop_after_steps is not None
                                      and steps_this_run >= opts.stop_after_steps):
            unfinished = True
            break
        step = st["step"]
        t_step = time.time()
        lr = lr_at(step, st["total_steps"], cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        rows = slice(step * cfg["batch_size"], (step + 1) * cfg["batch_size"])
        x, y = batch_tensors(train_tok[rows], train_tgt[rows], device)
        loss = loss_of(step_model, x, y, autocast)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        st["step"] += 1
        steps_this_run += 1
        loss_acc += loss.detach()
        loss_n += 1
        if steps_this_run == 5:  # throughput is measured after compilation and warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_mark, tokens_mark = time.time(), 0
        elif t_mark is not None:
            tokens_mark += x.numel()
        if (not st["planned"] and t_mark is not None and steps_this_run == 35):
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - t_mark) / 30
            left = st["total_steps"] - st["step"]
            # 8% for validation passes and logging; the rest of this invocation's budget
            # and of --plan_minutes bounds the steps, so training ends inside this run.
            allowed = min(opts.plan_minutes * 60 - st["train_seconds"], deadline - time.time())
            projected = per_step * left * 1.08
            if projected > allowed:
                new_total = st["step"] + max(1, int(allowed / (per_step * 1.08)))
                log(f"plan: {per_step * 1000:.0f} ms/step, {x.numel() / per_step / 1e6:.2f}M "
                    f"tokens/s; {st['total_steps']} steps would take {projected / 60:.1f} min "
                    f"> {allowed / 60:.1f} min left, cutting to {new_total}")
                st["total_steps"] = new_total
            else:
                log(f"plan: {per_step * 1000:.0f} ms/step, {x.numel() / per_step / 1e6:.2f}M "
                    f"tokens/s; all {st['total_steps']} steps take ~{projected / 60:.1f} min")
            st["planned"] = True
        st["train_seconds"] += time.time() - t_step
        last = st["step"] == st["total_steps"]
        if st["step"] % cfg["log_every"] == 0 or last:
            mean_loss = float(loss_acc) / loss_n
            tps = None
            if t_mark is not None and tokens_mark:
                tps = tokens_mark / (time.time() - t_mark)
            st["history"].append(dict(step=st["step"], loss=mean_loss, lr=lr,
                                      grad_norm=float(gnorm), tokens_per_s=tps))
            log(f"step {st['step']}/{st['total_steps']} loss {mean_loss:.4f} lr {lr:.2e} "
                f"gnorm {float(gnorm):.2f}" + (f" {tps / 1e3:.1f}k tok/s" if tps else ""))
            loss_acc, loss_n = 0.0, 0
        if st["step"] % cfg["eval_every"] == 0 or last:
            vl = valid_loss(step_model, valid_tok, valid_tgt, cfg, device, autocast)
            st["valid_history"].append(dict(step=st["step"], loss=vl))
            if vl < st["best_valid"]:
                st["best_valid"], st["best_step"] = vl, st["step"]
                st["best_state"] = hf_state(model)
            log(f"valid loss {vl:.4f} (best {st['best_valid']:.4f} at step {st['best_step']})")
        if time.time() - t_last_save > 180:
            save_state(state_path, checkpoint_payload())
            t_last_save = time.time()

    save_state(state_path, checkpoint_payload())
    st["runs"][-1].update(end_step=st["step"], seconds=round(time.time() - t_start, 1))
    summary = dict(
        finished=not unfinished, step=st["step"], total_steps=st["total_steps"],
        corpus=dict(python_version=data["python_version"],
                    implementation=data["python_implementation"], stdlib=data["stdlib"],
                    files=data["files"], characters=data["characters"],
                    test_files=data["test_files"], valid_files=data["valid_files"],
                    stdlib_files=data["stdlib_files"], distributions=data["distributions"],
                    fingerprint=data["corpus_fingerprint"]),
        data=dict(train_rows=data["train_rows"], valid_rows=data["valid_rows"],
                  train_tokens_per_epoch=data["train_tokens_per_epoch"],
                  packing_efficiency=data["packing_efficiency"],
                  characters_per_token_valid=data["characters_per_token_valid"],
                  sample_kinds=data["sample_kinds"], prep_seconds=data["seconds"]),
        config=cfg, parameters=param_count(args), head_dim=args.head_dim,
        ffn_hidden_dim=args.ffn_hidden_dim, tokens_seen=st["step"] * cfg["batch_size"] * cfg["ctx"],
        epochs_seen=st["step"] * cfg["batch_size"] / max(1, data["train_rows"]) * cfg["epochs"],
        train_seconds=round(st["train_seconds"], 1), best_valid_loss=st["best_valid"],
        best_step=st["best_step"], history=st["history"], valid_history=st["valid_history"],
        runs=st["runs"], versions=dict(torch=torch.__version__, python=platform.python_version()),
    )
    stats_path.parent.mkdir(parents=True, exist_ok=True)
    if unfinished:
        write_json(stats_path, summary)
        log(f"time budget reached at step {st['step']}/{st['total_steps']}: state saved to "
            f"{state_path}; run the same command again to resume")
        return EXIT_UNFINISHED

    # ---- export ------------------------------------------------------------------------
    chosen = st["best_state"] if opts.select == "best" and st["best_state"] else hf_state(model)
    summary["selected"] = dict(how=opts.select, step=st["best_step"] if opts.select == "best"
                               else st["step"])
    step_model = opt = None  # free the optimizer state before export
    model.cpu()
    meta = meta_state(chosen, args)
    written = write_folder(out_dir, meta, cfg, tok_path, opts.overwrite)
    log(f"wrote {out_dir}: {written['folder_bytes'] / 2**20:.2f} MiB, md5 {written['md5']}")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # The held-out file with the most functions: its start is the logits sample.
    held_out = max(data["splits"]["test"], key=lambda f: (f[1].count("\n    def "), f[0]))[1]
    sample = held_out[: cfg["ctx"] * 3]
    check = verify(out_dir, meta, args, sample, cfg, device)
    summary.update(export=written, verification=check)
    try:
        import transformers
        summary["versions"]["transformers"] = transformers.__version__
    except ImportError:
        pass
    write_json(stats_path, summary)
    log(f"verification: max |logit diff| {check['max_abs_logit_diff']:.2e} "
        f"(max |logit| {check['max_abs_logit']:.1f}), argmax agreement "
        f"{check['argmax_agreement']:.4f} -> {'OK' if check['ok'] else 'FAILED'}")
    log(f"infill example: expected {check['infill_example']['expected']!r}, "
        f"generated {check['infill_example']['generated']!r}")
    log(f"corpus: Python {data['python_version']} stdlib; best valid loss "
        f"{st['best_valid']:.4f} at step {st['best_step']}; stats in {stats_path}; "
        f"total {time.time() - t_start:.0f}s")
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
