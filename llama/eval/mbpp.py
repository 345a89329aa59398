"""MBPP (Austin et al. 2021): the 500 test problems (task ids 11-510), 3-shot with the
problems 2, 3 and 4 as examples (protocol.py has the template), with `text_completion`."""

from pathlib import Path
from typing import List, Optional

from . import data
from .protocol import MBPP_SHOT_IDS, MBPP_TEST_IDS, STOP_MBPP, continue_prompts, mbpp_prompt
from .protocol import mbpp_program as program  # noqa: F401  (the benchmark's test program)

# The MBPP repository's file at a fixed commit: 974 rows, 563,537 bytes. Later revisions of
# the file differ (tasks 341, 596 and 642 were rewritten, 341 being a test problem), so a
# copy taken from another commit is refused by the digest rather than scored silently.
COMMIT = "2251e8c67a7fe7d6348714967ee101080b28e956"
SOURCE = data.Source("https://raw.githubusercontent.com/google-research/google-research/"
                     f"{COMMIT}/mbpp/mbpp.jsonl",
                     "0b7004a79cd62d9ec7ecdd5a6e5f0ef1210ff00b286df3c5d5b57bf38c58e19a",
                     "mbpp.jsonl")
FIELDS = ("task_id", "text", "code", "test_list", "test_setup_code")


def load(path: Optional[str] = None) -> List[dict]:
    """The 500 test problems, each with its 3-shot prompt in "prompt". The file must hold
    the examples (ids 2-4) and every test problem: an excerpt is refused."""
    file = Path(path) if path else data.fetch(SOURCE)
    rows = data.by_id(data.check_rows(data.read_jsonl(file), FIELDS, file))
    missing = [i for i in list(MBPP_SHOT_IDS) + list(MBPP_TEST_IDS) if i not in rows]
    if missing:
        raise ValueError(f"{file} lacks MBPP task ids {missing[:5]}{'...' if len(missing) > 5 else ''}"
                         f" ({len(missing)} in all): use the full mbpp.jsonl")
    shots = [rows[i] for i in MBPP_SHOT_IDS]
    return [dict(rows[i], task_id=f"MBPP/{i}", prompt=mbpp_prompt(shots, rows[i]))
            for i in MBPP_TEST_IDS]


def complete(generator, problems: List[dict], settings: dict) -> List[str]:
    return continue_prompts(generator, [p["prompt"] for p in problems], settings, STOP_MBPP)
