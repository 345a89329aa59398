"""Speculative decoding (llama/speculative.py, drafting.py, chunk_steps.py): greedy output
equal to plain decoding for every API, with a draft model, the same checkpoint as draft,
prompt lookup and an oracle that is right for a varying number of tokens; sampling keeps
the target's distribution; bad drafts are refused; MP=2 ranks agree."""

import contextlib
import re
from pathlib import Path

import pytest
import torch

import conftest
from conftest import build
from llama import drafting, lookup_rounds, speculative
from llama.chunk_steps import GraphedChunks
from llama.sampling import Sampling
from llama.speculative import accept_greedy, accept_sampled, nucleus

PROMPTS = ["def fib(n):", "import re\nimport os\nimport re\n", "x = 1"]
WORKER = Path(__file__).with_name("speculative_worker.py")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a busy machine: more threads only add overhead."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def target(make_model):
    return build(make_model()[0], max_seq_len=48)


@pytest.fixture(scope="module")
def drafts(make_model):
    """A draft with other weights and one with the target's own weights."""
    return {"model": build(make_model(seed=1)[0], max_seq_len=48),
            "self": build(make_model()[0], max_seq_len=48)}


@contextlib.contextmanager
def drafting_with(gen, draft, k=3, fixed_shapes=False):
    """gen configured with `draft`; with fixed_shapes, the verify and draft steps run
    GraphedChunks' fixed-shape path (what CUDA graphs capture), without capturing."""
    gen.configure(draft=draft, draft_tokens=k)
    spec = gen.engine.speculation
    if fixed_shapes:
        spec.runner = GraphedChunks(gen.model, capture=False)
        spec.made_for = gen.engine.decoder
        if isinstance(spec.drafter, drafting.ModelDrafter):
            d = spec.drafter
            d.runner, d.made_for = GraphedChunks(d.model, capture=False), d.engine.decoder
    try:
        yield spec
    finally:
        gen.configure(draft=None)


def every_api(gen) -> dict:
    """Greedy results of each public API, covering ragged batches, logprobs, echo, cache
    ends, stop strings and streaming."""
    g = dict(temperature=0)
    return {
        "completion": gen.text_completion(PROMPTS, max_gen_len=40, logprobs=True, **g),
        "echo": gen.text_completion(PROMPTS[:2], max_gen_len=8, logprobs=True, echo=True,
                                    **g),
        # No max_gen_len: every row runs to the end of the 48-position cache.
        "to_cache_end": gen.text_completion(PROMPTS, logprobs=True, **g),
        "stops": gen.text_completion(PROMPTS, max_gen_len=40, stop=["e", "=="], **g),
        "infilling": gen.text_infilling(["def f(x):\n    ", "a = "], ["\n    return y", ""],
                                        max_gen_len=20, logprobs=True, **g),
        "chat": gen.chat_completion([[{"role": "user", "content": "sort a list"}]],
                                    max_gen_len=20, logprobs=True, **g),
        "stream": list(gen.stream_completion(PROMPTS[1], max_gen_len=30, stop=["re"], **g)),
        "stream_chat": list(gen.stream_chat_completion(
            [{"role": "user", "content": "hi"}], max_gen_len=15, **g)),
        # A prompt filling the cache gets nothing; the others decode beside it.
        "full": gen.generate([[1] * 48, [1, 5, 9]], max_gen_len=12, temperature=0,
                             logprobs=True),
    }


@pytest.fixture(scope="module")
def plain(target):
    return every_api(target)


def assert_same(got, want, path="result"):
    """Equal, with floats (logprobs) within 1e-5."""
    if isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-5), path
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for key in want:
            assert_same(got[key], want[key], f"{path}.{key}")
    else:
        assert got == want, path


@pytest.mark.parametrize("which, fixed", [("model", False), ("self", False),
                                          ("lookup", False), ("model", True),
                                          ("self", True), ("lookup", True)])
