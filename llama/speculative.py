"""Speculative decoding: a drafter proposes up to k next tokens per row, and one forward
pass of the target model over each row's last token and its proposals checks them all.

At batch 1 a decode step reads every weight once per token, so the GPU mostly waits on
memory; a forward pass over k + 1 tokens reads the same weights and costs about as much.
Every accepted proposal is a token gained. The output is the target's own:

- greedy: proposals are accepted while they equal the target's arg-max; the first
  disagreement is replaced by the target's token (so every round yields at least one),
  and each token's log-probability is the log-softmax of the same target logits as in
  plain decoding.
- sampling: proposal x drawn from the draft distribution q is accepted with probability
  min(1, p(x) / q(x)), where p is the target's distribution after temperature and top-p;
  at the first rejection the token is drawn from max(0, p - q), normalised; if every
  proposal is accepted, one more token is drawn from p. Each token is then distributed
  exactly as p says (Leviathan et al. 2023; Chen et al. 2023). Prompt lookup proposes
  deterministically: q is a point mass.

Drafters (drafting.py): another Llama sharing the tokenizer, the target's own weights in
int4, or prompt lookup. The engine yields one step per token index, so a round that
accepts 3 tokens for row 0 and 1 for row 1 yields 3 steps, with row 1 None in the last
two.
"""

import functools
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import lookup_rounds
from .chunk_steps import GraphedChunks, chunk_runner
from .engine import Engine, HostCopy, Step
from .graphs import to_device
from .hparams import whole_number
from .sampling import Sampling, draw, is_sampled, nucleus_sorted

DEFAULT_DRAFT_TOKENS = 4
KEEP = object()  # configure's "leave the draft as it is"


def nucleus(logits: torch.Tensor, temperature, top_p) -> torch.Tensor:
    """The distribution sampling.pick draws from: softmax(logits / temperature) kept to
    the smallest set of most likely tokens whose mass reaches top_p, normalised."""
    probs = torch.softmax(logits / temperature, dim=-1)
    kept, order = nucleus_sorted(probs, top_p)
    kept = torch.zeros_like(probs).scatter_(-1, order, kept)
    return kept / kept.sum(dim=-1, keepdim=True)


def accept_greedy(logits, drafts, n_drafted):
    """logits (n, w, vocab) of the target at a row's last token and its w - 1 proposals
    `drafts` (n, w - 1), of which the first n_drafted (n,) are real. Returns (tokens (n, w),
    logprobs (n, w), counts (n,)): each row's first counts[i] tokens are its output."""
    best = torch.argmax(logits, dim=-1)
    proposed = torch.arange(drafts.shape[1], device=drafts.device) < n_drafted[:, None]
    agree = (drafts == best[:, :-1]) & proposed
    counts = agree.long().cumprod(dim=-1).sum(dim=-1) + 1
    logprobs = F.log_softmax(logits, dim=-1).gather(-1, best[..., None])[..., 0]
    return best, logprobs, counts


def accept_sampled(logits, drafts, n_drafted, q, temperature, top_p):
    """accept_greedy's outputs under sampling. q (n, w - 1, vocab): the distributions the
    proposals were drawn from, or None for deterministic proposals (point masses)."""
    n, width, vocab = logits.shape
    p = nucleus(logits, temperature, top_p)
    if q is None:  # (not F.one_hot: it checks the ids on the host, which graphs forbid)
        q = torch.zeros_like(p[:, :-1]).scatter_(-1, drafts[..., None], 1.0)
    p_x = p[:, :-1].gather(-1, drafts[..., None])[..., 0]
    q_x = q.gather(-1, drafts[..., None])[..., 0]
    proposed = torch.arange(width - 1, device=drafts.device) < n_drafted[:, None]
    # u < p/q, written without the division: q_x > 0 for every drawn proposal.
    keep = (torch.rand_like(p_x) * q_x < p_x) & proposed
    accepted = keep.long().cumprod(dim=-1).sum(dim=-1)
    at = accepted[:, None, None].expand(n, 1, vocab)
    p_next = p.gather(1, at)[:, 0]
    rejected = (accepted < n_drafted)[:, None]  # else every proposal was taken: draw from p
    q_next = F.pad(q, (0, 0, 0, 1)).gather(1, at)[:, 0] * rejected
    residual = (p_next - q_next).clamp_min(0)
    # All zero only where p equals q, where a rejection has probability 0.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
    tokens = F.pad(drafts, (0, 1)).scatter(1, accepted[:, None], draw(residual)[:, None])
    logprobs = F.log_softmax(logits, dim=-1).gather(-1, tokens[..., None])[..., 0]
    return tokens, logprobs, accepted + 1


