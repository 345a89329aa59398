"""pass@k, the resumable results file, and the summary of a run."""

import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

KS = (1, 10, 100)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c pass (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), the chance that k samples drawn without replacement from the
    n include a passing one. Computed on exact integers."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


class ResultsFile:
    """A JSON-lines file with one line per scored sample ({"task_id", "completion",
    "passed", "result"}), appended to as samples are scored, so that a run stopped midway
    resumes where it was: `remaining` counts what each problem still needs.

    `fixed` holds the settings the samples depend on (model, sampling, data); they are kept
    beside the file (<name>.settings.json) and a resume with others is refused. Only the
    `writer` (rank 0) writes."""

    def __init__(self, path, fixed: Optional[dict] = None, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        self.check_settings(fixed or {})
        self.records: List[dict] = self.read() if self.path.exists() else []
        self.counts = Counter(r["task_id"] for r in self.records)

    def check_settings(self, fixed: dict) -> None:
        side = self.path.with_suffix(".settings.json")
        if self.path.exists() and side.exists():
            before = json.loads(side.read_text(encoding="utf-8"))
            changed = sorted(k for k in set(before) | set(fixed) if before.get(k) != fixed.get(k))
            if changed:
                diff = ", ".join(f"{k}: {before.get(k)!r} -> {fixed.get(k)!r}" for k in changed)
                raise ValueError(f"{self.path} holds results made with other settings ({diff}); "
                                 f"pass another --out, or delete it to start over")
        if self.writer:
            side.parent.mkdir(parents=True, exist_ok=True)
            side.write_text(json.dumps(fixed, indent=2) + "\n", encoding="utf-8")

    def read(self) -> List[dict]:
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            # A line cut short by a stopped run: drop it, that sample is run again.
            lines.pop()
            if self.writer:
                self.path.write_text("".join(lines), encoding="utf-8")
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except ValueError:
                raise ValueError(f"line {i + 1} of {self.path} is not JSON; pass another "
                                 f"--out or delete the file to start over") from None
        return records

    def remaining(self, task_id, n_samples: int) -> int:
        return max(0, n_samples - self.counts[task_id])

    def add(self, record: dict) -> None:
        self.records.append(record)
        self.counts[record["task_id"]] += 1
        if self.writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def summarize(records: Iterable[dict], task_ids: Sequence,
              n_samples: Optional[int] = None) -> Dict[str, object]:
    """pass@k averaged over `task_ids`, for each k of KS no larger than the samples per
    problem. With n_samples, each problem is scored on its first n_samples records and one
    with fewer is an error (the run is unfinished); without, on all of its records."""
    if not task_ids:
        raise ValueError("no problems to score")
    passed = defaultdict(list)
    for r in records:
        passed[r["task_id"]].append(bool(r["passed"]))
    wanted = n_samples or 1
    short = [t for t in task_ids if len(passed[t]) < wanted]
    if short:
        raise ValueError(f"{len(short)} problems have fewer than {wanted} scored samples "
                         f"(first: {short[0]!r}); run again to finish them")
    if n_samples:
        passed = {t: passed[t][:n_samples] for t in task_ids}
    counts = [len(passed[t]) for t in task_ids]
    summary: Dict[str, object] = {"problems": len(task_ids), "samples": sum(counts)}
    for k in KS:
        if k <= min(counts):
            scores = [pass_at_k(len(passed[t]), sum(passed[t]), k) for t in task_ids]
            summary[f"pass@{k}"] = sum(scores) / len(scores)
    return summary


def table(summary: dict, settings: dict) -> str:
    """The summary and settings as aligned text lines."""
    rows = []
    for k, v in [*summary.items(), *settings.items()]:
        # Nested ones (times, the sandbox's limits) a line each, as "time.wall_s".
        rows += [(f"{k}.{i}", x) for i, x in v.items()] if isinstance(v, dict) else [(k, v)]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {shown(k, v)}" for k, v in rows)


def shown(key: str, value) -> str:
    if key.startswith("pass@"):
        return f"{100 * value:.2f}%"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
