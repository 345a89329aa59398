"""Drafters for speculative decoding (speculative.py): where the proposed tokens come from.

- "lookup" (prompt lookup): the continuation of the most recent earlier occurrence of
  the row's last 3 tokens (else 2, else 1) in its prompt and generated text. Code
  completions and edits repeat identifiers and whole lines of their context, which this
  finds for free; no model runs.
- another Llama sharing the tokenizer (a smaller Code Llama drafting for a larger one):
  it decodes k tokens ahead with its own KV cache, kept in step with the target's
  accepted tokens.
- "int4": the target's own weights quantized to 4 bits (llama/quantize.py), as a second
  model.

Each generation opens a session: `propose` returns (proposals (rows, m): a tensor on the
device, lists on the host (lookup, which the verify's tokens are built from in one
copy), or None when nothing is proposed; how many of each row's m are real; and for
drawn proposals their distributions (rows, m, target vocab), else None); `verified` is
told each row's accepted count.
"""

import contextlib
import copy
import functools
from typing import Dict, List, Optional, Tuple

import torch

from .chunk_steps import chunk_runner
from .engine import Engine
from .graphs import to_device
from .sampling import Sampling, draw, is_sampled
from .speculative import nucleus

LOOKUP_NGRAMS = (3, 2, 1)  # n-gram lengths tried, longest first


def make_drafter(target, draft):
    """The drafter that configure(draft=...) asks for, checked against the target Llama."""
    if draft is None:
        return None
    if isinstance(draft, str):
        if draft in BY_NAME:
            return BY_NAME[draft](target)
        raise ValueError(f"draft must be None, 'lookup', 'int4' or another Llama, "
                         f"got {draft!r}")
    if not isinstance(getattr(draft, "engine", None), Engine):
        raise ValueError(f"draft must be None, 'lookup', 'int4' or another Llama, got a "
                         f"{type(draft).__name__}")
    check_draft_model(target, draft)
    return ModelDrafter(draft.model, draft.engine, describe(draft.model),
                        target.model.vocab_size)


def describe(model) -> str:
    params = model.params
    count = params.num_params()
    size = f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"
    return f"Llama ({size} parameters, {params.n_layers} layers, dim {params.dim})"


def model_parallel_size(model) -> int:
    return model.params.n_heads // model.layers[0].attention.n_local_heads


def check_draft_model(target, draft) -> None:
    """A ValueError naming what makes `draft` unable to draft for `target`."""
    if draft is target:
        raise ValueError("a Llama cannot draft for itself (one KV cache serves one "
                         "generation); build a second, smaller Llama or use draft='lookup'")
    t, d = target.model, draft.model
    if model_parallel_size(d) != model_parallel_size(t):
        raise ValueError(f"the draft runs at model-parallel size {model_parallel_size(d)} "
                         f"but the target at {model_parallel_size(t)}; build both in the "
                         f"same torchrun launch with the same model_parallel_size")
    if d.rope.device != t.rope.device:
        raise ValueError(f"the draft is on {d.rope.device} but the target on "
                         f"{t.rope.device}; build both on one device")
    for name in ("max_seq_len", "max_batch_size"):
        mine, theirs = getattr(d.params, name), getattr(t.params, name)
        if mine < theirs:
            raise ValueError(f"the draft's {name} ({mine}) is smaller than the target's "
                             f"({theirs}); build the draft with {name}={theirs}")
    check_vocabulary(target.tokenizer, draft.tokenizer, t.vocab_size, d.vocab_size)