def target_logits(model, tokens, starts, kv_len):
    return model.output(model.forward_hidden(tokens, starts, kv_len=kv_len)).float()


def verify(model, tokens, starts, kv_len, n_drafted, temperature, top_p):
    """The verify step (chunk_steps signature) for deterministic proposals: tokens (n, w)
    are each row's last token and its proposals."""
    logits = target_logits(model, tokens, starts, kv_len)
    if not is_sampled(temperature):
        return accept_greedy(logits, tokens[:, 1:], n_drafted)
    return accept_sampled(logits, tokens[:, 1:], n_drafted, None, temperature, top_p)


def verify_drawn(model, tokens, starts, kv_len, n_drafted, q, temperature, top_p):
    """The verify step for proposals drawn from the distributions q."""
    logits = target_logits(model, tokens, starts, kv_len)
    return accept_sampled(logits, tokens[:, 1:], n_drafted, q, temperature, top_p)


def lookup_round(model, history, lengths, kv_len, temperature, top_p, *, k: int):
    """A whole round of prompt lookup on the device (lookup_rounds.py): each row's
    proposals from its tokens so far, the verify, and the accepted tokens appended.
    Returns verify's outputs and each row's number of proposals."""
    tokens, n_drafted = lookup_rounds.propose(history, lengths, k)
    # Rows that finished on the host run on; this keeps their chunk inside the cache.
    starts = (lengths - 1).clamp(min=0, max=model.params.max_seq_len - tokens.shape[1])
    new, logprobs, counts = verify(model, tokens, starts, kv_len, n_drafted, temperature,
                                   top_p)
    lookup_rounds.append(history, lengths, new, counts)
    return new, logprobs, counts, n_drafted


def one_each(rows: "Rows", tokens: List[int], logprobs: List[float]):
    """A plain step's (token, logprob) for each live row, as a round's new pairs."""
    return [[(t, lp)] if a else [] for t, lp, a in zip(tokens, logprobs, rows.active)]


class Rows:
    """The rows of one generation on the host: their tokens so far, budgets and stop
    rules. Turns each round's new tokens into steps of one token per row."""

    def __init__(self, prompt_tokens, budgets: List[int], sampling: Sampling, on_token):
        self.history = [list(p) for p in prompt_tokens]
        self.budgets, self.stop_ids, self.on_token = budgets, sampling.stop_ids, on_token
        self.produced = [0] * len(budgets)
        self.active = [b > 0 for b in budgets]

    def remaining(self, i: int) -> int:
        return self.budgets[i] - self.produced[i] if self.active[i] else 0

    def emit(self, fresh: Sequence[Sequence[Tuple[int, float]]]):
        """Yield steps: the j-th holds each row's j-th new (token, logprob), or None for a
        row that has finished or has no j-th token this round."""
        for j in range(max(map(len, fresh), default=0)):
            if not any(a and j < len(new) for a, new in zip(self.active, fresh)):
                return
            step: Step = [None] * len(fresh)
            for i, new in enumerate(fresh):
                if self.active[i] and j < len(new):
                    step[i] = self.take(i, *new[j])
            yield step

    def take(self, i: int, token: int, logprob: float):
        if token in self.stop_ids:
            self.active[i] = False
            return None
        self.history[i].append(token)
        self.produced[i] += 1
        stopped = self.on_token is not None and self.on_token(i, token, logprob)
        self.active[i] = self.produced[i] < self.budgets[i] and not stopped
        return token, logprob


