"""The generation core: prefill a batch of prompts, then decode one token per row per
step, each row at its own position in the KV cache, until every row has finished.

Every public method of `Llama` ends here, through `Engine.generate`. How each step runs
(eagerly, from CUDA graphs, compiled) is one decoder object chosen by `configure`; the
loop itself is the same for all of them. With a draft (speculative.py) the loop is
Speculation.steps instead, which yields steps of the same shape.
"""

import contextlib
import numbers
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import allreduce, distributed
from .graphs import EagerDecoder, GraphedDecoder, graphs_available
from .hparams import whole_number
from .sampling import Sampling, pick

DECODE_MODES = ("eager", "graphs", "compiled")

# One step's result per row: its new (token, logprob), or None for a row that has finished
# (or, when speculating, that has no token at this index of the round: speculative.py).
Step = List[Optional[Tuple[int, float]]]


class HostCopy:
    """Small device tensors on their way to the host. The copies are queued now, behind the
    step that computes the tensors; wait() waits for those copies only, not for steps
    launched after them."""

    def __init__(self, *tensors: torch.Tensor):
        self.done = None
        if not tensors[0].is_cuda:  # ready: copies, as a graphed step's outputs are
            self.host = [t.clone() for t in tensors]  # rewritten by its next run
            return
        self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                     .copy_(t, non_blocking=True) for t in tensors]
        self.done = torch.cuda.Event()
        # The copies run on the stream of the tensors' device, which need not be the
        # current device.
        self.done.record(torch.cuda.current_stream(tensors[0].device))

    def wait(self) -> List[list]:
        """The tensors as (nested) lists."""
        if self.done is not None:
            self.done.synchronize()
        return [t.tolist() for t in self.host]