def test_greedy_equals_plain_decoding(target, drafts, plain, which, fixed):
    draft = "lookup" if which == "lookup" else drafts[which]
    with drafting_with(target, draft, k=3, fixed_shapes=fixed) as spec:
        got = every_api(target)
        stats = dict(spec.stats)
        if fixed:  # graphs are captured once per key, not once per generation
            runners = [spec.runner] + [getattr(spec.drafter, "runner", None)] * (
                which != "lookup") + [spec.device] * (which == "lookup")
            keys = [len(r.graphs) for r in runners]
            target.text_completion(PROMPTS, max_gen_len=40, temperature=0)
            assert [len(r.graphs) for r in runners] == keys
    assert_same(got, plain)
    assert stats["proposed"] > 0
    if which == "self":  # the target's own weights propose its own tokens (with fixed
        # shapes too, where each draft step's output must outlive the next step)
        assert stats["accepted"] == stats["proposed"]
    if which == "model":  # random weights of another seed agree on nothing
        assert stats["accepted"] < stats["proposed"] / 4
    if which == "lookup":  # tiny random models loop: lookup finds their repeats
        assert stats["accepted"] > 0
    # With fixed shapes, lookup's rounds run on the device (lookup_rounds.py) and from
    # the host (plain steps where nothing is found, and near the cache end).
    assert (stats["on_device"] > 0) == (fixed and which == "lookup")
    assert stats["on_device"] < stats["rounds"]


@pytest.mark.parametrize("fixed", [False, True])
def test_lookup_launching_ahead_equals_plain_decoding(target, plain, fixed):
    """As on CUDA: plain steps (where lookup finds nothing) launched before the previous
    step's tokens are read, and stopped when it finds something again."""
    target.engine.launch_ahead = True
    try:
        with drafting_with(target, "lookup", k=3, fixed_shapes=fixed):
            got = every_api(target)
    finally:
        target.engine.launch_ahead = False
    assert_same(got, plain)


def test_device_rounds_survive_a_new_runner_in_a_paused_stream(target):
    """configure(decode=...) while a stream is paused makes a new verify runner, hence a
    new (empty) device buffer: the rows' tokens must be loaded into it again."""
    prompt = [1, 5, 9, 14, 5, 9, 20, 5, 9]
    want = target.generate([prompt], max_gen_len=None, temperature=0, stop_token=-1)[0][0]
    target.engine.launch_ahead = True
    got, entries = [], []
    try:
        with drafting_with(target, "lookup", k=3, fixed_shapes=True) as spec:
            for step in target.engine.generate([prompt], Sampling(0.0, 1.0, None, {-1})):
                got.append(step[0][0] if step[0] else None)
                if spec.stats["on_device"] not in entries:  # as a paused stream's configure
                    entries.append(spec.stats["on_device"])
                    spec.runner = GraphedChunks(target.model, capture=False)
    finally:
        target.engine.launch_ahead = False
    assert len(entries) > 2
    assert got == want


def test_compiled_lookup_rounds_equal_plain_decoding(make_model):
    """decode="compiled": the verify steps and the device's lookup rounds compiled by
    torch.compile (on the CPU: run, not captured), launched ahead, as on CUDA."""
    gen = build(make_model()[0], max_seq_len=48)
    want = gen.text_completion(PROMPTS, max_gen_len=30, temperature=0, logprobs=True)
    gen.configure(decode="compiled", draft="lookup", draft_tokens=3)
    gen.engine.launch_ahead = True
    got = gen.text_completion(PROMPTS, max_gen_len=30, temperature=0, logprobs=True)
    assert gen.engine.speculation.stats["on_device"] > 0
    assert_same(got, want)


