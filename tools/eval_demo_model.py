"""Measure the demo model on the held-out standard-library files, through the library only
(llama.Llama.build, the model's forward pass, Llama.text_infilling).

Held-out files: the "test" split of tools/train_demo_model.py (2% of the corpus files:
the standard library's non-test .py files and, for the full model, those of the
permissively licensed packages in site-packages, chosen by the SHA-256 of the file's
key), read from the Python running this script. The split is by path, so a held-out file
stays unseen in training whatever the machine; the texts, and so the numbers, change
with the Python version and the installed packages (the JSON records the files and a
fingerprint). The published numbers were measured right after training, on the training
machine.

(a) Perplexity: every held-out file is encoded as in training's plain documents,
    tokenizer.encode(text, bos=True, eos=True), files in path order are concatenated and
    cut into non-overlapping windows of --max_seq_len tokens. Each window is one forward
    pass from position 0; every token but a window's first is scored. Reported:
    perplexity = exp(mean negative log-likelihood per scored token), the mean NLL in nats,
    and bits per character (NLL in bits over all characters, scaled up by
    tokens/scored tokens for the unscored window starts).

(b) Single-line infilling, exact match: from every function (ast.FunctionDef and
    AsyncFunctionDef, nested ones included) of the held-out files the candidate lines are
    the non-blank, non-comment lines of its body after the docstring, at most 200
    characters long. --n_infill (200) functions are drawn with random.Random(--seed) and
    one candidate line of each (if there are fewer functions, further lines of the same
    functions are drawn, never the same line twice). For a masked line L (its text
    including its indentation and its newline):
        prefix = the lines before L (ending in "\\n", so L's indentation is part of the
                 answer), as many whole lines as fit 3/4 of the prompt budget;
        suffix = the lines after L, as many whole lines as fit the rest;
        prompt budget = --max_seq_len - --max_gen_len tokens (the prompt layout is
                 llama.prompts.infilling_prompt_tokens; PSM unless --formats says spm too).
    The middle is generated greedily (temperature 0) with Llama.text_infilling, up to
    --max_gen_len (64) tokens, stopping at <EOT> or EOS. Training taught the model that a
    one-line middle is the line followed by "\\n" and then <EOT>.
      exact_match      generation.rstrip() == L.rstrip(): the same indentation and code,
                       trailing whitespace and newlines ignored; a generation of more than
                       one non-blank line does not match.
      first_line_match the first line of the generation, rstripped, equals L.rstrip().
      stopped          the model ended its middle with <EOT>/EOS within max_gen_len.

(c) Copying: 32 random sequences of 64 ordinary pieces, each shown twice; the share of
    greedy next-token predictions in the second copy that are right (copying() says more).

    PYTHONPATH=. python tools/eval_demo_model.py --model_dir models/CodeLlama-demo \
        --out out/eval_demo_model.json
"""

import argparse
import ast
import hashlib
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from llama import Llama  # noqa: E402
from llama.prompts import infilling_prompt_tokens  # noqa: E402
from train_demo_model import FULL, TINY, list_corpus, stdlib_root, write_json  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- (a) perplexity ------------------------------------------------------------------
@torch.inference_mode()
def perplexity(llama: Llama, files, max_seq_len: int, batch_size: int) -> dict:
    tok, model = llama.tokenizer, llama.model
    device = model.rope.device
    stream = []
    for _, text in files:
        stream += tok.encode(text, bos=True, eos=True)
    windows = [stream[i:i + max_seq_len] for i in range(0, len(stream), max_seq_len)]
    windows = [w for w in windows if len(w) > 1]
    full = [w for w in windows if len(w) == max_seq_len]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[w] for w in windows if len(w) < max_seq_len]
    nll, scored = 0.0, 0
    for group in groups:
        x = torch.tensor(group, device=device)
        logits = model.forward(x, 0)
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(),
                               reduction="sum").item()
        scored += x[:, 1:].numel()
    chars = sum(len(text) for _, text in files)
    mean = nll / scored
    return dict(perplexity=math.exp(mean), nll_per_token=mean, scored_tokens=scored,
                tokens=len(stream), windows=len(windows), characters=chars,
                bits_per_character=mean / math.log(2) * len(stream) / chars)


