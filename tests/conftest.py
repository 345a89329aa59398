"""Shared fixtures: tiny SentencePiece tokenizers trained here, and random checkpoints in
Meta's original format (params.json + consolidated.NN.pth), sharded as asked."""

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from llama.checkpoint import split_dim
from llama.model import ModelArgs

ROOT = Path(__file__).resolve().parent.parent
INFILL_PIECES = ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]


def training_text() -> str:
    """Some Python source from the standard library: present wherever Python is."""
    import argparse, json as json_mod, textwrap  # noqa: E401
    files = [argparse.__file__, json_mod.__file__, textwrap.__file__]
    return "\n".join(Path(f).read_text() for f in files) + "\nünïcödé ☺ 漢字 🙂\n"


def train_tokenizer(path: Path, extra_pieces) -> str:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text().splitlines()),
        model_writer=model,
        vocab_size=512,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        user_defined_symbols=["☺"] + list(extra_pieces),
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return str(path)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    """A 512-piece tokenizer with the four infilling pieces, like Code Llama 7B/13B."""
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model", INFILL_PIECES)


@pytest.fixture(scope="session")
def step_tokenizer_path(tmp_path_factory):
    """Like the 70B-Instruct tokenizer: infilling pieces plus <step>."""
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model",
                           INFILL_PIECES + ["<step>"])


@pytest.fixture(scope="session")
def plain_tokenizer_path(tmp_path_factory):
    """No infilling pieces, like the Python and 34B models."""
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model", [])


TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
            ffn_dim_multiplier=1.0, norm_eps=1e-5, rope_theta=1e6)


def random_state(args: ModelArgs, seed: int = 0, dtype=torch.float32) -> dict:
    """A full (unsharded) random state dict with the reference's key names."""
    g = torch.Generator().manual_seed(seed)
    hd, kv, hidden = args.head_dim, args.kv_heads, args.ffn_hidden_dim

    def lin(out_f, in_f):
        return torch.randn(out_f, in_f, generator=g) / in_f ** 0.5

    def norm():
        return 1 + 0.1 * torch.randn(args.dim, generator=g)

    state = {"tok_embeddings.weight": torch.randn(args.vocab_size, args.dim, generator=g),
             "norm.weight": norm(), "output.weight": lin(args.vocab_size, args.dim),
             "rope.freqs": torch.zeros(hd // 2)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        state.update({
            p + "attention.wq.weight": lin(args.n_heads * hd, args.dim),
            p + "attention.wk.weight": lin(kv * hd, args.dim),
            p + "attention.wv.weight": lin(kv * hd, args.dim),
            p + "attention.wo.weight": lin(args.dim, args.n_heads * hd),
            p + "feed_forward.w1.weight": lin(hidden, args.dim),
            p + "feed_forward.w2.weight": lin(args.dim, hidden),
            p + "feed_forward.w3.weight": lin(hidden, args.dim),
            p + "attention_norm.weight": norm(),
            p + "ffn_norm.weight": norm(),
        })
    return {k: v.to(dtype) for k, v in state.items()}


def write_checkpoint(folder: Path, params: dict, state: dict, shards: int,
                     tokenizer_path=None) -> Path:
    """Save `state` the way Meta's downloads are laid out, split into `shards` files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params, indent=4))
    for r in range(shards):
        part = {}
        for k, v in state.items():
            d = split_dim(k)
            part[k] = v if d is None else v.chunk(shards, dim=d)[r].clone()
        torch.save(part, folder / f"consolidated.{r:02d}.pth")
    if tokenizer_path:
        shutil.copy(tokenizer_path, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="session")
def make_model(tmp_path_factory, tokenizer_path):
    """Factory: a random tiny checkpoint folder; returns (folder, ModelArgs, full state)."""
    cache = {}

    def make(shards=1, tokenizer=None, seed=0, **overrides):
        tok = tokenizer or tokenizer_path
        key = (shards, tok, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            params = {**TINY, **overrides}
            n_words = spm.SentencePieceProcessor(model_file=tok).vocab_size()
            args = ModelArgs(**params, vocab_size=n_words)
            state = random_state(args, seed)
            folder = write_checkpoint(tmp_path_factory.mktemp("ckpt"), params, state, shards, tok)
            cache[key] = (folder, args, state)
        return cache[key]

    return make


def build(folder, max_seq_len=64, max_batch_size=4, **kw):
    from llama import Llama
    return Llama.build(str(folder), max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                       device="cpu", **kw)


def replayed_decoder(model, baked: bool = False):
    """graphs.GraphedDecoder on the CPU, where it runs its fixed-shape steps without
    capturing them: keys, static inputs, padding, sampling settings and warm-up are those
    the CUDA graphs use. `baked`: sampling steps keep the settings of the first sampling
    call, as a graph with the settings compiled in would (a bug for checks to catch)."""
    import dataclasses

    from llama.graphs import GraphedDecoder

    class Baked(GraphedDecoder):
        first_sampling = None

        def __call__(self, tokens, positions, sampling):
            if not sampling.greedy:
                self.first_sampling = self.first_sampling or sampling
                sampling = dataclasses.replace(sampling,
                                               temperature=self.first_sampling.temperature,
                                               top_p=self.first_sampling.top_p)
            return super().__call__(tokens, positions, sampling)

    return (Baked if baked else GraphedDecoder)(model, capture=False)


def hf_model(args: ModelArgs, state: dict):
    """Hugging Face's LlamaForCausalLM with the same weights (float32, eager attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama.hf import hf_config, meta_to_hf
    config = LlamaConfig(**hf_config(args))
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(meta_to_hf(state, args), strict=True)
    return model


def run_torchrun(worker: Path, nproc: int, *args, timeout: int = 180):
    """Run `worker` under torchrun (gloo on CPU) with `nproc` processes; fail the test with
    the end of its output if it fails."""
    import os
    import subprocess
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--standalone", str(worker)] + [str(a) for a in args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="session")
def make_hf_model(tmp_path_factory, make_model):
    """Factory: the Hugging Face copy (llama.convert.to_hf) of a make_model checkpoint;
    returns (folder, ModelArgs, full Meta state)."""
    from llama.convert import to_hf
    cache = {}

    def make(max_shard_size="5GB", **kw):
        key = (max_shard_size, tuple(sorted(kw.items())))
        if key not in cache:
            meta, args, state = make_model(**kw)
            folder = tmp_path_factory.mktemp("hf") / "model"
            to_hf(meta, folder, max_shard_size=max_shard_size)
            cache[key] = (folder, args, state)
        return cache[key]

    return make
