"""Small benchmark files in the official formats, made here (no network, no ../shared)."""

import gzip
import json
from pathlib import Path
from typing import List

# Three HumanEval-style problems (prompt, canonical_solution, test, entry_point).
HUMANEVAL = [
    {
        "task_id": "Fixture/0",
        "prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b.\n    >>> add(2, 3)\n'
                  '    5\n    """\n',
        "canonical_solution": "    total = a + b\n    return total\n",
        "test": "\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n"
                "    assert candidate(-1, 1) == 0\n",
        "entry_point": "add",
    },
    {
        "task_id": "Fixture/1",
        "prompt": "from typing import List\n\n\ndef evens(xs: List[int]) -> List[int]:\n"
                  '    """The even numbers of xs, in order."""\n',
        "canonical_solution": "    out = []\n    for x in xs:\n        if x % 2 == 0:\n"
                              "            out.append(x)\n    return out\n",
        "test": "\n\ndef check(candidate):\n    assert candidate([1, 2, 3, 4]) == [2, 4]\n"
                "    assert candidate([]) == []\n",
        "entry_point": "evens",
    },
    {
        "task_id": "Fixture/2",
        "prompt": 'def shout(s: str) -> str:\n    """s in capitals, with "!" added."""\n',
        "canonical_solution": "    loud = s.upper()\n    return loud + '!'\n",
        "test": "\n\ndef check(candidate):\n    assert candidate('hi') == 'HI!'\n",
        "entry_point": "shout",
    },
]


def infilling_rows(problems=HUMANEVAL) -> List[dict]:
    """Single-line infilling tasks in human-eval-infilling's format: each line of each
    canonical solution is the middle once, the rest of the function prefix and suffix."""
    rows = []
    for p in problems:
        lines = p["canonical_solution"].splitlines(keepends=True)
        for i, line in enumerate(lines):
            rows.append({"task_id": f"SingleLineInfilling/{p['task_id']}/L{i}",
                         "entry_point": p["entry_point"],
                         "prompt": p["prompt"] + "".join(lines[:i]),
                         "suffix": "".join(lines[i + 1:]),
                         "canonical_solution": line, "test": p["test"]})
    return rows


def mbpp_rows() -> List[dict]:
    """Task ids 1-510 in mbpp.jsonl's format (the examples 2-4 and the 500 test problems):
    problem i asks for a function returning i * 3, solved with Windows line ends as in
    the real file."""
    return [{"task_id": i, "text": f"Write a function that returns {i} times 3.",
             "code": f"def times_{i}():\r\n    return {i} * 3",
             "test_list": [f"assert times_{i}() == {i * 3}", f"assert times_{i}() > {i}",
                           f"assert isinstance(times_{i}(), int)"],
             "test_setup_code": "", "challenge_test_list": []} for i in range(1, 511)]


def write_jsonl(path: Path, rows: List[dict]) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def broken(code: str) -> str:
    """The code with its first non-blank character replaced by '$', which Python never
    accepts outside strings and comments."""
    i = len(code) - len(code.lstrip())
    return code[:i] + "$" + code[i + 1:]


def samples(rows: List[dict], solution_key: str, transform=lambda c: c) -> List[dict]:
    return [{"task_id": r["task_id"], "completion": transform(r[solution_key])} for r in rows]
