"""Peak host memory per rank while Llama.build loads a checkpoint on CPU.

Writes a random bf16 checkpoint with a 7B-like layout but fewer, narrower layers (dim 2048,
16 layers, 16 heads, FFN 5632, vocab 32016: about 1.9 GB) as one Meta shard, as two
(llama.convert reshard) and as a Hugging Face folder (llama.convert to_hf), then loads
each with Llama.build(device="cpu", dtype=torch.bfloat16) in a fresh process at MP=1 and
under torchrun (gloo) at MP=2, and prints, per rank, the peak resident memory (VmHWM of
/proc/self/status) right after loading and after one forward pass, which touches every
weight. Resident memory counts the pages of memory-mapped files a process has read;
"anon" is the part that is not file-backed (copies made while loading).

    python benchmarks/load_memory.py --work_dir /tmp/load_memory
    python benchmarks/load_memory.py --device cuda --mp 1   # host memory of a GPU load

Linux only (reads /proc/self/status). On CUDA the baseline is taken before CUDA starts,
so the peaks include the CUDA context's host memory.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = dict(dim=2048, n_layers=16, n_heads=16, multiple_of=256, ffn_dim_multiplier=1.0,
              norm_eps=1e-5, rope_theta=1000000)
# Code Llama 7B/13B's extra pieces (ids 32000-32015), appended to Llama 2's tokenizer.
CODELLAMA_PIECES = ["▁<SU", "▁<SUF", "▁<PRE", "▁<M", "▁<MID", "▁<E", "▁<EOT", "▁<PRE>",
                    "▁<SUF>", "▁<MID>", "▁<EOT>"] + ["▁" + "<EOT>" * n for n in range(2, 7)]
GB = 10**9


def status() -> dict:
    """VmHWM (peak), VmRSS, RssAnon and RssFile of this process, in bytes."""
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+) kB", text).group(1)) * 1024
            for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}


# ---- writing the checkpoints --------------------------------------------------------------

def write_tokenizer(path: Path) -> None:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    proto = sp_pb2.ModelProto()
    proto.ParseFromString((ROOT / "tests" / "data" / "llama2-tokenizer.model").read_bytes())
    for piece in CODELLAMA_PIECES:
        new = proto.pieces.add()
        new.piece, new.score = piece, 0.0
    path.write_bytes(proto.SerializeToString())


def write_one_shard(folder: Path) -> None:
    """Random bf16 weights, one tensor at a time, in Meta's layout (rope.freqs included)."""
    import torch

    from llama.model import ModelArgs
    folder.mkdir(parents=True)
    write_tokenizer(folder / "tokenizer.model")
    args = ModelArgs(**LAYOUT, vocab_size=32016)
    g = torch.Generator().manual_seed(0)
    hd, hidden = args.head_dim, args.ffn_hidden_dim

    def rand(*shape):
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)

    state = {"tok_embeddings.weight": rand(args.vocab_size, args.dim),
             "norm.weight": torch.ones(args.dim, dtype=torch.bfloat16),
             "output.weight": rand(args.vocab_size, args.dim),
             "rope.freqs": torch.zeros(hd // 2, dtype=torch.bfloat16)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        state.update({p + "attention.wq.weight": rand(args.dim, args.dim),
                      p + "attention.wk.weight": rand(args.dim, args.dim),
                      p + "attention.wv.weight": rand(args.dim, args.dim),
                      p + "attention.wo.weight": rand(args.dim, args.dim),
                      p + "feed_forward.w1.weight": rand(hidden, args.dim),
                      p + "feed_forward.w2.weight": rand(args.dim, hidden),
                      p + "feed_forward.w3.weight": rand(hidden, args.dim),
                      p + "attention_norm.weight": torch.ones(args.dim, dtype=torch.bfloat16),
                      p + "ffn_norm.weight": torch.ones(args.dim, dtype=torch.bfloat16)})
    torch.save(state, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(LAYOUT))


