"""Generation: equal to a greedy loop over Hugging Face's model, real logprobs, ragged
batches, seeded sampling, stop rules, and every input error."""

import numpy as np
import pytest
import torch

from conftest import build, hf_model, replayed_decoder
from llama.sampling import Sampling
from llama import Llama


@pytest.fixture(scope="module")
def tiny(make_model):
    folder, args, state = make_model()
    return build(folder, max_seq_len=48), args, state


def hf_greedy(model, prompt, n):
    """Greedy continuation and the log-probability of each chosen token, no KV cache."""
    ids, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)
            ids.append(int(logp.argmax()))
            lps.append(float(logp.max()))
    return ids[len(prompt):], lps


def test_greedy_tokens_and_logprobs_match_transformers(tiny):
    gen, args, state = tiny
    prompts = [[1, 5, 9, 200, 17], [1, 300, 2, 40]]
    tokens, logprobs = gen.generate(prompts, max_gen_len=12, temperature=0, logprobs=True,
                                    stop_token=-100)  # no stop: compare all 12 tokens
    ref = hf_model(args, state)
    for p, t, lp in zip(prompts, tokens, logprobs):
        want_t, want_lp = hf_greedy(ref, p, 12)
        assert t == want_t
        assert lp == pytest.approx(want_lp, abs=1e-4)
        assert all(x < 0 for x in lp)  # the reference reported 0.0 for every generated token


def test_echo_logprobs_are_teacher_forced_logprobs(tiny):
    gen, args, state = tiny
    prompt = [1, 5, 9, 200, 17, 33]
    tokens, logprobs = gen.generate([prompt], max_gen_len=4, temperature=0, logprobs=True,
                                    echo=True, stop_token=-100)
    assert tokens[0][:6] == prompt and len(tokens[0]) == 10
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(args, state)(torch.tensor([tokens[0]])).logits[0], -1)
    want = [0.0] + [float(logp[i, tokens[0][i + 1]]) for i in range(9)]
    assert logprobs[0] == pytest.approx(want, abs=1e-4)
    # Nothing generated: the prompt is still scored (the reference returned zeros).
    tokens, logprobs = gen.generate([prompt], max_gen_len=0, logprobs=True, echo=True)
    assert tokens == [prompt] and logprobs[0] == pytest.approx(want[:6], abs=1e-4)


def test_ragged_batch_equals_each_prompt_alone(tiny):
    gen, _, _ = tiny
    prompts = ["def add(a, b):", "import os\nimport sys\n\nclass Config:\n    ", "x"]
    batch = gen.text_completion(prompts, temperature=0, max_gen_len=10, logprobs=True)
    for prompt, got in zip(prompts, batch):
        alone = gen.text_completion([prompt], temperature=0, max_gen_len=10, logprobs=True)[0]
        assert got["tokens"] == alone["tokens"] and got["generation"] == alone["generation"]
        assert got["logprobs"] == pytest.approx(alone["logprobs"], abs=1e-5)


def test_budget_is_bounded_by_max_seq_len(tiny):
    gen, _, _ = tiny
    prompt = list(range(3, 43))  # 40 tokens with max_seq_len 48: at most 8 more
    tokens, _ = gen.generate([prompt, [1, 2]], max_gen_len=100, temperature=0, stop_token=-100)
    assert len(tokens[0]) == 8 and len(tokens[1]) == 46


def test_echo_without_logprobs_and_prompts_that_fill_the_cache(tiny):
    gen, _, _ = tiny
    tokens, logprobs = gen.generate([[1, 5, 9]], max_gen_len=4, temperature=0, echo=True,
                                    stop_token=-100)
    assert logprobs is None and tokens[0][:3] == [1, 5, 9] and len(tokens[0]) == 7
    full = list(range(3, 51))  # exactly max_seq_len=48 tokens: nothing left to generate
    tokens, _ = gen.generate([full, [1, 2]], max_gen_len=5, temperature=0, stop_token=-100)
    assert tokens[0] == [] and len(tokens[1]) == 5
    alone, _ = gen.generate([[1, 2]], max_gen_len=5, temperature=0, stop_token=-100)
    assert tokens[1] == alone[0]


def test_empty_batches(tiny):
    gen, _, _ = tiny
    assert gen.text_completion([]) == []
    assert gen.text_infilling([], []) == []
    assert gen.chat_completion([]) == []
    assert gen.generate([], max_gen_len=4) == ([], None)