class Oracle:
    """A drafter that knows the plain greedy output and is right for a number of tokens
    that changes from row to row and round to round, then wrong."""

    name = "oracle"

    def __init__(self, prompts, outputs):
        self.prompts, self.outputs = prompts, outputs

    @contextlib.contextmanager
    def session(self, prompt_tokens, target):
        self.rounds, self.device = 0, target.rope.device
        yield self

    def propose(self, history, allow, sampling, fixed):
        self.rounds += 1
        found = []
        for i, (h, a) in enumerate(zip(history, allow)):
            done = len(h) - len(self.prompts[i])
            right = self.outputs[i][done:done + a] + [0] * a
            wrong_at = (self.rounds + 2 * i) % (a + 2)  # a + 1: all right
            found.append([t + (j == wrong_at) for j, t in enumerate(right[:a])])
        width = max(allow)
        if width == 0:
            return None, allow, None
        return torch.tensor([f + [0] * (width - len(f)) for f in found]), allow, None

    def verified(self, positions, counts, width):
        self.counts = getattr(self, "counts", []) + [counts]


def test_ragged_acceptance_yields_one_step_per_token(target):
    """Rows accepting different numbers of tokens per round, one of them finished by
    on_token mid-round: the steps carry each row's tokens in order (None where a row has
    none at that index), on_token sees exactly the tokens yielded, and every row equals
    plain decoding."""
    prompts = [target.tokenizer.encode(p, True, False) for p in PROMPTS]
    want, want_lps = target.generate(prompts, max_gen_len=30, temperature=0, logprobs=True)
    oracle = Oracle(prompts, want)
    limits = [9, 30, 17]  # row 0 and row 2 are finished by on_token
    calls = []

    def on_token(i, token, logprob):
        calls.append((i, token))
        return sum(c[0] == i for c in calls) == limits[i]

    target.engine.speculate(speculative.Speculation(oracle, 4), 4)
    try:
        steps = list(target.engine.generate(prompts, Sampling(0.0, 1.0, 30),
                                            on_token=on_token))
    finally:
        target.configure(draft=None)
    yielded = [(i, s[i][0]) for s in steps for i in range(3) if s[i] is not None]
    assert yielded == calls
    assert sorted({c for counts in oracle.counts for c in counts}) == [1, 2, 3, 4, 5]
    for i in range(3):
        row = [s[i] for s in steps if s[i] is not None]
        assert [t for t, _ in row] == want[i][:limits[i]]
        assert [lp for _, lp in row] == pytest.approx(want_lps[i][:limits[i]], abs=1e-5)


def chi_square(samples: torch.Tensor, probs: torch.Tensor):
    """(Pearson's statistic, its 0.1% critical value) for samples drawn from probs, over
    the tokens expected at least 5 times and one bin for all the others."""
    expected = probs.double() * samples.numel()
    observed = torch.bincount(samples, minlength=probs.numel()).double()
    big = expected >= 5
    e = torch.cat([expected[big], expected[~big].sum()[None]])
    o = torch.cat([observed[big], observed[~big].sum()[None]])
    o, e = o[e > 0], e[e > 0]
    if (observed[probs == 0] > 0).any():  # a token the target never draws
        return float("inf"), 0.0
    df = e.numel() - 1
    # Wilson-Hilferty: chi2(df) quantile from the normal one (z = 3.09 for 0.1%).
    critical = df * (1 - 2 / (9 * df) + 3.09 * (2 / (9 * df)) ** 0.5) ** 3
    return ((o - e) ** 2 / e).sum().item(), critical


def check_marginals(tokens, counts, p):
    """Output token j (for rows that got one) against p[j]: chi_square's pair for each."""
    return [chi_square(tokens[counts > j, j], p[j]) for j in range(p.shape[0])]