# ---- (c) copying ---------------------------------------------------------------------
@torch.inference_mode()
def copying(llama: Llama, n: int, length: int, seed: int) -> dict:
    """In-context copying, the skill infilling leans on (find where the prefix ends, carry
    on from there): n random sequences of `length` ordinary pieces, each shown twice after
    <s>; the score is how often the greedy next token in the second copy is the right one
    (a model that cannot copy scores about 1/vocab)."""
    tok, model = llama.tokenizer, llama.model
    device = model.rope.device
    sp = tok.sp_model
    ordinary = [i for i in range(tok.n_words) if not (sp.is_control(i) or sp.is_unknown(i)
                or sp.is_byte(i) or sp.is_unused(i) or i in tok.control_ids)]
    gen = torch.Generator().manual_seed(seed)
    picks = torch.tensor(ordinary)[torch.randint(len(ordinary), (n, length), generator=gen)]
    x = torch.cat([torch.full((n, 1), tok.bos_id), picks, picks], dim=1).to(device)
    batch = model.params.max_batch_size
    pred = torch.cat([model.forward(x[i:i + batch], 0).argmax(-1) for i in range(0, n, batch)])
    # Position length + k (k >= 1) holds the k-th token of the second copy and predicts
    # the (k+1)-th, which is picks[:, k].
    hits = (pred[:, length + 1:2 * length] == x[:, length + 2:]).float()
    return dict(n=n, length=length, accuracy=hits.mean().item())


# ---- (b) single-line infilling -------------------------------------------------------
def candidate_functions(files):
    """[(relative path, function line, [0-based candidate line indices])] in path order."""
    found = []
    for rel, text in files:
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            first = body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                if len(body) == 1:
                    continue
                start = first.end_lineno + 1
            else:
                start = first.lineno
            cands = [i for i in range(start - 1, min(node.end_lineno, len(lines)))
                     if lines[i].strip() and not lines[i].lstrip().startswith("#")
                     and len(lines[i]) <= 200]
            if cands:
                found.append((rel, node.lineno, cands))
    found.sort(key=lambda f: (f[0], f[1]))
    return found


def pick_lines(functions, n: int, seed: int):
    """n (relative path, line index) pairs: one line from each of n functions drawn with
    random.Random(seed); further rounds over the same functions if there are fewer."""
    rng = random.Random(seed)
    order = list(functions)
    rng.shuffle(order)
    picks, seen = [], set()
    while len(picks) < n:
        added = False
        for rel, _, cands in order:
            free = [i for i in cands if (rel, i) not in seen]
            if not free:
                continue
            i = rng.choice(free)
            seen.add((rel, i))
            picks.append((rel, i))
            added = True
            if len(picks) == n:
                break
        if not added:
            break
    return picks


def build_task(tok, lines, i: int, budget: int):
    """(prefix, suffix) around line i: whole lines, 3/4 of the budget for the prefix, the
    rest for the suffix, shrunk until the prompt fits `budget` tokens. None if it cannot."""
    room = budget - 4  # <s> <PRE> <SUF> <MID>
    pre_room = room * 3 // 4
    start, used = i, 1  # 1: the dummy-prefix piece of the prefix
    while start > 0:
        n = len(tok.encode_infilling(lines[start - 1]))
        if used + n > pre_room:
            break
        used += n
        start -= 1
    end = i + 1
    while end < len(lines):
        n = len(tok.encode_infilling(lines[end]))
        if used + n > room:
            break
        used += n
        end += 1
    while True:
        prefix, suffix = "".join(lines[start:i]), "".join(lines[i + 1:end])
        try:
            prompt = infilling_prompt_tokens(tok, prefix, suffix)
        except ValueError:  # the context holds text that encodes to a control token
            return None
        if len(prompt) <= budget:
            return prefix, suffix
        if end > i + 1:
            end -= 1
        elif start < i:
            start += 1
        else:
            return None


