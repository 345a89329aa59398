"""One evaluation run: load the problems, generate what the results file still lacks (all
ranks together under torchrun), score each completion in the sandbox as soon as it is made
(rank 0), then write and print the summary (rank 0).
"""

import datetime
import importlib
import json
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import List, Optional

from tqdm import tqdm

from .. import cli
from . import data, execution, perplexity, scoring
from .protocol import STOP_HUMANEVAL, STOP_MBPP

# What a results file's samples depend on: resuming it with other values would mix runs.
FIXED = ("benchmark", "task", "format", "ckpt_dir", "quantize", "temperature", "top_p",
         "max_gen_len", "max_seq_len", "samples", "data", "files", "pattern")
STOPS = {"humaneval": STOP_HUMANEVAL, "mbpp": STOP_MBPP, "infilling": []}


def run_name(args) -> str:
    if args.benchmark == "infilling":
        return f"infilling-{args.task}-{args.format}"
    return args.benchmark


def results_path(args) -> Path:
    if args.out:
        return Path(args.out)
    if getattr(args, "samples", None):
        return Path(f"{args.samples}_results.jsonl")
    return Path("eval-results") / f"{run_name(args)}.jsonl"


def is_writer() -> bool:
    import torch.distributed as dist
    return not dist.is_initialized() or dist.get_rank() == 0


def shared(value):
    """Rank 0's `value` on every rank (all ranks must run the same prompts)."""
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def build_generator(args):
    """Llama.build with the run's options, and its draft for speculative decoding."""
    from llama import Llama
    build = dict(max_seq_len=args.max_seq_len, max_batch_size=args.batch_size,
                 seed=args.seed, quantize=args.quantize)
    generator = Llama.build(args.ckpt_dir, **build)
    draft = getattr(args, "draft", None)
    if draft is not None:
        if draft not in ("lookup", "int4"):
            draft = Llama.build(draft, **build)
        generator.configure(draft=draft, draft_tokens=args.draft_tokens)
    return generator


def load_problems(args) -> List[dict]:
    bench = importlib.import_module(f"llama.eval.{args.benchmark}")
    if args.benchmark == "infilling":
        problems = bench.load(args.task, args.data)
    else:
        problems = bench.load(args.data)
    return problems[: args.limit] if args.limit else problems


def drain(pending: set, results: scoring.ResultsFile, bar, block: bool) -> set:
    """Record the finished scoring jobs (all of them if `block`); return the rest."""
    while pending:
        done, pending = wait(pending, timeout=None if block else 0,
                             return_when=FIRST_COMPLETED)
        for future in done:
            results.add(future.result())
            bar.update(1)
        if not block:
            break
    return pending


def score_one(program, problem: dict, completion: str, limits, extra: dict) -> dict:
    outcome = execution.run_program(program(problem, completion), limits)
    return dict(task_id=problem["task_id"], completion=completion, passed=outcome.passed,
                result=outcome.result, **extra)


def generate_and_score(args, generator, problems, results, limits) -> dict:
    """Generate the missing samples and score them while the next batch generates;
    returns where this run's time went (generation, tests, waiting for the last tests)."""
    bench = importlib.import_module(f"llama.eval.{args.benchmark}")
    settings = vars(args)
    todo = shared([i for i, p in enumerate(problems)
                   for _ in range(results.remaining(p["task_id"], args.n_samples))])
    check_prompt_lengths(args, generator, [problems[i] for i in sorted(set(todo))])
    bar = tqdm(total=len(todo), desc=run_name(args), disable=not results.writer)
    clock = {"generating_s": 0.0, "generated_tokens": 0, "tests_s": 0.0}
    lock = threading.Lock()

    def count(tokens, seconds, first):
        clock["generated_tokens"] += tokens
    cli.watch_speed(generator, count)

    def timed_score(*job):
        start = time.perf_counter()
        record = score_one(*job)
        with lock:
            clock["tests_s"] += time.perf_counter() - start
        return record

    run_start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.workers or os.cpu_count()) as pool:
        pending = set()
        for start in range(0, len(todo), args.batch_size):
            batch = [problems[i] for i in todo[start:start + args.batch_size]]
            began = time.perf_counter()
            completions = bench.complete(generator, batch, settings)
            clock["generating_s"] += time.perf_counter() - began
            if results.writer:
                pending |= {pool.submit(timed_score, bench.program, p, c, limits, {})
                            for p, c in zip(batch, completions)}
                pending = drain(pending, results, bar, block=False)
        began = time.perf_counter()
        drain(pending, results, bar, block=True)
        clock["waiting_for_tests_s"] = time.perf_counter() - began
    bar.close()
    clock["wall_s"] = time.perf_counter() - run_start
    clock["tokens_per_s"] = clock["generated_tokens"] / max(clock["generating_s"], 1e-9)
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in clock.items()}


def check_prompt_lengths(args, generator, problems: List[dict]) -> None:
    """Refuse before generating anything, not at the first batch whose prompt does not fit
    (some MBPP prompts run to thousands of tokens)."""
    if args.benchmark == "infilling":  # prefix and suffix: text_infilling checks its own
        return
    tok = generator.tokenizer
    lengths = {p["task_id"]: len(tok.encode(p["prompt"], bos=True, eos=False)) for p in problems}
    task, longest = max(lengths.items(), key=lambda item: item[1], default=(None, 0))
    if longest + 1 > args.max_seq_len:
        raise ValueError(f"the prompt of {task} is {longest} tokens, which leaves no room to "
                         f"generate in --max_seq_len {args.max_seq_len}; rerun with "
                         f"--max_seq_len {longest + args.max_gen_len} or more")