@pytest.mark.parametrize("drawn", [True, False])
def test_acceptance_rule_keeps_the_target_distribution(monkeypatch, drawn):
    """Vectorised over 100,000 rows, with target distributions that do not depend on the
    prefix: every output token, at every index, follows the target's (temperature and
    top-p adjusted) distribution. With the rule broken to accept every proposal, the
    same check fails."""
    torch.manual_seed(0)
    n, width, vocab = 100_000, 4, 6
    logits = torch.randn(width, vocab) * 1.5
    temperature, top_p = 0.8, 0.9
    p = nucleus(logits, temperature, top_p)
    if drawn:  # a draft model's distributions, and proposals drawn from them
        q = torch.softmax(torch.randn(width - 1, vocab), -1)
        drafts = torch.stack([torch.multinomial(q[j], n, replacement=True)
                              for j in range(width - 1)], dim=1)
        q = q.expand(n, -1, -1)
    else:  # prompt lookup: fixed proposals (likely ones), some rows proposing fewer
        q, drafts = None, p[:-1].argmax(-1).expand(n, -1)
    n_drafted = torch.randint(0, width, (n,))

    def run():
        return accept_sampled(logits.expand(n, -1, -1), drafts, n_drafted, q,
                              temperature, top_p)

    tokens, _, counts = run()
    assert counts.min() == 1 and counts.max() == width
    for statistic, critical in check_marginals(tokens, counts, p):
        assert statistic < critical
    monkeypatch.setattr(torch, "rand_like", torch.zeros_like)  # u = 0: accept all
    tokens, _, counts = run()
    assert any(stat > critical for stat, critical in check_marginals(tokens, counts, p))


def exact_second_token(gen, prompt, temperature, top_p):
    """The exact distribution of the second generated token: the sum over first tokens
    t of p(t | prompt) p(. | prompt, t), both temperature and top-p adjusted."""
    model = gen.model
    first = nucleus(model.forward(torch.tensor([prompt]), 0)[0, -1], temperature, top_p)
    support = first.nonzero()[:, 0]
    total = torch.zeros_like(first)
    for chunk in support.split(model.params.max_batch_size):
        rows = torch.tensor([prompt + [t] for t in chunk.tolist()])
        nxt = nucleus(model.forward(rows, 0)[:, -1], temperature, top_p)
        total += (first[chunk, None] * nxt).sum(0)
    return total


def test_sampling_with_a_draft_model_keeps_the_target_distribution(make_model,
                                                                   monkeypatch):
    """End to end on tiny models: the second token (the first one a draft model proposes
    and the target accepts or resamples) follows the target's exact distribution over
    many seeded draws; accepting every proposal instead fails the same check."""
    target = build(make_model()[0], max_seq_len=16, max_batch_size=32)
    draft = build(make_model(seed=1)[0], max_seq_len=16, max_batch_size=32)
    prompt = target.tokenizer.encode("def f(", True, False)
    # About 10 likely tokens, so that few draws tell distributions apart; top_p 1 keeps
    # every token possible, so that u = 0 below accepts every proposal.
    temperature, top_p = 0.2, 1.0
    want = exact_second_token(target, prompt, temperature, top_p)
    target.configure(draft=draft, draft_tokens=2)

    def second_tokens(calls=120):
        torch.manual_seed(3)
        out = []
        for _ in range(calls):
            tokens, _ = target.generate([prompt] * 32, max_gen_len=3,
                                        temperature=temperature, top_p=top_p, stop_token=-1)
            out += [row[1] for row in tokens]
        return torch.tensor(out)

    got = second_tokens()
    stats = target.engine.speculation.stats
    assert 0 < stats["accepted"] < stats["proposed"]  # both branches of the rule ran
    statistic, critical = chi_square(got, want)
    assert statistic < critical
    monkeypatch.setattr(torch, "rand_like", torch.zeros_like)  # accept every proposal
    broken = second_tokens(calls=40)
    statistic, critical = chi_square(broken, want)
    assert statistic > critical