def infilling(llama: Llama, files, n: int, seed: int, max_seq_len: int, max_gen_len: int,
              batch_size: int, formats, n_examples: int) -> dict:
    tok = llama.tokenizer
    texts = dict(files)
    functions = candidate_functions(files)
    tasks = []
    for rel, i in pick_lines(functions, 4 * n, seed):  # spares for unusable contexts
        lines = texts[rel].splitlines(keepends=True)
        ctx = build_task(tok, lines, i, max_seq_len - max_gen_len)
        if ctx is not None:
            tasks.append(dict(file=rel, line=i + 1, prefix=ctx[0], suffix=ctx[1],
                              target=lines[i]))
        if len(tasks) == n:
            break
    results = dict(functions=len(functions), n=len(tasks))
    for fmt in formats:
        em = first = stopped = gen_tokens = 0
        examples = []
        t0 = time.time()
        for b in range(0, len(tasks), batch_size):
            batch = tasks[b:b + batch_size]
            outs = llama.text_infilling([t["prefix"] for t in batch],
                                        [t["suffix"] for t in batch], temperature=0.0,
                                        max_gen_len=max_gen_len, logprobs=True,
                                        suffix_first=fmt == "spm")
            for t, out in zip(batch, outs):
                gen, want = out["generation"], t["target"].rstrip()
                ok = gen.rstrip() == want
                em += ok
                first += gen.split("\n")[0].rstrip() == want
                stopped += len(out["tokens"]) < max_gen_len
                gen_tokens += len(out["tokens"])
                if len(examples) < n_examples:
                    examples.append(dict(file=t["file"], line=t["line"], target=t["target"],
                                         generation=gen, exact_match=ok))
        k = max(1, len(tasks))
        results[fmt] = dict(exact_match=em / k, first_line_match=first / k,
                            stopped=stopped / k, mean_generated_tokens=gen_tokens / k,
                            seconds=round(time.time() - t0, 1), examples=examples)
        log(f"infilling {fmt.upper()}: exact match {em}/{len(tasks)} = {em / k:.1%}, "
            f"first line {first / k:.1%}, stopped {stopped / k:.1%}")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", default="models/CodeLlama-demo")
    p.add_argument("--out", default="out/eval_demo_model.json", help="results JSON")
    p.add_argument("--device", default=None, help="cuda, cpu, mps (default: the library's)")
    p.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"],
                   help="default: the library's (bf16 on CUDA, float32 on CPU)")
    p.add_argument("--max_seq_len", type=int, default=None,
                   help="context: windows and prompt budget (default 1024, --tiny 256)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--n_infill", type=int, default=None, help="default 200, --tiny 8")
    p.add_argument("--max_gen_len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--formats", default="psm", help="comma-separated: psm, spm")
    p.add_argument("--examples", type=int, default=5, help="examples kept in the JSON")
    p.add_argument("--tiny", action="store_true",
                   help="the --tiny split of train_demo_model.py, 3 files, 8 infills")
    opts = p.parse_args(argv)
    t0 = time.time()
    cfg = TINY if opts.tiny else FULL
    max_seq_len = opts.max_seq_len or cfg["ctx"]
    n_infill = opts.n_infill if opts.n_infill is not None else (8 if opts.tiny else 200)
    formats = [f.strip().lower() for f in opts.formats.split(",") if f.strip()]
    if not set(formats) <= {"psm", "spm"}:
        raise SystemExit(f"--formats takes psm and/or spm, got {opts.formats!r}")
    files = list_corpus(cfg)[0]["test"]
    if opts.tiny:
        files = files[:3]
    dtype = getattr(torch, opts.dtype) if opts.dtype else None
    llama = Llama.build(opts.model_dir, max_seq_len=max_seq_len,
                        max_batch_size=opts.batch_size, device=opts.device, dtype=dtype)
    device = llama.model.rope.device
    model_dtype = next(llama.model.parameters()).dtype
    log(f"model {opts.model_dir} on {device} ({model_dtype}); {len(files)} held-out files "
        f"from Python {platform.python_version()} stdlib")
    checklist = Path(opts.model_dir) / "checklist.chk"
    ppl = perplexity(llama, files, max_seq_len, max(1, opts.batch_size // 2))
    log(f"perplexity {ppl['perplexity']:.3f} ({ppl['nll_per_token']:.4f} nats/token, "
        f"{ppl['bits_per_character']:.4f} bits/char) over {ppl['scored_tokens']} tokens")
    copy = copying(llama, 32, min(64, (max_seq_len - 1) // 2), opts.seed)
    log(f"copying: {copy['accuracy']:.1%} of next tokens right in the second copy of "
        f"{copy['n']} random {copy['length']}-token sequences")
    fill = infilling(llama, files, n_infill, opts.seed, max_seq_len, opts.max_gen_len,
                     opts.batch_size, formats, opts.examples)
    result = dict(
        model_dir=str(opts.model_dir),
        checklist=checklist.read_text() if checklist.is_file() else None,
        device=str(device), dtype=str(model_dtype), max_seq_len=max_seq_len,
        python_version=platform.python_version(), stdlib=str(stdlib_root()),
        held_out_files=[rel for rel, _ in files],
        held_out_fingerprint=hashlib.sha256(
            "".join(rel + "\0" + text for rel, text in files).encode()).hexdigest(),
        perplexity=ppl, copying=copy,
        infilling=dict(fill, seed=opts.seed, max_gen_len=opts.max_gen_len,
                       definition="exact_match: greedy middle .rstrip() == masked line "
                                  ".rstrip() (indentation included); prefix ends with the "
                                  "newline before the line"),
        torch=torch.__version__, seconds=round(time.time() - t0, 1),
    )
    if opts.out:
        out = Path(opts.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, result)
        log(f"wrote {out}")
    summary = {"perplexity": round(ppl["perplexity"], 4),
               "bits_per_character": round(ppl["bits_per_character"], 4),
               "copying": round(copy["accuracy"], 4),
               **{f"infill_{f}_exact_match": round(fill[f]["exact_match"], 4) for f in formats},
               "infill_n": fill["n"], "seconds": result["seconds"]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