class Speculation:
    """Decoding with a drafter and up to k proposals per row per round."""

    def __init__(self, drafter, k: int):
        self.drafter, self.k = drafter, k
        self.runner, self.made_for = None, None
        self.device = None  # lookup_rounds.DeviceRounds, for lookup with fixed shapes
        # Since configure: rounds run (of which on the device, launched ahead), tokens
        # proposed and accepted (live rows only).
        self.stats = {"rounds": 0, "on_device": 0, "proposed": 0, "accepted": 0}

    def chunks(self, engine: Engine):
        """The verify steps' runner for the engine's decode mode, made anew with the
        engine's decoder (configure remakes it when the mode or the model changes)."""
        if self.made_for is not engine.decoder:
            self.runner = chunk_runner(engine.model, engine.settings["decode"])
            self.made_for = engine.decoder
        return self.runner

    def steps(self, engine: Engine, prompt_tokens, budgets, sampling: Sampling,
              prompt_logprobs, on_token):
        """Engine._steps with rounds of speculation: prefill, then per round one step per
        token index."""
        rows = Rows(prompt_tokens, budgets, sampling, on_token)
        first = HostCopy(*engine.prefill(prompt_tokens, sampling, prompt_logprobs)).wait()
        synced = [0] * len(prompt_tokens)  # each row's tokens the device's lookup holds
        with self.drafter.session(prompt_tokens, engine.model) as draft:
            yield from rows.emit([[pair] for pair in zip(*first)])
            while any(rows.active):
                runner = self.chunks(engine)
                fixed = isinstance(runner, GraphedChunks)
                drafts, n_drafted, q = draft.propose(rows.history, self.allowed(engine, rows),
                                                     sampling, fixed)
                if drafts is None:  # nothing proposed: plain decode steps
                    yield from self.plain_steps(runner, engine, rows, draft, sampling, synced)
                elif self.on_device(runner, engine, rows, 0):
                    yield from self.device_rounds(runner, engine, rows, sampling, synced)
                else:
                    yield from rows.emit(self.round(runner, engine, rows, sampling, draft,
                                                    drafts, n_drafted, q))

    def allowed(self, engine: Engine, rows: Rows) -> List[int]:
        """Proposals each row may take: the verify chunk has one width for all rows and
        must end inside the cache for every live row, and a row takes at most its
        remaining budget."""
        max_seq_len = engine.model.params.max_seq_len
        live = [i for i, a in enumerate(rows.active) if a]
        limit = min([self.k] + [max_seq_len - len(rows.history[i]) for i in live])
        return [min(limit, rows.remaining(i) - 1) if rows.active[i] else 0
                for i in range(len(rows.history))]

    def room(self, engine: Engine, rows: Rows, in_flight: int) -> bool:
        """Whether a round launched now, with `in_flight` rounds (or plain steps) launched
        and not yet read, ends inside the cache for every live row: each is counted as
        adding up to k + 1 tokens."""
        width, max_seq_len = self.k + 1, engine.model.params.max_seq_len
        return all(len(h) + (in_flight + 1) * width - 1 <= max_seq_len
                   for h, a in zip(rows.history, rows.active) if a)

    def on_device(self, runner, engine: Engine, rows: Rows, in_flight: int) -> bool:
        """Whether lookup rounds can run on the device now (see device_rounds)."""
        return (self.drafter.name == "lookup" and isinstance(runner, GraphedChunks)
                and self.room(engine, rows, in_flight))

    def device_rounds(self, runner: GraphedChunks, engine: Engine, rows: Rows,
                      sampling: Sampling, synced: List[int], step=None):
        """Lookup rounds run on the device (lookup_rounds.py), each launched before the
        previous one's tokens are read, while every live row has room in the cache and
        the lookup finds proposals; the host's rounds go on from where they stop.
        `step`: the outputs of a plain decode step launched and not yet read, whose
        tokens the rows take first (on the device, without waiting for them)."""
        if self.device is None or self.device.chunks is not runner:
            fn = functools.partial(lookup_round, k=self.k)  # one per runner: a graph key
            self.device = lookup_rounds.DeviceRounds(runner, fn)
            synced[:] = [0] * len(synced)  # a new, empty buffer (decode mode changed)
        copied = None if step is None else HostCopy(*step)
        self.device.begin(rows.history, synced, sampling.temperature, sampling.top_p,
                          None if step is None else step[0])
        pending = self.device.launch()
        if copied is not None:
            self.stats["rounds"] += 1
            yield from rows.emit(one_each(rows, *copied.wait()))
        searching = True
        while pending is not None and any(rows.active):  # else the round ahead is unread
            ahead = None
            if searching and self.room(engine, rows, 1) and any(
                    rows.remaining(i) > 1 for i in range(len(rows.history))):
                ahead = self.device.launch()
            new, logprobs, counts, n_drafted = pending.wait()
            self.stats["on_device"] += 1
            # Nothing found for any live row: the round ahead is the last; the host's
            # rounds (plain steps) go on after it.
            searching = any(n for n, a in zip(n_drafted, rows.active) if a)
            yield from rows.emit(self.accepted(rows, new, logprobs, counts, n_drafted))
            pending = ahead
        synced[:] = [len(h) for h in rows.history]

    def round(self, runner, engine: Engine, rows: Rows, sampling: Sampling, draft, drafts,
              n_drafted: List[int], q):
        """Each row's new (token, logprob) pairs of a round verifying `drafts`."""
        max_seq_len = engine.model.params.max_seq_len
        positions = [len(h) - 1 for h in rows.history]  # of each row's last token
        device = engine.model.rope.device
        last = [h[-1] for h in rows.history]
        if isinstance(drafts, torch.Tensor):
            tokens = torch.cat([to_device(last, device)[:, None], drafts], dim=1)
        else:  # proposed on the host: one copy
            tokens = to_device([[t] + d for t, d in zip(last, drafts)], device)
        # Finished rows may sit anywhere: keep their (discarded) chunk inside the cache.
        starts = [min(p, max_seq_len - tokens.shape[1]) for p in positions]
        inputs = [to_device(n_drafted, device)] + ([] if q is None else [q])
        out = runner(verify if q is None else verify_drawn, tokens, starts, inputs,
                     sampling.temperature, sampling.top_p)
        new, logprobs, counts = HostCopy(*out).wait()
        draft.verified(positions, counts, tokens.shape[1] - 1)
        return self.accepted(rows, new, logprobs, counts, n_drafted)

    def accepted(self, rows: Rows, new, logprobs, counts: List[int], n_drafted: List[int]):
        """Each live row's new (token, logprob) pairs of a verified round; counted."""
        live = [i for i, a in enumerate(rows.active) if a]
        self.stats["rounds"] += 1
        self.stats["proposed"] += sum(n_drafted[i] for i in live)
        self.stats["accepted"] += sum(counts[i] - 1 for i in live)
        return [list(zip(new[i][:c], logprobs[i][:c])) if rows.active[i] else []
                for i, c in enumerate(counts)]

    def plain_steps(self, runner, engine: Engine, rows: Rows, draft, sampling: Sampling,
                    synced: List[int]):
        """The engine's own decode steps while the drafter proposes nothing, each launched
        before the previous one's tokens are read where the engine launches ahead (as in
        Engine._steps). Asking again after every token is free for lookup; a draft model
        proposes nothing only at its rows' budget or cache end, which stays so. When the
        lookup finds something, device rounds start behind the step in flight."""
        max_seq_len = engine.model.params.max_seq_len
        # As in Engine._steps, finished rows keep their position, and a row's (discarded)
        # steps past its budget rewrite the cache's last slot at most.
        positions = [min(len(h) - 1, max_seq_len - 1) for h in rows.history]
        last = to_device([h[-1] for h in rows.history], engine.model.rope.device)
        launched, searching = engine.decoder(last, positions, sampling), True
        while launched is not None and any(rows.active):
            copied = HostCopy(*launched)
            positions = [min(p + 1, max_seq_len - 1) if a else p
                         for p, a in zip(positions, rows.active)]
            ahead = None
            if searching and engine.launch_ahead and any(rows.remaining(i) > 1
                                                         for i in range(len(positions))):
                ahead = engine.decoder(launched[0], positions, sampling)
            self.stats["rounds"] += 1
            yield from rows.emit(one_each(rows, *copied.wait()))
            launched = ahead
            if ahead is not None and draft.propose(rows.history, self.allowed(engine, rows),
                                                   sampling, True)[0] is not None:
                if self.on_device(runner, engine, rows, 1):
                    yield from self.device_rounds(runner, engine, rows, sampling, synced,
                                                  step=ahead)
                    return
                searching = False  # the host's rounds go on after the step in flight


def check_draft_tokens(value) -> int:
    k = whole_number(value)
    if k is None or k < 1:
        raise ValueError(f"draft_tokens must be a whole number of tokens >= 1, "
                         f"got {value!r}")
    return k


def draft_tokens_setting(engine: Engine, draft_tokens: Optional[int]) -> int:
    """configure's draft_tokens: checked, or the engine's current value if None."""
    if draft_tokens is None:
        return engine.settings.get("draft_tokens", DEFAULT_DRAFT_TOKENS)
    return check_draft_tokens(draft_tokens)


def configure(engine: Engine, drafter, k: int) -> Optional[Speculation]:
    """The speculation for Llama.configure, given a drafter from drafting.make_drafter
    (or KEEP, or None for plain decoding) and k proposals per round."""
    current: Optional[Speculation] = engine.speculation
    if drafter is KEEP:
        drafter = current.drafter if current is not None else None
    if drafter is None:
        return None
    if current is not None and current.drafter is drafter and current.k == k:
        return current  # keeps its captured graphs
    return Speculation(drafter, k)