def check_vocabulary(target_tok, draft_tok, target_vocab: int, draft_vocab: int) -> None:
    """The draft must read every id of the target's vocabulary as the same piece; it may
    have more (7B/13B's 32,016 drafting for 34B's 32,000): those it never proposes."""
    fix = "build the draft with the target's tokenizer.model (the same Code Llama family)"
    if (target_tok is None) != (draft_tok is None):
        raise ValueError(f"only one of the target and the draft has a tokenizer, so they "
                         f"cannot be checked to share it; {fix}")
    if draft_vocab < target_vocab:
        raise ValueError(f"the draft's vocabulary has {draft_vocab} tokens, fewer than the "
                         f"target's {target_vocab}, so it cannot read every prompt; {fix}")
    if target_tok is None:
        return
    for name in ("bos_id", "eos_id"):
        if getattr(target_tok, name) != getattr(draft_tok, name):
            raise ValueError(f"the draft's tokenizer has another {name} than the "
                             f"target's; {fix}")
    target_sp, draft_sp = target_tok.sp_model, draft_tok.sp_model
    for i in range(target_vocab):
        if target_sp.id_to_piece(i) != draft_sp.id_to_piece(i):
            raise ValueError(f"the draft's tokenizer differs from the target's at id {i} "
                             f"({draft_sp.id_to_piece(i)!r} against "
                             f"{target_sp.id_to_piece(i)!r}); {fix}")


@torch.inference_mode(False)  # its KV cache is updated in place (see loading.build_model)
def int4_drafter(target):
    """The target's linear layers quantized to int4 (llama/quantize.py, default group
    size) in a second model with its own KV cache; its other weights are the target's."""
    from . import quant_kernels, quantize

    model = target.model
    shared = {id(p): p for p in model.parameters()}  # deepcopy's memo: copy buffers only
    draft_model = quantize.quantize(copy.deepcopy(model, shared), "int4")
    dtype = model.norm.weight.dtype
    kernel = quant_kernels.select_kernel(model.rope.device, "int4", dtype)
    quant_kernels.use_kernel(draft_model, kernel, dtype)
    engine = Engine(draft_model)
    engine.configure(decode=target.engine.settings["decode"])
    return ModelDrafter(draft_model, engine, "int4", model.vocab_size)


class LookupDrafter:
    name = "lookup"

    @contextlib.contextmanager
    def session(self, prompt_tokens, target):
        yield LookupSession(len(prompt_tokens))


# configure(draft=NAME): the drafts that need no second model.
BY_NAME = {"lookup": lambda target: LookupDrafter(), "int4": int4_drafter}


class LookupSession:
    """Per row, an index from each n-gram seen to the position after its latest
    occurrence, extended as tokens arrive: a lookup costs O(1) whatever the length."""

    def __init__(self, rows: int):
        self.index: List[Dict[tuple, int]] = [{} for _ in range(rows)]
        self.indexed = [0] * rows

    def continuation(self, i: int, history: List[int], limit: int) -> List[int]:
        index = self.index[i]
        for t in range(max(self.indexed[i], 1), len(history)):
            for n in LOOKUP_NGRAMS:
                if t >= n:
                    index[tuple(history[t - n:t])] = t
        self.indexed[i] = len(history)
        for n in LOOKUP_NGRAMS:
            after = index.get(tuple(history[-n:])) if len(history) > n else None
            if after is not None:
                return history[after:after + limit]
        return []

    def propose(self, history, allow: List[int], sampling: Sampling, fixed: bool):
        found = [self.continuation(i, h, a) if a > 0 else [] for i, (h, a)
                 in enumerate(zip(history, allow))]
        counts = [len(f) for f in found]
        if not any(counts):
            return None, counts, None
        # Fixed-shape steps: one width (hence one CUDA graph) for every round.
        width = max(allow) if fixed else max(counts)
        return [f + [0] * (width - len(f)) for f in found], counts, None

    def verified(self, positions, counts, width) -> None:
        pass