def test_sampling_with_lookup_rounds_on_the_device_keeps_the_distribution(make_model,
                                                                         monkeypatch):
    """As above with prompt lookup whose rounds run on the device (fixed shapes): the
    prompt holds every token the model likes after it, so the second token is mostly a
    proposal, accepted or resampled by the device's round."""
    target = build(make_model()[0], max_seq_len=48, max_batch_size=32)
    temperature, top_p = 0.2, 1.0
    start = target.tokenizer.encode("def f(", True, False)
    prompt = start

    def likely(rows):  # the 8 most likely next tokens after each row
        probs = nucleus(target.model.forward(torch.tensor(rows), 0)[:, -1], temperature,
                        top_p)
        return probs.topk(8).indices.tolist()

    for _ in range(3):  # pairs (t, the token most likely after prompt + [t])
        first = likely([prompt])[0]
        after = [row[0] for row in likely([prompt + [t] for t in first])]
        prompt = start + [t for pair in zip(first, after) for t in pair]
    want = exact_second_token(target, prompt, temperature, top_p)

    def second_tokens(calls=120):
        torch.manual_seed(3)
        out = []
        with drafting_with(target, "lookup", k=2, fixed_shapes=True) as spec:
            for _ in range(calls):
                tokens, _ = target.generate([prompt] * 32, max_gen_len=3,
                                            temperature=temperature, top_p=top_p,
                                            stop_token=-1)
                out += [row[1] for row in tokens]
            stats = dict(spec.stats)
        return torch.tensor(out), stats

    got, stats = second_tokens()
    assert stats["on_device"] > 0
    assert 0 < stats["accepted"] < stats["proposed"]
    statistic, critical = chi_square(got, want)
    assert statistic < critical
    monkeypatch.setattr(torch, "rand_like", torch.zeros_like)  # accept every proposal
    broken, _ = second_tokens(calls=40)
    statistic, critical = chi_square(broken, want)
    assert statistic > critical


def test_greedy_acceptance_counts():
    logits = torch.full((3, 4, 5), -1.0)
    best = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [0, 0, 0, 0]])
    logits.scatter_(-1, best[..., None], 1.0)
    drafts = torch.tensor([[1, 2, 0], [1, 2, 3], [0, 0, 0]])
    tokens, logprobs, counts = accept_greedy(logits, drafts, torch.tensor([3, 2, 3]))
    assert counts.tolist() == [3, 3, 4]  # row 1 proposed only 2: its third is not read
    assert tokens.tolist() == best.tolist()
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1).amax(-1))


def test_lookup_proposes_the_latest_longest_match():
    session = drafting.LookupSession(1)
    history = [5, 6, 7, 8, 1, 6, 7, 9, 2, 6, 7]
    # "6 7" last continued with 9 (the 3-gram "2 6 7" never occurred before).
    assert session.continuation(0, history, 3) == [9, 2, 6]
    history += [8]  # "6 7 8" occurred at the start: its continuation wins
    assert session.continuation(0, history, 2) == [1, 6]
    assert session.continuation(0, history + [4], 3) == []  # 4 never seen before
    fresh = drafting.LookupSession(1)
    assert fresh.continuation(0, [3, 3], 5) == [3]  # may overlap the row's own tail


def test_device_lookup_proposes_what_the_host_lookup_does():
    """lookup_rounds.propose against LookupSession on rows of few distinct tokens (many
    matches of every length), at every length, including rows too short to match."""
    gen = torch.Generator().manual_seed(0)
    size, k = 40, 5
    history = torch.randint(0, 4, (6, size + 1), generator=gen)
    history[5, :] = torch.arange(size + 1)  # no repeats: nothing to propose
    history[:, size] = 99  # the scratch column: never proposed
    for length in range(0, size + 1):
        lengths = torch.full((6,), length)
        chunk, counts = lookup_rounds.propose(history, lengths, k)
        for i in range(6):
            row = history[i, :length].tolist()
            want = drafting.LookupSession(1).continuation(0, row, k)
            assert chunk[i, 0].item() == (row[-1] if row else history[i, 0].item())
            assert counts[i].item() == len(want), (i, length)
            assert chunk[i, 1:1 + len(want)].tolist() == want, (i, length)


def test_device_lookup_appends_accepted_tokens_inside_the_cache():
    history = torch.zeros((3, 7), dtype=torch.long)  # 6 positions and the scratch column
    lengths = torch.tensor([1, 4, 6])
    tokens = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])
    lookup_rounds.append(history, lengths, tokens, torch.tensor([2, 3, 3]))
    assert history[:, :6].tolist() == [[0, 5, 6, 0, 0, 0], [0, 0, 0, 0, 8, 9],
                                       [0] * 6]
    assert lengths.tolist() == [3, 6, 6]  # the last row ran past the cache: dropped