def write_checkpoints(work: Path) -> dict:
    from llama import convert
    folders = {"meta, 1 shard": work / "mp1", "meta, 2 shards": work / "mp2",
               "hf, 1 file": work / "hf"}
    if not folders["meta, 1 shard"].is_dir():
        write_one_shard(folders["meta, 1 shard"])
    if not folders["meta, 2 shards"].is_dir():
        convert.reshard(folders["meta, 1 shard"], folders["meta, 2 shards"], mp=2)
    if not folders["hf, 1 file"].is_dir():
        convert.to_hf(folders["meta, 1 shard"], folders["hf, 1 file"])
    return folders


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir()
               if f.suffix in (".pth", ".safetensors"))


# ---- measuring, in a fresh process per case (one per rank under torchrun) -----------------

def measure(folder: str, out_dir: str, device: str) -> None:
    import torch

    from llama import Llama
    before = status()
    start = time.time()
    gen = Llama.build(folder, max_seq_len=64, max_batch_size=1, device=device,
                      dtype=torch.bfloat16)
    seconds = time.time() - start
    after_build = status()
    gen.model.forward(torch.arange(1, 9, device=device)[None], 0)  # reads every weight once
    after_forward = status()
    rank = int(os.environ.get("RANK", 0))
    own = sum(p.numel() * p.element_size() for p in gen.model.parameters())
    result = dict(rank=rank, rank_weights=own, baseline=before["VmRSS"], seconds=seconds,
                  peak_build=after_build["VmHWM"], peak_forward=after_forward["VmHWM"],
                  anon=after_forward["RssAnon"], file=after_forward["RssFile"])
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


def child_env() -> dict:
    return {**os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def run_case(folder: Path, mp: int, out: Path, device: str) -> list:
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("rank*.json"):
        f.unlink()
    env = {**child_env(), "OMP_NUM_THREADS": "1"}
    me = [str(Path(__file__).resolve()), "--measure", str(folder), "--out", str(out),
          "--device", device]
    launch = [sys.executable] if mp == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(mp),
        "--standalone"]
    proc = subprocess.run(launch + me, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"loading {folder} at MP={mp} failed:\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(mp)]


def idle_baseline() -> int:
    code = ("import re, pathlib, torch, llama; print(re.search(r'VmHWM:\\s+(\\d+)', "
            "pathlib.Path('/proc/self/status').read_text()).group(1))")
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), check=True,
                         capture_output=True, text=True).stdout
    return int(out.strip()) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", default="/tmp/load_memory")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (one GPU a rank)")
    parser.add_argument("--mp", type=int, nargs="+", default=[1, 2],
                        help="model-parallel sizes to measure")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.measure:
        return measure(opts.measure, opts.out, opts.device)
    sys.path.insert(0, str(ROOT))
    work = Path(opts.work_dir)
    folders = write_checkpoints(work)
    idle = idle_baseline()
    print(f"idle python + torch + llama: peak RSS {idle / GB:.2f} GB")
    print(f"{'checkpoint':<16}{'size GB':>8}{'MP':>4}{'rank':>5}{'weights GB':>11}"
          f"{'baseline':>9}{'peak load':>10}{'peak fwd':>9}{'anon':>6}{'file':>6}{'load s':>7}")
    for name, folder in folders.items():
        for mp in opts.mp:
            for r in run_case(folder, mp, work / "results", opts.device):
                print(f"{name:<16}{weight_bytes(folder) / GB:>8.2f}{mp:>4}{r['rank']:>5}"
                      f"{r['rank_weights'] / GB:>11.2f}{r['baseline'] / GB:>9.2f}"
                      f"{r['peak_build'] / GB:>10.2f}{r['peak_forward'] / GB:>9.2f}"
                      f"{r['anon'] / GB:>6.2f}{r['file'] / GB:>6.2f}{r['seconds']:>7.1f}")


if __name__ == "__main__":
    main()
