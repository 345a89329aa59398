"""pass@k, the resumable results file and the summary (llama/eval/scoring.py)."""

import json
from fractions import Fraction
from math import comb

import pytest

from llama.eval.scoring import ResultsFile, pass_at_k, summarize


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 0, 1, 0.0), (5, 5, 1, 1.0), (5, 2, 1, 0.4),
    (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (5, 1, 5, 1.0),  # every draw of 5 includes the one that passes
    (4, 1, 3, 0.75),  # 1 - C(3,3)/C(4,3) = 1 - 1/4
    (200, 1, 100, 0.5),  # 1 - C(199,100)/C(200,100) = 1 - 100/200
    (10, 3, 10, 1.0), (10, 0, 10, 0.0),
])
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_the_chance_a_random_draw_holds_a_pass():
    """Against enumeration: the fraction of the C(n, k) draws that hold a passing sample."""
    from itertools import combinations
    for n in range(1, 8):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                draws = list(combinations(outcomes, k))
                exact = Fraction(sum(any(d) for d in draws), len(draws))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)
                assert len(draws) == comb(n, k)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 6), (5, 2, 0)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(n, c, k)


def records(passes: dict) -> list:
    return [{"task_id": t, "passed": p} for t, ps in passes.items() for p in ps]


def test_summary_averages_over_problems():
    data = records({"a": [True] * 10, "b": [False] * 10, "c": [True] + [False] * 9})
    summary = summarize(data, ["a", "b", "c"], n_samples=10)
    assert summary["problems"] == 3 and summary["samples"] == 30
    assert summary["pass@1"] == pytest.approx((1 + 0 + 0.1) / 3)
    assert summary["pass@10"] == pytest.approx((1 + 0 + 1) / 3)
    assert "pass@100" not in summary  # needs 100 samples per problem


def test_summary_takes_the_first_n_samples_and_refuses_unfinished_runs():
    data = records({"a": [True, False, False], "b": [False]})
    assert summarize(data, ["a"], n_samples=1)["pass@1"] == 1.0
    with pytest.raises(ValueError, match="fewer than 2 scored samples"):
        summarize(data, ["a", "b"], n_samples=2)
    with pytest.raises(ValueError, match="no problems"):
        summarize(data, [])
    # Without n_samples (scoring a samples file), each problem counts all of its samples.
    assert summarize(data, ["a", "b"])["pass@1"] == pytest.approx((1 / 3 + 0) / 2)


def test_results_file_resumes(tmp_path):
    path = tmp_path / "r.jsonl"
    first = ResultsFile(path, {"temperature": 0.0})
    first.add({"task_id": "a", "passed": True})
    first.add({"task_id": "a", "passed": False})
    with open(path, "a") as f:
        f.write('{"task_id": "b", "pas')  # a line cut short by a stopped run
    again = ResultsFile(path, {"temperature": 0.0})
    assert again.remaining("a", 3) == 1 and again.remaining("b", 3) == 3
    assert again.remaining("a", 2) == 0
    assert path.read_text().endswith("false}\n")  # the cut line is gone
    again.add({"task_id": "b", "passed": True})
    assert [json.loads(x)["task_id"] for x in path.read_text().splitlines()] == ["a", "a", "b"]


def test_results_file_refuses_other_settings(tmp_path):
    path = tmp_path / "r.jsonl"
    ResultsFile(path, {"temperature": 0.0, "ckpt_dir": "m"}).add({"task_id": "a", "passed": 1})
    with pytest.raises(ValueError, match=r"temperature: 0.0 -> 0.8.*another --out"):
        ResultsFile(path, {"temperature": 0.8, "ckpt_dir": "m"})


def test_results_file_refuses_garbage(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="line 1 .* is not JSON"):
        ResultsFile(path)


def test_the_printed_table_has_a_line_per_value():
    from llama.eval.scoring import table
    text = table({"pass@1": 0.5, "time": {"wall_s": 12.345678, "tests_s": 2.0}},
                 {"temperature": 0.8, "sandbox": {"memory_mb": 4096}})
    assert text.splitlines() == [
        f"{k:<17}  {v}" for k, v in [("pass@1", "50.00%"), ("time.wall_s", "12.35"),
                                      ("time.tests_s", "2"), ("temperature", "0.8"),
                                      ("sandbox.memory_mb", "4096")]]