def score_samples(args, problems, results, limits) -> List[str]:
    """Score the --samples file (resuming by line number); returns the task ids it covers."""
    bench = importlib.import_module(f"llama.eval.{args.benchmark}")
    by_id = data.by_id(problems)
    samples = data.check_rows(data.read_jsonl(args.samples), ("task_id", "completion"),
                              args.samples)
    unknown = sorted({s["task_id"] for s in samples} - set(by_id), key=str)
    if unknown:
        raise ValueError(f"{args.samples} has samples of {len(unknown)} task ids that are not "
                         f"problems of this run (first: {unknown[0]!r}); check --task, "
                         f"--data and --limit")
    done = {r["sample"] for r in results.records}
    todo = [(i, s) for i, s in enumerate(samples) if i not in done]
    bar = tqdm(total=len(todo), desc=f"scoring {args.samples}")
    with ThreadPoolExecutor(max_workers=args.workers or os.cpu_count()) as pool:
        pending = {pool.submit(score_one, bench.program, by_id[s["task_id"]], s["completion"],
                               limits, {"sample": i}) for i, s in todo}
        drain(pending, results, bar, block=True)
    bar.close()
    covered = {s["task_id"] for s in samples}
    return [p["task_id"] for p in problems if p["task_id"] in covered]


def run_perplexity(args, generator, results) -> List[str]:
    """Score the files the results file lacks; returns the keys of all files of the run."""
    folder = Path(args.files)
    keys = [str(f.relative_to(folder)) for f in perplexity.source_files(folder, args.pattern)]
    keys = keys[: args.limit] if args.limit else keys
    todo = shared([k for k in keys if not results.counts[k]])
    bar = tqdm(total=len(todo), desc="perplexity", disable=not results.writer)
    parts = {}  # file key -> [nll, tokens, windows scored]
    batch = []

    def flush():
        for (key, n_parts, size, _), (nll, count) in zip(
                batch, perplexity.score_windows(generator, [w for *_, w in batch])):
            acc = parts.setdefault(key, [0.0, 0, 0])
            acc[0], acc[1], acc[2] = acc[0] + nll, acc[1] + count, acc[2] + 1
            if acc[2] == n_parts:
                results.add({"task_id": key, "nll": acc[0], "tokens": acc[1], "bytes": size})
                bar.update(1)
        batch.clear()

    for item in perplexity.file_windows(generator, {k: folder / k for k in todo},
                                        args.max_seq_len):
        batch.append(item)
        if len(batch) == args.batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    return keys


GENERATION_ONLY = ("max_seq_len", "batch_size", "quantize", "draft", "draft_tokens", "seed",
                   "n_samples",
                   "temperature", "top_p", "max_gen_len")


def settings_of(args, problems: Optional[List[dict]], limits) -> dict:
    settings = {k: v for k, v in vars(args).items() if v is not None}
    if getattr(args, "samples", None):  # nothing was generated: no generation settings
        settings = {k: v for k, v in settings.items() if k not in GENERATION_ONLY}
    if getattr(args, "data", None):
        settings["data_sha256"] = data.sha256_of(Path(args.data))
    if problems is not None:
        if not getattr(args, "samples", None):
            settings["stop"] = STOPS[args.benchmark]
        settings["problems_in_benchmark"] = len(problems)
        settings["sandbox"] = dict(vars(limits), **execution.probe(limits))
    settings["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    return settings


def evaluate(args, path: Path, fixed: dict):
    """(summary, settings), or None on ranks other than 0."""
    if args.benchmark == "perplexity":
        generator = build_generator(args)
        results = scoring.ResultsFile(path, fixed, writer=is_writer())
        keys = run_perplexity(args, generator, results)
        if not results.writer:
            return None
        wanted = set(keys)
        records = [r for r in results.records if r["task_id"] in wanted]
        return perplexity.summarize(records), settings_of(args, None, None)
    problems = load_problems(args)
    limits = execution.Limits(timeout=args.timeout, memory_mb=args.memory_mb,
                              site_packages=args.site_packages)
    if args.samples:
        results = scoring.ResultsFile(path, fixed)
        task_ids = score_samples(args, problems, results, limits)
        summary = scoring.summarize(results.records, task_ids)
        summary["problems_covered"] = f"{len(task_ids)} of {len(problems)}"
    else:
        generator = build_generator(args)
        results = scoring.ResultsFile(path, fixed, writer=is_writer())
        clock = generate_and_score(args, generator, problems, results, limits)
        if not results.writer:
            return None
        summary = scoring.summarize(results.records, [p["task_id"] for p in problems],
                                    args.n_samples)
        summary["time"] = clock  # of this run: a resumed run's earlier part is not in it
    return summary, settings_of(args, problems, limits)


def main(args) -> int:
    path = results_path(args)
    fixed = {k: getattr(args, k) for k in FIXED if getattr(args, k, None) is not None}
    outcome = evaluate(args, path, fixed)
    if outcome is None:
        return 0
    summary, settings = outcome
    summary_path = path.with_suffix(".summary.json")
    summary_path.write_text(json.dumps({"summary": summary, "settings": settings}, indent=2)
                            + "\n", encoding="utf-8")
    print(scoring.table(summary, settings))
    print(f"results: {path}\nsummary: {summary_path}")
    return 0
