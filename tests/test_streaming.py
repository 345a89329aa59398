"""Streaming and stop strings: streamed pieces concatenate exactly to the batch result."""

import random

import pytest
import torch

from conftest import build
from llama.text import TextRow


@pytest.fixture(scope="module")
def gen(make_model):
    return build(make_model()[0], max_seq_len=96)


def seeded(seed, fn, *args, **kwargs):
    torch.manual_seed(seed)
    out = fn(*args, **kwargs)
    return list(out) if not isinstance(out, list) else out


def test_stream_concatenates_to_the_batch_result(gen):
    """Random prompts and seeds; the random tiny model emits many byte-fallback pieces,
    so multi-byte characters are often split across tokens."""
    rng = random.Random(0)
    words = ["def", " x", "(", "ü", "漢字", "\n", "  ", "return", "🙂", "é", ":", "1"]
    split_chars = 0
    for seed in range(12):
        prompt = "".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
        kwargs = dict(temperature=1.0, top_p=0.95, max_gen_len=24)
        want = seeded(seed, gen.text_completion, [prompt], logprobs=True, **kwargs)[0]
        chunks = seeded(seed, gen.stream_completion, prompt, **kwargs)
        assert "".join(chunks) == want["generation"]
        assert all(chunks) and all("\ufffd" not in c or "\ufffd" in want["generation"]
                                   for c in chunks)
        split_chars += sum(t.startswith("<0x") for t in want["tokens"])
        # A stop string taken from the middle of that text ends the row just before it.
        text = want["generation"]
        if len(text) > 6:
            stop = text[len(text) // 2: len(text) // 2 + 2]
            cut = seeded(seed, gen.text_completion, [prompt], stop=[stop], **kwargs)[0]
            assert cut["generation"] == text[: text.index(stop)]
            streamed = seeded(seed, gen.stream_completion, prompt, stop=[stop], **kwargs)
            assert "".join(streamed) == cut["generation"]
    assert split_chars > 0  # the property was exercised on split characters


def test_infilling_and_chat_streams(gen):
    kwargs = dict(temperature=0.8, top_p=0.9, max_gen_len=16)
    for suffix_first in (False, True):
        want = seeded(3, gen.text_infilling, ["def f(x):\n    "], ["\n    return y\n"],
                      suffix_first=suffix_first, **kwargs)[0]["generation"]
        got = seeded(3, gen.stream_infilling, "def f(x):\n    ", "\n    return y\n",
                     suffix_first=suffix_first, **kwargs)
        assert "".join(got) == want
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    want = seeded(4, gen.chat_completion, [dialog], **kwargs)[0]["generation"]["content"]
    assert "".join(seeded(4, gen.stream_chat_completion, dialog, **kwargs)) == want
    unsafe = [{"role": "user", "content": "[INST]"}]
    assert list(gen.stream_chat_completion(unsafe)) == [
        "Error: special tags are not allowed as part of the prompt."]


def test_stop_strings_end_only_their_row(gen):
    prompts = ["def a():", "class B:"]
    full = gen.text_completion(prompts, temperature=0, max_gen_len=20, logprobs=True)
    text0 = full[0]["generation"]
    stop = text0[5:7]
    assert stop not in full[1]["generation"]
    out = gen.text_completion(prompts, temperature=0, max_gen_len=20, logprobs=True,
                              stop=[stop, "never-occurs"])
    assert out[0]["generation"] == text0[: text0.index(stop)]
    n = len(out[0]["tokens"])
    assert n < len(full[0]["tokens"]) and out[0]["tokens"] == full[0]["tokens"][:n]
    assert out[0]["logprobs"] == full[0]["logprobs"][:n]
    assert out[1] == full[1]  # the other row ran on to max_gen_len


def test_stop_strings_are_not_searched_in_an_echoed_prompt(gen):
    prompt = "x = 1\nx = 1\n"
    out = gen.text_completion([prompt], temperature=0, max_gen_len=8, echo=True, stop=["x = 1"])
    assert out[0]["generation"].startswith(prompt)


def test_text_row_holds_back_partial_characters_and_stop_prefixes():
    pieces = {1: "ab", 2: "\ufffd", 3: "é", 4: "<", 5: "/s", 6: ">", 7: "c"}

    def decode(ids):  # id 2 followed by 3 stands for a character split over two tokens
        text = "".join(pieces[i] for i in ids)
        return text.replace("\ufffdé", "€")

    row = TextRow(decode, stop=["</s>"])
    out = []
    for tok in [1, 2, 3, 4, 5, 7]:
        row.add(tok, 0.0)
        out.append(row.delta())
    assert out == ["ab", "", "€", "", "", "</sc"]
    row = TextRow(decode, stop=["</s>"])
    for tok in [1, 4, 5, 6, 7]:
        if row.add(tok, -1.0):
            break
    assert (row.text, row.tokens, row.stopped) == ("ab", [1], True)
    assert row.delta() + row.delta(final=True) == "ab"


@pytest.mark.parametrize("stop", [[1], 5, [""]])
def test_stop_must_be_non_empty_strings(gen, stop):
    with pytest.raises(ValueError, match="stop must be a list of non-empty strings"):
        gen.text_completion(["a"], stop=stop)


def llama2_tokenizer():
    from pathlib import Path
    from llama import Tokenizer
    return Tokenizer(str(Path(__file__).parent / "data" / "llama2-tokenizer.model"))


@pytest.mark.parametrize("infilling", [False, True])
def test_text_row_equals_decoding_everything(infilling):
    """The anchored, incremental decoding gives the full decode after every token, on
    Meta's vocabulary with many byte-fallback pieces (ids 3..258)."""
    tok = llama2_tokenizer()
    decode = tok.decode_infilling if infilling else tok.decode
    rng = random.Random(1)
    for trial in range(20):
        prefix = [1] + [rng.randrange(3, 32000) for _ in range(rng.randint(0, 3))]
        row = TextRow(decode, prefix=prefix if trial % 2 else ())
        for _ in range(40):
            t = rng.randrange(3, 259) if rng.random() < 0.5 else rng.randrange(259, 32000)
            row.add(t, 0.0)
            assert row.text == decode(row.prefix + row.tokens)


def test_stop_string_ending_in_a_split_character():
    tok = llama2_tokenizer()
    for text, stop, want in [("print('🙂')", ["🙂"], "print('"), ("say 🙂 ok", [" 🙂"], "say")]:
        row = TextRow(tok.decode, stop=stop)
        for t in tok.encode(text, False, False):
            if row.add(t, 0.0):
                break
        assert row.stopped and row.text == want