def test_seeded_sampling_is_reproducible(make_model):
    folder, _, _ = make_model()
    prompts = ["def f(x):", "class A"]
    runs = [build(folder, seed=s).text_completion(prompts, temperature=1.0, top_p=0.95,
                                                   max_gen_len=16) for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_top_p_keeps_the_nucleus():
    from llama import sample_top_p  # noqa: F401
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).repeat(2000, 1)
    draws = sample_top_p(probs, 0.7).flatten()
    assert set(draws.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail is cut
    assert sample_top_p(probs[:1], 0.0).item() == 0  # the top token is always kept


class ScriptedOutput(torch.nn.Module):
    """Stands in for the output projection: each call makes the next scripted token win."""

    def __init__(self, vocab_size, script):
        super().__init__()
        self.vocab_size, self.script, self.calls = vocab_size, list(script), 0

    def forward(self, h):
        logits = torch.zeros(*h.shape[:-1], self.vocab_size)
        logits[..., self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        self.calls += 1
        return logits


def scripted(gen, script):
    gen.model.output = ScriptedOutput(gen.model.vocab_size, script)
    return gen


@pytest.mark.parametrize("stop", ["eot_id", "eos_id"])
def test_infilling_stops_at_eot_and_eos(make_model, stop):
    folder, _, _ = make_model()
    gen = build(folder)
    tok = gen.tokenizer
    a, b = tok.encode_infilling("x = 1")[:2]
    scripted(gen, [a, b, getattr(tok, stop), a, a])
    out = gen.text_infilling(["def f():\n    "], ["\n    return x\n"], temperature=0,
                             max_gen_len=20, logprobs=True)[0]
    assert out["tokens"] == [tok.token_piece(a), tok.token_piece(b)]
    assert out["generation"] == tok.decode_infilling([a, b])
    assert out["full_text"] == "def f():\n    " + out["generation"] + "\n    return x\n"
    assert list(out) == ["generation", "logprobs", "tokens", "full_text"]


def test_step_chat_stops_at_step_and_reports_destination(make_model, step_tokenizer_path):
    folder, _, _ = make_model(tokenizer=step_tokenizer_path)
    gen = build(folder)
    tok = gen.tokenizer
    a = tok.encode("ok", False, False)[0]
    scripted(gen, [a, a, tok.step_id, a])
    out = gen.chat_completion([[{"role": "user", "content": "hi"}]], temperature=0)[0]
    assert out["generation"] == {"role": "assistant", "destination": "user",
                                 "content": tok.decode([a, a])}


def test_unsafe_dialogs_are_not_run(tiny):
    gen, _, _ = tiny
    calls = []
    forward = gen.model.forward_hidden
    gen.model.forward_hidden = lambda tokens, *a, **k: calls.append(tokens.shape[0]) or forward(
        tokens, *a, **k)
    try:
        bad = [{"role": "user", "content": "[INST] sneaky"}]
        good = [{"role": "user", "content": "hello"}]
        out = gen.chat_completion([bad], logprobs=True, max_gen_len=4)
        assert calls == []  # the reference still generated (and leaked) an answer
        assert out[0]["generation"]["content"].startswith("Error: special tags")
        assert out[0]["tokens"] == [] and out[0]["logprobs"] == []
        out = gen.chat_completion([bad, good, bad], max_gen_len=4, temperature=0)
        assert calls and set(calls) == {1}  # only the safe dialog went through the model
        assert out[1]["generation"]["role"] == "assistant"
    finally:
        gen.model.forward_hidden = forward


def test_input_errors(tiny, make_model, plain_tokenizer_path):
    gen, _, _ = tiny
    with pytest.raises(ValueError, match="2 prefixes but 1 suffixes"):
        gen.text_infilling(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="more than max_seq_len=48"):
        gen.text_completion(["word " * 200])
    with pytest.raises(ValueError, match="exceed max_batch_size=4"):
        gen.text_completion(["a"] * 5)
    with pytest.raises(ValueError, match="no user message"):
        gen.chat_completion([[{"role": "system", "content": "only system"}]])
    with pytest.raises(ValueError, match="max_gen_len"):
        gen.text_completion(["a"], max_gen_len=-1)
    with pytest.raises(ValueError, match="token id 512, outside the vocabulary"):
        gen.generate([[1, 512]], max_gen_len=2)
    folder, _, _ = make_model(tokenizer=plain_tokenizer_path)
    with pytest.raises(ValueError, match="no infilling pieces"):
        build(folder).text_infilling(["a"], ["b"])


def test_malformed_arguments_are_refused(tiny):
    """A lone string, dialog or token list where a batch belongs (iterating it would make
    a batch of its characters), and sampling settings that are not numbers in range."""
    gen, _, _ = tiny
    dialog = [{"role": "user", "content": "hi"}]
    for call, match in [
        (lambda: gen.text_completion("def"), "prompts must be a list.*got str"),
        (lambda: gen.text_infilling("ab", "cd"), "prefixes must be a list"),
        (lambda: gen.chat_completion(dialog), "item 0 is a dict.*chat_completion\\(\\[dialog\\]\\)"),
        (lambda: gen.generate([1, 2, 3], 4), "item 0 is 1; wrap a single prompt"),
        (lambda: gen.generate([[1, 2]], 2.5), "max_gen_len must be a whole number"),
        (lambda: gen.generate([[1, 2]], True), "max_gen_len must be a whole number"),
        (lambda: gen.generate([[1, 2]], 3, top_p=-1.0), "top_p must be a number in \\[0, 1\\]"),
        (lambda: gen.generate([[1, 2]], 3, top_p=float("nan")), "top_p"),
        (lambda: gen.generate([[1, 2]], 3, temperature=float("nan")), "temperature must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
    # Other sequences and number types are fine: numpy, tensors, tuples, generators.
    want = gen.generate([[1, 2]], 3, temperature=0)
    assert gen.generate(torch.tensor([[1, 2]]), np.int64(3), temperature=torch.tensor(0.0),
                        top_p=np.float32(0.5)) == want
    assert gen.generate((np.array([1, 2]),), 3, temperature=0) == want
    assert gen.generate([[1, 2]], 3, temperature=-2.5) == want  # any temperature <= 0
    assert Sampling(temperature=-2.5).temperature == 0.0 and Sampling(temperature=-1).greedy
    texts = gen.text_completion(["def", "class"], temperature=0, max_gen_len=3)
    assert gen.text_completion((p for p in np.array(["def", "class"])), temperature=0,
                               max_gen_len=3) == texts
    assert gen.text_completion(("def", "class"), temperature=0, max_gen_len=3) == texts


def test_a_paused_stream_blocks_other_generation(tiny):
    """An unfinished stream's row lives in the KV cache: another call in between would
    overwrite it, so it is refused until the stream ends or is closed."""
    gen, _, _ = tiny
    want = "".join(gen.stream_completion("def f(x):", temperature=0, max_gen_len=12))
    stream = gen.stream_completion("def f(x):", temperature=0, max_gen_len=12)
    got = next(stream)
    with pytest.raises(RuntimeError, match="still in the middle of another generation"):
        gen.text_completion(["class A:"], temperature=0, max_gen_len=4)
    got += "".join(stream)
    assert got == want
    gen.text_completion(["class A:"], temperature=0, max_gen_len=4)  # finished: allowed
    stream = gen.stream_completion("def f(x):", temperature=0, max_gen_len=12)
    next(stream)
    stream.close()
    gen.text_completion(["class A:"], temperature=0, max_gen_len=4)  # closed: allowed


def test_no_bare_asserts_guard_user_input():
    import ast
    import pathlib
    import llama
    for path in pathlib.Path(llama.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        asserts = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Assert)]
        assert not asserts, f"{path.name} uses assert at lines {asserts}"


def test_llama_is_exported():
    import llama
    for name in ["Llama", "Transformer", "ModelArgs", "Tokenizer", "Dialog"]:
        assert hasattr(llama, name)
    assert Llama.build.__kwdefaults__ == {"seed": 1, "device": None, "dtype": None,
                                          "quantize": None}


def test_graphed_decoder_bookkeeping_on_cpu(make_model):
    """Greedy and sampled generation through GraphedDecoder's keys, static inputs and
    padded batches (the steps CUDA graphs capture, run directly here) give the plain
    path's tokens; one sampling step serves two sampling settings; batches of 3 and 4
    prompts share one graph; a call that captures draws what a call that replays would
    (the same seed, the same tokens). (A padded batch samples other tokens than the
    plain path: its padding rows draw random numbers too; so sampling is compared on
    batches that need no padding.)"""
    from llama.graphs import batch_bucket
    folder, _, _ = make_model()
    plain, graphed = build(folder), build(folder)  # max_batch_size 4
    graphed.engine.decoder = replayed_decoder(graphed.model)
    prompts = [[1, 5, 9, 3], [1, 7], [1, 2, 3, 4, 5, 6], [1, 8, 8]]

    def run(gen, batch, temperature, top_p):
        torch.manual_seed(7)
        return gen.generate(prompts[:batch], max_gen_len=10, temperature=temperature,
                            top_p=top_p, logprobs=True, stop_token=-1)

    for batch, temperature, top_p in ((3, 0.0, 1.0), (4, 0.0, 1.0), (4, 0.8, 0.9),
                                      (4, 1.5, 0.97), (2, 0.8, 0.9), (2, 0.0, 1.0),
                                      (3, 0.0, 1.0)):
        want = run(plain, batch, temperature, top_p)
        got = run(graphed, batch, temperature, top_p)
        assert got[0] == want[0]
        for w, g in zip(want[1], got[1]):
            assert g == pytest.approx(w, abs=1e-4)
    graphs = graphed.engine.decoder.graphs
    assert sorted(graphs) == [(2, False), (2, True), (4, False), (4, True)]
    # The last batch (3 rows, after one of 4) left its padding row at position 0.
    _, (static_tokens, static_positions, _), _ = graphs[(4, False)]
    assert static_positions[3].item() == 0 and static_positions[:3].min().item() > 0
    assert [batch_bucket(n, 32) for n in (1, 2, 3, 5, 8, 9, 17, 32)] == [
        1, 2, 4, 8, 8, 16, 32, 32]
    assert batch_bucket(5, 6) == 6 and batch_bucket(3, 3) == 3


def test_chunked_prefill_and_fixed_shape_steps_give_the_plain_tokens(make_model):
    """Chunked prefill and fixed-shape steps over the whole cache with a mask (what the
    GPU runs) produce the plain path's greedy tokens and logprobs."""
    folder, _, _ = make_model()
    plain, fast = build(folder), build(folder)
    fast.configure(prefill_chunk=4)
    fast.engine.decoder = replayed_decoder(fast.model)
    prompts = ["def add(a, b):", "import os\nimport sys\n\nclass Config:\n    ", "x"]
    args = dict(temperature=0, max_gen_len=12, logprobs=True, echo=True)
    want, got = plain.text_completion(prompts, **args), fast.text_completion(prompts, **args)
    for w, g in zip(want, got):
        assert g["tokens"] == w["tokens"]
        assert g["logprobs"] == pytest.approx(w["logprobs"], abs=1e-4)


def test_compiled_mode(make_model):
    """configure(decode="compiled") compiles each prompt's first prefill chunk (dynamic
    shapes: one graph for every length, no graph break) and the fixed-shape decode step
    (one graph per batch bucket and kind); answers equal the eager ones."""
    import torch._dynamo
    folder, _, _ = make_model()
    plain, fast = build(folder), build(folder)
    fast.configure(decode="compiled", prefill_chunk=8)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    args = dict(temperature=0, max_gen_len=6, logprobs=True, echo=True)
    # Batches whose longest prompts differ in length; the first takes two chunks.
    for prompts in (["def add(a, b):\n    return a + b", "x = 1"], ["import os\n", "y"]):
        want = plain.text_completion(prompts, **args)
        got = fast.text_completion(prompts, **args)
        for w, g in zip(want, got):
            assert g["tokens"] == w["tokens"]
            assert g["logprobs"] == pytest.approx(w["logprobs"], abs=1e-4)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # prefill, step


def test_compiled_steps_keep_their_own_inductor_settings(make_model):
    """compile_step binds its inductor settings to the function it returns: a second one
    with other settings compiles decode_step anew (it would otherwise reuse the first's
    code, since torch.compile caches per Python function), one with the first's settings
    again reuses the first's code, and all give the eager step's tokens and logprobs.
    Unknown settings are refused by name."""
    import torch._dynamo
    from llama.graphs import compile_step
    from llama.sampling import decode_step
    folder, _, _ = make_model()
    gen = build(folder)
    model, whole = gen.model, gen.model.params.max_seq_len
    tokens, positions = torch.tensor([5]), torch.tensor([0])
    with torch.inference_mode(False), torch.no_grad():
        want = decode_step(model, tokens, positions, whole, 0.0, 1.0)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        for settings in ({}, {"coordinate_descent_tuning": False}, {}):
            got = compile_step(settings)(model, tokens, positions, whole, 0.0, 1.0)
            assert got[0].tolist() == want[0].tolist()
            assert got[1].tolist() == pytest.approx(want[1].tolist(), abs=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    with pytest.raises(ValueError, match="no setting triton.enable_pdll"):
        compile_step({"triton.enable_pdll": True})


def test_compiled_steps_compile_past_dynamos_default_limit(make_model):
    """Each batch bucket, greedy or sampling, compiles decode_step once more; dynamo's
    default of 8 per function would run the ninth uncompiled. Nine different cache
    lengths force nine compilations here, each equal to the eager step."""
    import torch._dynamo
    from llama.graphs import compile_step
    from llama.sampling import decode_step
    folder, _, _ = make_model()
    model = build(folder).model
    tokens, positions = torch.tensor([5]), torch.tensor([0])
    step = compile_step()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.inference_mode(False), torch.no_grad():
        for kv_len in range(1, 10):
            want = decode_step(model, tokens, positions, kv_len, 0.0, 1.0)
            got = step(model, tokens, positions, kv_len, 0.0, 1.0)
            assert got[1].tolist() == pytest.approx(want[1].tolist(), abs=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 9
    assert torch._dynamo.config.recompile_limit == 8  # only while compiling steps


def test_one_compiled_step_serves_every_sampling_setting(make_model):
    """Sampling settings given as tensors (as the CUDA graphs give them) are inputs of a
    compiled step, not constants compiled into it: three settings, one compilation. Its
    draws equal the eager step's with the settings as numbers (fallback_random: inductor
    draws with eager's random generator)."""
    import torch._dynamo
    from llama.graphs import compile_step
    from llama.sampling import decode_step
    folder, _, _ = make_model()
    model = build(folder).model
    whole = model.params.max_seq_len
    tokens, positions = torch.arange(3, 7), torch.zeros(4, dtype=torch.long)
    compiled = compile_step({"fallback_random": True})
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    drawn = []
    with torch.inference_mode(False), torch.no_grad():
        for temperature, top_p in ((0.8, 0.95), (3.0, 1.0), (0.3, 0.5)):
            torch.manual_seed(3)
            want = decode_step(model, tokens, positions, whole, temperature, top_p)
            torch.manual_seed(3)
            got = compiled(model, tokens, positions, whole, torch.tensor(temperature),
                           torch.tensor(top_p))
            assert got[0].tolist() == want[0].tolist()
            assert got[1].tolist() == pytest.approx(want[1].tolist(), abs=1e-5)
            drawn.append(want[0].tolist())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert drawn[0] != drawn[1] != drawn[2]  # the settings matter: a baked-in one would fail


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_launching_ahead_changes_no_token(make_model, temperature):
    """Launching ahead, as on CUDA: from the second step on, each
    step is launched before the previous step's tokens are read. The rows are those of one
    step at a time: rows that end on a stop token, on the caller's stop rule, at their
    budget and at the end of the cache; no step writes past the cache; and the next step
    is under way whenever a token after the first is handed out."""
    folder, _, _ = make_model()
    prompts = [list(range(3, 47)), [1, 2], [5, 6, 7], [9]]  # 44 of 48 positions: 4 tokens

    def run(ahead, stop_ids, stop_after=None):
        gen = build(folder, max_seq_len=48)
        gen.engine.launch_ahead = ahead
        launched, rows, real_step = [], [[] for _ in prompts], gen.engine.decoder

        def step(tokens, positions, sampling):
            assert max(positions) < 48, positions  # never past the cache
            launched.append(list(positions))
            return real_step(tokens, positions, sampling)

        def on_token(row, token, logprob):  # the caller's stop rule (like stop strings)
            return len(rows[row]) + 1 == (stop_after or {}).get(row)

        gen.engine.decoder = step
        counts = []  # steps launched when each step's tokens were handed out
        sampling = Sampling(temperature, 0.9, 12, stop_ids)
        for out in gen.engine.generate(prompts, sampling, on_token=on_token):
            counts.append(len(launched))
            for row, got in zip(rows, out):
                if got is not None:
                    row.append(got)
        return rows, counts

    free, free_counts = run(False, set())
    assert [len(r) for r in free] == [4, 12, 12, 12]
    free_ahead, free_ahead_counts = run(True, set())
    assert free_ahead == free
    # Every row ends at its budget: no step is launched for the token after the last.
    assert free_ahead_counts == [0] + [n + 1 for n in free_counts[1:-1]] + free_counts[-1:]
    stop = free[3][7][0]  # row 3 ends on this token (other rows may meet it sooner)
    rules = {1: 5, 2: 9}  # rows 1 and 2 end by the caller's rule (or the token, sooner)
    want, counts = run(False, {stop}, rules)
    assert want[0] == free[0] and max(len(want[1]), len(want[2]), len(want[3])) <= 9
    assert counts == list(range(len(counts)))  # one step at a time
    got, ahead_counts = run(True, {stop}, rules)
    assert [[t for t, _ in r] for r in got] == [[t for t, _ in r] for r in want]
    for g, w in zip(got, want):
        assert [lp for _, lp in g] == pytest.approx([lp for _, lp in w], abs=1e-5)
    # The next step is launched before each token after the first is handed out; the
    # last row ends by a stop rule, which wastes exactly the one step launched ahead.
    assert ahead_counts == [0] + [n + 1 for n in counts[1:]]