class Engine:
    """Generation over one model and its KV cache, one call at a time."""

    def __init__(self, model):
        self.model = model
        self.generating = False  # a generation running (or a stream paused inside it)
        on_cuda = model.rope.device.type == "cuda"
        # Launch each decode step before reading the previous step's tokens (see
        # _steps). On the CPU a step runs before its call returns: no gain there.
        self.launch_ahead = on_cuda
        self.settings = {}
        self.speculation = None  # speculative.Speculation: see speculate
        self.configure(decode="graphs" if graphs_available(model) else "eager",
                       prefill_chunk=16384, symmetric_memory=False)

    def configure(self, decode: Optional[str] = None, prefill_chunk: Optional[int] = None,
                  symmetric_memory: Optional[bool] = None) -> None:
        """See Llama.configure. Checks everything before it changes anything."""
        given = dict(decode=decode, prefill_chunk=prefill_chunk,
                     symmetric_memory=symmetric_memory)
        new = {**self.settings, **{k: v for k, v in given.items() if v is not None}}
        if new["decode"] not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, "
                             f"got {new['decode']!r}")
        if new["decode"] != "eager" and self.model.rope.device.type == "cuda" \
                and not graphs_available(self.model):
            raise ValueError(f"decode={new['decode']!r} on CUDA needs Triton (it comes with "
                             f"PyTorch's Linux CUDA wheels); use decode='eager'")
        if new["decode"] == "graphs" and not graphs_available(self.model):
            raise ValueError("decode='graphs' needs a CUDA device with Triton; use "
                             "decode='eager' or decode='compiled' here")
        chunk = whole_number(new["prefill_chunk"])
        if chunk is None or chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive whole number of positions, "
                             f"got {new['prefill_chunk']!r}")
        new["prefill_chunk"] = chunk
        if not isinstance(new["symmetric_memory"], bool):
            raise ValueError(f"symmetric_memory must be True or False, "
                             f"got {new['symmetric_memory']!r}")
        if any(new[k] != self.settings.get(k) for k in ("decode", "symmetric_memory")):
            self._make_runners(new)
        self.settings = new

    def speculate(self, speculation, draft_tokens: int) -> None:
        """Decode through `speculation` (speculative.configure's), or plainly if None."""
        self.speculation = speculation
        name = None if speculation is None else speculation.drafter.name
        self.settings = {**self.settings, "draft": name, "draft_tokens": draft_tokens}

    def _make_runners(self, settings: dict) -> None:
        model, mode = self.model, settings["decode"]
        compile = mode == "compiled"
        decoder = EagerDecoder(model) if mode == "eager" else GraphedDecoder(model, compile)
        # Before compiling the prefill, which binds the model's forward_hidden as it is.
        if settings["symmetric_memory"] and not allreduce.installed(model):
            allreduce.enable(model)  # leaves the model as it is where it cannot run
        elif not settings["symmetric_memory"]:
            allreduce.uninstall(model)
        prefill = torch.compile(model.forward_hidden, dynamic=True) if compile else None
        self.decoder, self.compiled_prefill = decoder, prefill

    def prefill_forward(self, tokens: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Hidden states of prompt positions [start, end) (tokens: those columns). Under
        decode='compiled' a prompt's first chunk runs compiled; later ones attend with a
        lower-right causal bias, which torch.compile cannot build inside a graph."""
        if self.compiled_prefill is None or start > 0:
            return self.model.forward_hidden(tokens, start, kv_len=end)
        # Compiled code runs under no_grad, not inference_mode (pytorch/pytorch#180823).
        with torch.inference_mode(False), torch.no_grad():
            return self.compiled_prefill(tokens, start, kv_len=end)

    def check_batch(self, prompt_tokens: Sequence[List[int]]) -> None:
        for i, p in enumerate(prompt_tokens):
            self.check_prompt(i, p)
        max_batch_size = self.model.params.max_batch_size
        if len(prompt_tokens) > max_batch_size:
            raise ValueError(
                f"{len(prompt_tokens)} prompts exceed max_batch_size={max_batch_size}; "
                f"pass fewer prompts per call or build with a larger max_batch_size")

    def check_prompt(self, i: int, p: List[int], label: str = "prompt") -> None:
        """Refuse prompt number i, `p`, if no generation could run it (`label` names
        what the prompt was made from)."""
        params, vocab = self.model.params, self.model.vocab_size
        if not isinstance(p, (list, tuple)) or not all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in p):
            raise ValueError(f"prompt_tokens must be a list of token-id lists (one list of "
                             f"ints per prompt), but item {i} is {p!r}; wrap a single "
                             f"prompt in a list")
        if not p:
            raise ValueError(f"{label} {i} has no tokens")
        if min(p) < 0 or max(p) >= vocab:
            bad = next(t for t in p if not 0 <= t < vocab)
            raise ValueError(f"{label} {i} holds token id {bad}, outside the vocabulary "
                             f"[0, {vocab}); encode text with this model's tokenizer")
        if len(p) > params.max_seq_len:
            raise ValueError(
                f"{label} {i} has {len(p)} tokens, more than max_seq_len="
                f"{params.max_seq_len}; shorten it or build with a larger max_seq_len")

    @torch.inference_mode()
    def prefill(self, prompt_tokens: List[List[int]], sampling: Sampling,
                prompt_logprobs: Optional[List[List[float]]]):
        """Run every prompt through the model in chunks of `prefill_chunk` positions (all
        rows at once; placeholder tokens past a row's end are overwritten by that row's
        own decode steps before anything reads them). Returns the first (tokens, logprobs)
        after each prompt, and fills `prompt_logprobs` if it is a list."""
        model, chunk = self.model, self.settings["prefill_chunk"]
        device = model.rope.device
        lens = [len(p) for p in prompt_tokens]
        padded = torch.zeros((len(lens), max(lens)), dtype=torch.long, device=device)
        for i, p in enumerate(prompt_tokens):
            padded[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
        last_index = torch.tensor(lens, device=device) - 1
        last_hidden = torch.empty((len(lens), model.params.dim), device=device,
                                  dtype=model.norm.weight.dtype)
        scores = []
        for start in range(0, max(lens), chunk):
            end = min(start + chunk, max(lens))
            hidden = self.prefill_forward(padded[:, start:end], start, end)
            here = (last_index >= start) & (last_index < end)
            rows = here.nonzero()[:, 0]
            last_hidden[rows] = hidden[rows, last_index[rows] - start]
            if prompt_logprobs is not None:  # log p(token t+1 | tokens <= t) in this chunk
                logp = F.log_softmax(model.output(hidden).float(), dim=-1)
                targets = torch.cat([padded[:, start + 1:end + 1],
                                     torch.zeros_like(padded[:, :1])], dim=1)[:, : end - start]
                scores.append(logp.gather(-1, targets[..., None])[..., 0])
        if prompt_logprobs is not None:
            table = torch.cat(scores, dim=1).tolist()
            prompt_logprobs.extend([0.0] + row[: n - 1] for row, n in zip(table, lens))
        return pick(model.output(last_hidden).float(), sampling.temperature, sampling.top_p)

    def generate(self, prompt_tokens: List[List[int]], sampling: Sampling,
                 prompt_logprobs: Optional[List[List[float]]] = None,
                 on_token: Optional[Callable[[int, int, float], bool]] = None,
                 ) -> Iterator[Step]:
        """Yield, once per step, each row's new (token, logprob), or None for a row that
        has finished. A row finishes on a token of `sampling.stop_ids` (not yielded) or
        after its budget (Sampling.budget).

        If `prompt_logprobs` is a list, it receives each prompt's token log-probabilities
        (0.0 for the first token, which nothing predicts). `on_token(row, token, logprob)`
        is called for each new token; returning True finishes that row (stop strings).
        The inputs are checked now, not at the first next()."""
        self.check_batch(prompt_tokens)
        max_seq_len = self.model.params.max_seq_len
        budgets = [sampling.budget(len(p), max_seq_len) for p in prompt_tokens]
        if not any(budgets) and prompt_logprobs is None:
            return iter(())  # nothing to generate and nothing to score
        return self._loop(prompt_tokens, budgets, sampling, prompt_logprobs, on_token)

    @contextlib.contextmanager
    def exclusive(self):
        """One generation at a time: rows live in the one KV cache, so a second call while
        a stream is paused would overwrite the stream's rows."""
        if self.generating:
            raise RuntimeError(
                "this Llama is still in the middle of another generation (an unfinished "
                "stream_* iterator, whose rows live in the same KV cache); read that stream "
                "to the end or call its close() first, or build a second Llama")
        self.generating = True
        try:
            yield
        finally:
            self.generating = False

    @torch.inference_mode()
    def _loop(self, prompt_tokens, budgets, sampling: Sampling, prompt_logprobs, on_token):
        if not sampling.greedy:
            # Every rank must draw the same numbers. (Code that draws random numbers on
            # one rank while a stream is paused still makes them drift apart.)
            distributed.sync_random_state(self.model.rope.device)
        with self.exclusive():
            if self.speculation is not None:
                yield from self.speculation.steps(self, prompt_tokens, budgets, sampling,
                                                  prompt_logprobs, on_token)
                return
            yield from self._steps(prompt_tokens, budgets, sampling, prompt_logprobs, on_token)

    def _steps(self, prompt_tokens, budgets, sampling: Sampling, prompt_logprobs, on_token):
        """Prefill, then one decode step per yield.

        Launching ahead (CUDA): the step that feeds this step's tokens back is launched
        before those tokens are read, so the GPU computes it while the host copies the
        tokens out, yields them and runs the caller's code. It is launched for every row
        with budget left, so a row that turns out to have finished (a stop token or stop
        string) wastes its share of that step, and a generation that ends that way wastes
        a whole step. The first step is not launched ahead: it may capture a CUDA graph
        or compile the step, and the prefill's tokens should not wait for that."""
        max_seq_len = self.model.params.max_seq_len
        tokens, logprobs = self.prefill(prompt_tokens, sampling, prompt_logprobs)
        copied = HostCopy(tokens, logprobs)
        # Where each row's next token goes. A prompt that fills the cache has no budget; its
        # (discarded) steps rewrite the last slot instead of running past the cache.
        positions = [min(len(p), max_seq_len - 1) for p in prompt_tokens]
        produced = [0] * len(budgets)
        active = [b > 0 for b in budgets]
        ahead = False
        while any(active):
            launched = None
            if ahead and any(a and n + 1 < b for a, n, b in zip(active, produced, budgets)):
                launched = self.decoder(tokens, positions, sampling)
            step: Step = [None] * len(budgets)
            for i, (tok, lp) in enumerate(zip(*copied.wait())):
                if not active[i]:
                    continue
                if tok in sampling.stop_ids:
                    active[i] = False
                    continue
                step[i] = (tok, lp)
                produced[i] += 1
                stopped = on_token is not None and on_token(i, tok, lp)
                active[i] = produced[i] < budgets[i] and not stopped
            yield step
            if not any(active):
                return
            if launched is None:
                launched = self.decoder(tokens, positions, sampling)
            tokens, logprobs = launched
            copied = HostCopy(tokens, logprobs)
            ahead = self.launch_ahead
            # Finished rows keep their position so they never run past the cache.
            positions = [p + 1 if a else p for p, a in zip(positions, active)]
