"""How the next token is chosen: the settings of one generation call, and the choice
itself (greedy or nucleus sampling) from a step's logits."""

import math
from dataclasses import dataclass, field
from typing import FrozenSet, Optional

import torch
import torch.nn.functional as F

from .hparams import whole_number


@dataclass(frozen=True)
class Sampling:
    """The settings of one generation call, checked once when made.

    temperature: 0 or less is greedy (kept as 0.0); top_p: the nucleus mass in [0, 1];
    max_gen_len: new tokens per row at most (None: up to the cache's end); stop_ids:
    tokens that end a row (not returned)."""

    temperature: float = 0.6
    top_p: float = 0.9
    max_gen_len: Optional[int] = None
    stop_ids: FrozenSet[int] = field(default_factory=frozenset)

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise the values in place once
        temperature = _number("temperature", self.temperature, math.isfinite,
                              "a finite number (0 or less: greedy)")
        # One greedy value: the steps that take it as an input then need one graph for it.
        set_(self, "temperature", max(temperature, 0.0))
        set_(self, "top_p", _number("top_p", self.top_p, lambda v: 0 <= v <= 1,
                                    "a number in [0, 1]"))
        set_(self, "max_gen_len", _gen_len(self.max_gen_len))
        set_(self, "stop_ids", frozenset(self.stop_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def budget(self, prompt_len: int, max_seq_len: int) -> int:
        """New tokens a prompt of this length may get: within max_gen_len and the cache."""
        limit = max_seq_len - 1 if self.max_gen_len is None else self.max_gen_len
        return max(0, min(limit, max_seq_len - prompt_len))


def _number(name: str, value, valid, rule: str) -> float:
    """value as a float (Python, numpy or 0-d tensor numbers), or a ValueError."""
    try:
        number = None if isinstance(value, (bool, str, bytes)) else float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not valid(number):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return number


def _gen_len(value) -> Optional[int]:
    if value is None:
        return None
    number = whole_number(value)
    if number is None:
        raise ValueError(f"max_gen_len must be a whole number of tokens (or None for "
                         f"max_seq_len - 1), got {value!r}")
    if number < 0:
        raise ValueError(f"max_gen_len must be >= 0, got {number}")
    return number


def nucleus_sorted(probs: torch.Tensor, p):
    """probs (bsz, vocab) sorted, most likely first, with everything past the smallest set
    whose mass reaches p zeroed (the most likely token is always kept); and the order."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    return sorted_probs.masked_fill(mass_before > p, 0.0), order


def draw(weights: torch.Tensor) -> torch.Tensor:
    """One index per row, with probability proportional to `weights` (non-negative): an
    exponential race (argmax of weight / Exp(1) noise), which picks like torch.multinomial
    but without a host synchronisation, so it can live inside a CUDA graph."""
    noise = torch.empty_like(weights).exponential_(1)
    return torch.argmax(weights / noise, dim=-1)


def sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling: draw from the smallest set of most likely tokens whose mass
    reaches p (the most likely token is always kept). probs: (bsz, vocab) -> (bsz, 1)."""
    kept, order = nucleus_sorted(probs, p)
    return torch.gather(order, -1, draw(kept).unsqueeze(-1))


def is_sampled(temperature) -> bool:
    """Whether a step samples: a positive temperature, or a 0-d tensor (how a compiled
    step takes a sampling temperature as an input)."""
    return isinstance(temperature, torch.Tensor) or temperature > 0


def pick(logits: torch.Tensor, temperature, top_p):
    """Next tokens (bsz,) from float32 logits (bsz, vocab): greedy when temperature is a
    number <= 0, else top-p sampling at that temperature; and each chosen token's
    log-probability under the unscaled distribution. For sampling, temperature and top_p
    may be 0-d tensors: a compiled step then takes them as inputs instead of compiling
    their values in, and serves every setting."""
    if is_sampled(temperature):
        tokens = sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p)[:, 0]
    else:
        tokens = torch.argmax(logits, dim=-1)
    logprobs = F.log_softmax(logits, dim=-1).gather(-1, tokens[:, None])[:, 0]
    return tokens, logprobs


def decode_step(model, tokens, positions, kv_len: int, temperature, top_p):
    """The plain decode step: feed one token per row at its position (an int for rows
    that are all at one position, else a (bsz,) tensor); return the next (tokens,
    logprobs). graphs.py compiles and captures this same function."""
    hidden = model.forward_hidden(tokens[:, None], positions, kv_len=kv_len)
    return pick(model.output(hidden[:, 0]).float(), temperature, top_p)
