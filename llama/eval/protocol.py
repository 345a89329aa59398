"""The evaluation protocol of the Code Llama paper (Rozière et al. 2023), as code: how each
benchmark's prompt is made, where generation stops, how samples are drawn and how each
completion becomes the test program that decides pass or fail.

HumanEval (164 problems, 0-shot). The prompt is the problem's `prompt` field unchanged
(signature and docstring, ending in a newline), encoded with BOS, and continued by
`text_completion` (see `continue_prompts` for how the completion is cut out). Generation stops at the first of STOP_HUMANEVAL (a new top-level
statement: the function body is finished), which is left out, or after max_gen_len
tokens. The test program is prompt + completion + "\\n" + test + "\\n" + "check(<entry
point>)", as in OpenAI's human-eval.

HumanEval infilling (single-line, multi-line, random-span, random-span-light). The prefix
is the problem's `prompt`, the suffix its `suffix`; `text_infilling(prefixes, suffixes,
suffix_first=...)` lays them out exactly as the library's infilling API does (PSM:
<s><PRE> prefix <SUF>suffix <MID>; SPM with suffix_first=True: <s><PRE><SUF>suffix <MID>
prefix) and generates until <EOT> (no stop strings). The test program is prompt + middle +
suffix + "\\n" + test + "\\n" + "check(<entry point>)", as in OpenAI's human-eval-infilling.

MBPP (the 500 test problems, task ids 11-510, 3-shot). The prompt holds the problems with
task ids 2, 3 and 4 as worked examples, then the problem itself, each in the format of the
MBPP paper (Austin et al. 2021) and of the MBPP repository's README:

    You are an expert Python programmer, and here is your task: {text} Your code should
    pass these tests:\\n\\n{tests, one per line}\\n[BEGIN]\\n{code}\\n[DONE]

joined by "\\n"; the problem itself ends after "[BEGIN]\\n". The examples' code has its
"\\r\\n" line ends turned into "\\n". Generation stops at "[DONE]". The test program is
completion + "\\n" + test_setup_code + "\\n" + the three asserts of test_list.

Sampling. pass@1 is greedy decoding (temperature 0, one sample per problem). pass@10 and
pass@100 draw n samples per problem (the paper: 200) at temperature 0.8, top-p 0.95, and
use the unbiased estimator 1 - C(n-c, k) / C(n, k) averaged over problems (c: samples
that pass). Each test program runs in the sandbox of execution.py with a 3-second limit.
"""

from typing import List

STOP_HUMANEVAL = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```"]
STOP_MBPP = ["[DONE]"]
MBPP_SHOT_IDS = (2, 3, 4)
MBPP_TEST_IDS = range(11, 511)
MBPP_TEMPLATE = ("You are an expert Python programmer, and here is your task: {text} "
                 "Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")
MBPP_SHOT_END = "\n[DONE]"


def continue_prompts(generator, prompts: List[str], settings: dict, stop: List[str]
                     ) -> List[str]:
    """The text each prompt is continued with. Taken from the echoed text (prompt and
    continuation decoded together) past the decoded prompt: decoding the new tokens alone,
    as text_completion does without echo (and Meta's reference), drops the leading space of
    the first token (SentencePiece strips it), which breaks the first line's indentation."""
    results = generator.text_completion(
        prompts, temperature=settings["temperature"], top_p=settings["top_p"],
        max_gen_len=settings["max_gen_len"], stop=stop, echo=True)
    tok = generator.tokenizer
    return [r["generation"][len(tok.decode(tok.encode(p, bos=True, eos=False))):]
            for p, r in zip(prompts, results)]


def humaneval_program(problem: dict, completion: str) -> str:
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})")


def infilling_program(problem: dict, middle: str) -> str:
    return (problem["prompt"] + middle + problem["suffix"] + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})")


def mbpp_task(problem: dict) -> str:
    return MBPP_TEMPLATE.format(text=problem["text"], tests="\n".join(problem["test_list"]))


def mbpp_prompt(shots: List[dict], problem: dict) -> str:
    examples = [mbpp_task(s) + s["code"].replace("\r\n", "\n") + MBPP_SHOT_END for s in shots]
    return "\n".join(examples + [mbpp_task(problem)])


def mbpp_program(problem: dict, completion: str) -> str:
    return "\n".join([completion, problem["test_setup_code"]] + list(problem["test_list"]))