def draft_step(model, tokens, starts, kv_len, last, temperature, top_p, *, vocab: int):
    """The draft's step (chunk_steps signature): the next proposal after each row's token
    at index last[i] of `tokens`, drawn from (or, greedy, the arg-max of) the draft's
    distribution over the target's vocabulary; and that distribution when drawn."""
    hidden = model.forward_hidden(tokens, starts, kv_len=kv_len)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    logits = model.output(hidden[rows, last]).float()[:, :vocab]  # never an id past vocab
    if not is_sampled(temperature):
        return torch.argmax(logits, dim=-1), None
    q = nucleus(logits, temperature, top_p)
    return draw(q), q


class ModelDrafter:
    """A second model (its own KV cache) that decodes the proposals."""

    def __init__(self, model, engine: Engine, name: str, target_vocab: int):
        self.model, self.engine, self.name = model, engine, name
        self.runner, self.made_for = None, None
        # One function object for all generations: it keys the captured graphs.
        self.step = functools.partial(draft_step, vocab=target_vocab)

    def chunks(self):
        """The runner for the draft engine's decode mode (remade with its decoder)."""
        if self.made_for is not self.engine.decoder:
            self.runner = chunk_runner(self.model, self.engine.settings["decode"])
            self.made_for = self.engine.decoder
        return self.runner

    @contextlib.contextmanager
    def session(self, prompt_tokens, target):
        # The draft's KV cache holds this generation's rows until it ends.
        with self.engine.exclusive():
            yield ModelSession(self, prompt_tokens)


class ModelSession:
    """The draft's cache rows of one generation. `fed[i]`: how many of row i's tokens
    have their keys and values in the draft's cache (positions 0 to fed[i] - 1)."""

    def __init__(self, drafter: ModelDrafter, prompt_tokens):
        self.drafter, self.prompts = drafter, prompt_tokens
        self.fed: Optional[List[int]] = None  # prefilled at the first proposal

    def propose(self, history, allow: List[int], sampling: Sampling, fixed: bool):
        width = max(allow)
        if width == 0:
            return None, allow, None
        if self.fed is None:  # after the target's first token is out
            self.drafter.engine.prefill(self.prompts, Sampling(0.0, 1.0), None)
            self.fed = [len(p) for p in self.prompts]
        run, positions = self.drafter.chunks(), [len(h) - 1 for h in history]
        tokens, starts, last = self.catch_up(history, positions)
        drafts, dists = [], []
        for j in range(width):
            token, q = run(self.drafter.step, tokens, starts, [last], sampling.temperature,
                           sampling.top_p)
            # Copies: a graphed step's outputs are overwritten by its next replay.
            drafts.append(token.clone())
            dists.append(None if q is None else q.clone())
            tokens, last = token[:, None], torch.zeros_like(last)
            starts = [min(p + j + 1, self.drafter.model.params.max_seq_len - 1)
                      for p in positions]
        q = None if dists[0] is None else torch.stack(dists, dim=1)
        return torch.stack(drafts, dim=1), allow, q

    def catch_up(self, history, positions) -> Tuple[torch.Tensor, List[int], torch.Tensor]:
        """The first draft step's chunk: per row, the tokens from its first one missing
        from the draft's cache to its last, all rows with one width (at least 1), and
        the index of each row's last token in it. Rows needing fewer re-feed tokens the
        cache holds already (the same keys again); at the start of a short row the
        chunk runs past its last token (placeholders, rewritten before being read)."""
        width = max([1] + [p + 1 - f for p, f in zip(positions, self.fed)])
        starts = [max(0, p + 1 - width) for p in positions]
        rows = [(h[s:s + width] + [0] * width)[:width] for h, s in zip(history, starts)]
        device = self.drafter.model.rope.device
        last = to_device([p - s for p, s in zip(positions, starts)], device)
        return to_device(rows, device), starts, last

    def verified(self, positions: List[int], counts: List[int], width: int) -> None:
        """After a verify of `width` proposals: the draft's cache holds each row's last
        token and the proposals it fed, d_1 .. d_(width-1), of which counts[i] - 1 were
        accepted."""
        self.fed = [p + 1 + min(c - 1, width - 1) for p, c in zip(positions, counts)]