def test_lookup_without_a_match_runs_the_plain_step(target):
    """No proposal anywhere: the round is the engine's own decode step."""
    prompts = [[1, 17, 23], [1, 40]]
    want = target.generate(prompts, max_gen_len=2, temperature=0, logprobs=True)
    calls = []
    decoder = target.engine.decoder
    target.engine.decoder = lambda *a: calls.append(a) or decoder(*a)
    try:
        with drafting_with(target, "lookup") as spec:
            got = target.generate(prompts, max_gen_len=2, temperature=0, logprobs=True)
            assert spec.stats["proposed"] == 0
    finally:
        target.engine.decoder = decoder
    assert len(calls) == 1
    assert_same(got, want)


def test_settings_and_bad_input(target, drafts, make_model, step_tokenizer_path):
    target.configure(draft_tokens=4)  # earlier tests left 3; draft None leaves it
    before = target.settings
    assert before["draft"] is None and before["draft_tokens"] == 4
    target.configure(draft="lookup", draft_tokens=6)
    assert target.settings["draft"] == "lookup" and target.settings["draft_tokens"] == 6
    target.configure(decode="eager")  # other options keep the draft
    assert target.settings["draft"] == "lookup"
    target.configure(draft=drafts["model"])
    assert target.settings["draft"].startswith("Llama (")
    assert "2 layers" in target.settings["draft"]
    set_now = target.settings
    other_tokenizer = build(make_model(tokenizer=step_tokenizer_path)[0], max_seq_len=48)
    short = build(make_model(seed=1)[0], max_seq_len=32)
    bad = [
        (dict(draft_tokens=0), "draft_tokens must be"),
        (dict(draft_tokens=True), "draft_tokens must be"),
        (dict(draft_tokens=2.5), "draft_tokens must be"),
        (dict(draft="ngram"), "draft must be None, 'lookup', 'int4' or another Llama"),
        (dict(draft=3), "draft must be None"),
        (dict(draft=target), "cannot draft for itself"),
        (dict(draft=other_tokenizer), "tokenizer differs from the target's at id"),
        (dict(draft=short), "max_seq_len (32) is smaller than the target's (48)"),
        (dict(draft="lookup", decode="nope"), "decode must be one of"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            target.configure(**kwargs)
        assert target.settings == set_now, kwargs  # a call that raises changes nothing
    attention = short.model.layers[0].attention
    attention.n_local_heads //= 2  # as if built at twice the model-parallel size
    try:
        with pytest.raises(ValueError, match="model-parallel size 2 but the target at 1"):
            target.configure(draft=short)
    finally:
        attention.n_local_heads *= 2
    target.configure(draft=None)
    assert target.engine.speculation is None


def test_vocabulary_checks():
    """The draft may have more ids than the target (7B/13B's 32,016 drafting for 34B's
    32,000), never fewer; and it never proposes the ids the target lacks."""
    drafting.check_vocabulary(None, None, 32000, 32016)
    with pytest.raises(ValueError, match="fewer than the target's 32016"):
        drafting.check_vocabulary(None, None, 32016, 32000)
    logits = torch.zeros(1, 1, 6)
    logits[..., 5] = 9.0  # the draft's favourite is an id the target lacks

    class Stub:
        vocab_size = 6

        def forward_hidden(self, tokens, starts, kv_len):
            return torch.zeros(tokens.shape[0], tokens.shape[1], 1)

        def output(self, hidden):
            return logits[:, 0]
    token, q = drafting.draft_step(Stub(), torch.zeros(1, 1, dtype=torch.long), 0, 1,
                                   torch.zeros(1, dtype=torch.long), 0.7, 1.0, vocab=5)
    assert token.item() < 5 and q.shape == (1, 5)
    token, q = drafting.draft_step(Stub(), torch.zeros(1, 1, dtype=torch.long), 0, 1,
                                   torch.zeros(1, dtype=torch.long), 0.0, 1.0, vocab=5)
    assert token.item() < 5 and q is None


def test_int4_draft(target, make_model):
    """Self-speculation with the target's weights in int4."""
    with pytest.raises(ValueError, match="group_size"):  # widths of 64: no int4 groups
        target.configure(draft="int4")
    gen = build(make_model(dim=128, multiple_of=128)[0], max_seq_len=48)
    want = gen.text_completion(PROMPTS, temperature=0, max_gen_len=30, logprobs=True)
    with drafting_with(gen, "int4", k=4) as spec:
        assert gen.settings["draft"] == "int4"
        got = gen.text_completion(PROMPTS, temperature=0, max_gen_len=30, logprobs=True)
        stats = dict(spec.stats)
    assert_same(got, want)
    # The same model, rounded: random weights give flat distributions, where rounding
    # moves the arg-max more often than in a trained model.
    assert stats["accepted"] > stats["proposed"] / 4


def test_model_parallel_ranks_agree(make_model, tmp_path):
    """MP=2 under torchrun (gloo): with a draft model, greedy output equals plain MP=1
    decoding, and both ranks sample the same tokens."""
    folder, _, _ = make_model(shards=2)
    draft_folder, _, _ = make_model(shards=2, seed=1)
    out = tmp_path / "out.pt"
    conftest.run_torchrun(WORKER, 2, folder, draft_folder, out)
    got = torch.load(out, weights_only=False)
    gen = build(folder)
    want = gen.text_completion(PROMPTS[:2], temperature=0, max_gen_len=12, logprobs=True)
    for g, w in zip(got["greedy"], want):
        assert g["tokens"] == w["tokens"]
        assert g["logprobs"] == pytest.approx(w["logprobs"], abs=1e-4)
    assert got["sampled"][0] == got["sampled"][1]


def test_benchmark_reports_speculation(tmp_path):
    """bench.py --draft: the drafted run beside the plain one, with acceptance, the same
    tokens, and verify step costs; --edit_file's prompt repeats the file's start."""
    from benchmarks import bench, speculation
    res = bench.main(["--device", "cpu", "--preset", "tiny", "--prefill_lens", "none",
                      "--batch_sizes", "1,2", "--prompt_len", "6", "--gen_len", "12",
                      "--peers", "none", "--draft", "lookup", "--draft_tokens", "3",
                      "--verify_widths", "1,4", "--decode_repeats", "1", "--repeats", "1"])
    for name in ("decode b=1", "decode b=2"):
        ours = res["scenarios"][name]["ours"]
        assert ours["draft"]["same_tokens"] is True
        assert 0 <= ours["draft"]["acceptance"] <= 1 and ours["draft"]["tokens_per_s"] > 0
        assert set(ours["step_costs"]["verify_ms"]) == {1, 4}
    source = tmp_path / "m.py"
    source.write_text('"""Doc."""\n\nimport os\n\n\ndef f():\n    return os.sep\n')
    prompt = speculation.edit_prompt(str(source), head_lines=3)
    assert prompt == source.read_text() + '\n\n"""Doc."""  # edited\n\nimport os\n'


def test_made_inside_inference_mode_the_caches_stay_writable(make_model):
    """Captured and compiled steps run outside inference mode and write the KV cache in
    place, which an inference tensor refuses: a model or an int4 draft made inside
    torch.inference_mode() must still hold ordinary tensors."""
    with torch.inference_mode():
        gen = build(make_model(dim=128, multiple_of=128)[0], max_seq_len=48)
        gen.configure(draft="int4")
    draft_model = gen.engine.speculation.drafter.model
    caches = [layer.attention.cache for m in (gen.model, draft_model) for layer in m.layers]
    assert caches and not any(c.k.is_inference() or c.v.is_inference() for c in caches)
    gen.configure(draft=None)
