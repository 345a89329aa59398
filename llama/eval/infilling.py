"""HumanEval infilling (Bavarian et al. 2022): fill the middle of a HumanEval solution given
the code before (prompt) and after (suffix) it, with `text_infilling`."""

from pathlib import Path
from typing import List, Optional

from . import data
from .protocol import infilling_program as program  # noqa: F401  (the benchmark's test program)

REPO = "https://raw.githubusercontent.com/openai/human-eval-infilling/"
COMMIT = "88062ff9859c875d04db115b698ed4b0f0395170"
FIELDS = ("task_id", "entry_point", "prompt", "suffix", "canonical_solution", "test")

# task name -> (file in the repository's data/ folder, its SHA-256)
TASKS = {
    "single-line": ("HumanEval-SingleLineInfilling.jsonl.gz",
                    "1277073e7ddce163ef68598c2bca777f688a53df99422f097e37362090f88e1f"),
    "multi-line": ("HumanEval-MultiLineInfilling.jsonl.gz",
                   "2f341612eee1d35da1357a4f365e0c0b3ba6e2b62eb491e88aaefa4855af0349"),
    "random-span": ("HumanEval-RandomSpanInfilling.jsonl.gz",
                    "b4f330d8a8ff97bf85d9def497dffcae4d741e506449386a877236e422e33e8d"),
    "random-span-light": ("HumanEval-RandomSpanInfillingLight.jsonl.gz",
                          "1432250ecac0cb56e6f97f8faf0970419ef892a98fda7e1f5aa4c4b87209b760"),
}


def source(task: str) -> data.Source:
    if task not in TASKS:
        raise ValueError(f"unknown infilling task {task!r}; choose one of {', '.join(TASKS)}")
    filename, digest = TASKS[task]
    return data.Source(f"{REPO}{COMMIT}/data/{filename}", digest, filename)


def load(task: str, path: Optional[str] = None) -> List[dict]:
    """The task's problems, from `path` or the cached official file."""
    file = Path(path) if path else data.fetch(source(task))
    return data.check_rows(data.read_jsonl(file), FIELDS, file)


def complete(generator, problems: List[dict], settings: dict) -> List[str]:
    """The middles `text_infilling` fills in, in PSM or SPM layout."""
    results = generator.text_infilling(
        [p["prompt"] for p in problems], [p["suffix"] for p in problems],
        temperature=settings["temperature"], top_p=settings["top_p"],
        max_gen_len=settings["max_gen_len"], suffix_first=settings["format"] == "spm")
    return [r["generation"] for r in results]
