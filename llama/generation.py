"""`Llama`: build a model from a checkpoint folder and generate with it.

Every public method turns its inputs into prompt token lists (see prompts.py), then runs
the one generation core, `Llama.decode_steps`, and shapes its output. The core prefills
all prompts of a batch together (rows of different lengths included; long prompts in
chunks), then decodes one token per row per step, each row at its own position in the
KV cache. Text-level rules (stop strings, streamed deltas) live in text.TextRow.
"""

import contextlib
import math
import numbers
import operator
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Set, Tuple, TypedDict

import torch
import torch.nn.functional as F

from . import allreduce, checkpoint, distributed
from .decode import GraphedDecoder, HostCopy, decode_step, pick, sample_top_p, to_device
from .model import ModelArgs, Transformer, skip_fairscale_init
from .prompts import (
    B_INST,
    B_SYS,
    E_INST,
    E_SYS,
    SPECIAL_TAGS,
    UNSAFE_ERROR,
    Dialog,
    Message,
    Role,
    chat_prompt,
    dialog_prompt_tokens,
    infilling_prompt_tokens,
    require_infilling,
)
from .text import TextRow
from .tokenizer import Tokenizer

# What Meta's `llama/generation.py` defines, so that code importing these names from
# `llama.generation` (rather than from `llama`) runs unchanged.
__all__ = [
    "B_INST", "B_SYS", "E_INST", "E_SYS", "SPECIAL_TAGS", "UNSAFE_ERROR", "ChatPrediction",
    "CompletionPrediction", "Dialog", "InfillingPrediction", "Llama", "Message", "Role",
    "dialog_prompt_tokens", "infilling_prompt_tokens", "sample_top_p",
]


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class InfillingPrediction(TypedDict, total=False):
    generation: str
    full_text: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def check_fits(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, before allocating, a model whose weights plus KV cache exceed the free
    memory of a CUDA device, saying both numbers and what to lower."""
    if device.type != "cuda":
        return
    world = distributed.model_parallel_world_size()
    size = torch.finfo(dtype).bits // 8
    weights = args.num_params() * size // world
    cache = args.kv_cache_bytes(size) // world
    free, _ = torch.cuda.mem_get_info(device)
    if weights + cache > free:
        gib = 2**30
        raise MemoryError(
            f"this rank needs {weights / gib:.1f} GiB of weights plus {cache / gib:.1f} GiB of "
            f"KV cache ({args.max_batch_size} x {args.max_seq_len} tokens) but the GPU has "
            f"{free / gib:.1f} GiB free; lower max_seq_len or max_batch_size, or use more GPUs"
        )


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: Optional[str] = None,
        max_seq_len: int = 2048,
        max_batch_size: int = 4,
        model_parallel_size: Optional[int] = None,
        *,
        seed: int = 1,
        device=None,
        dtype: Optional[torch.dtype] = None,
    ) -> "Llama":
        """Load a model folder and its tokenizer: Meta's format (`params.json`,
        `consolidated.NN.pth`) or a Hugging Face Llama folder (`config.json`, safetensors).

        Works in a plain Python process (a one-process group is made on the spot) and
        under `torchrun --nproc_per_node N`; the checkpoint's shards are re-split for N.
        The KV cache holds `max_batch_size` sequences of `max_seq_len` tokens.
        tokenizer_path defaults to `<ckpt_dir>/tokenizer.model`; device to CUDA, else MPS,
        else CPU; dtype to bf16 on CUDA (fp16 without bf16), fp16 on MPS, float32 on CPU.
        All ranks must use the same `seed` so that they sample the same tokens.
        """
        if max_seq_len < 1 or max_batch_size < 1:
            raise ValueError(f"max_seq_len ({max_seq_len}) and max_batch_size "
                             f"({max_batch_size}) must be at least 1")
        device = torch.device(device) if device is not None else distributed.default_device()
        dtype = dtype or distributed.default_dtype(device)
        mp_size = distributed.initialize(model_parallel_size, device)
        torch.manual_seed(seed)
        if distributed.local_rank() > 0:
            sys.stdout = open(os.devnull, "w")

        start = time.time()
        ckpt_dir = Path(ckpt_dir)
        if not ckpt_dir.is_dir():
            raise FileNotFoundError(f"checkpoint folder {ckpt_dir} does not exist")
        rank = distributed.model_parallel_rank()
        params, state, default_tokenizer = checkpoint.load_folder(ckpt_dir, rank, mp_size)
        tokenizer = Tokenizer(str(tokenizer_path or default_tokenizer))
        if params.get("vocab_size", -1) > 0 and params["vocab_size"] != tokenizer.n_words:
            raise ValueError(
                f"{ckpt_dir} says vocab_size {params['vocab_size']} but the tokenizer has "
                f"{tokenizer.n_words} pieces; use the tokenizer.model of this model"
            )
        params["vocab_size"] = tokenizer.n_words
        rows = state["tok_embeddings.weight"].shape[0] if "tok_embeddings.weight" in state else None
        if rows is not None and rows != tokenizer.n_words:
            raise ValueError(
                f"the checkpoint in {ckpt_dir} embeds {rows} tokens but the tokenizer has "
                f"{tokenizer.n_words} pieces; use the tokenizer.model shipped with these weights"
            )
        model = Llama.empty_model(ModelArgs(max_seq_len=max_seq_len,
                                            max_batch_size=max_batch_size, **params),
                                  device, dtype)
        checkpoint.load_into(model, state, str(ckpt_dir), device, dtype)
        print(f"Loaded in {time.time() - start:.2f} seconds")
        return Llama(model, tokenizer)

    @staticmethod
    def empty_model(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> Transformer:
        """A Transformer whose KV cache and RoPE table are on `device`; its parameters are
        placeholders until `checkpoint.load_into` assigns the real ones."""
        check_fits(args, device, dtype)
        with default_dtype(dtype), torch.device(device), skip_fairscale_init():
            return Transformer(args).requires_grad_(False)  # inference only

    @staticmethod
    def from_preset(
        name: str,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        *,
        tokenizer_path: Optional[str] = None,
        seed: int = 1,
        device=None,
        dtype: Optional[torch.dtype] = None,
        **overrides,
    ) -> "Llama":
        """A model with the real shapes of a Code Llama size ("7b", "13b", "34b", "70b",
        "tiny") and random weights made on the device: for benchmarks, no download needed.
        Without `tokenizer_path` only the token-level API (`generate`, `model`) works, and
        `generate` runs to max_gen_len unless given a stop_token."""
        device = torch.device(device) if device is not None else distributed.default_device()
        dtype = dtype or distributed.default_dtype(device)
        distributed.initialize(model_parallel_size, device)
        torch.manual_seed(seed)
        tokenizer = Tokenizer(tokenizer_path) if tokenizer_path else None
        if tokenizer is not None:
            overrides["vocab_size"] = tokenizer.n_words
        args = ModelArgs.from_name(name, max_seq_len=max_seq_len,
                                   max_batch_size=max_batch_size, **overrides)
        model = Llama.empty_model(args, device, dtype)
        state = checkpoint.random_state(model, seed + distributed.model_parallel_rank(),
                                        device, dtype)
        checkpoint.load_into(model, state, f"random {name}", device, dtype)
        return Llama(model, tokenizer)

    def __init__(self, model: Transformer, tokenizer: Optional[Tokenizer]):
        """Wrap a loaded model. On CUDA its projections are fused and decode steps replay
        CUDA graphs (see `configure`)."""
        self.model = model
        self.tokenizer = tokenizer
        # Prompt positions per forward pass: bounds activation memory (~2 GB for 7B at
        # 16k), while prompts up to 16k run in one pass (later chunks use slower kernels).
        self.prefill_chunk = 16384
        self.generating = False  # decode_steps running (or a stream paused inside it)
        on_cuda = model.rope.device.type == "cuda"
        if on_cuda:
            model.fuse()
        self._make_runners(dict(cuda_graphs=True, compile=False, symmetric_memory=False,
                                launch_ahead=on_cuda))

    def configure(self, cuda_graphs: Optional[bool] = None, compile: Optional[bool] = None,
                  prefill_chunk: Optional[int] = None,
                  symmetric_memory: Optional[bool] = None,
                  launch_ahead: Optional[bool] = None) -> "Llama":
        """Choose how prompts and decode steps run. Options left out keep their current
        values (at first: CUDA graphs on, no compilation, 16384-position prefill chunks, no
        symmetric memory, launching ahead on CUDA only); `generator.settings` shows them
        (but for prefill_chunk, which is `generator.prefill_chunk`).
        cuda_graphs: on CUDA, replay decode steps from CUDA graphs (else run them eagerly).
        compile: compile decode steps with torch.compile before capturing them (fastest;
        compilation on first use of each batch size rounded up to a power of two, greedy
        or sampled (one for any temperature and top_p), takes about a minute for 7B and
        three for 13B on an H200 machine), and compile the prefill forward pass of each
        prompt's first chunk, on any device, with dynamic shapes (one compilation serves
        every prompt length; a 16k-token 7B prefill takes 470 ms instead of 610 on an
        H200).
        prefill_chunk: prompt positions per forward pass (default 16384); larger chunks
        prefill long prompts faster and need more activation memory (a 100k-token prompt
        on 7B: 7.4 s in one pass, 10.8 s in 8k chunks, on an H200).
        symmetric_memory: at MP>1 on CUDA, end each attention and feed-forward block of a
        forward pass of at most max_batch_size tokens in all (every decoding step) with
        one kernel that sums the ranks' partial results through symmetric memory, adds the
        residual and applies the next RMSNorm, instead of an NCCL all-reduce and two more
        kernels (llama/allreduce.py): 13B at MP=2 on two H200s decoded 1.51-1.65x as
        fast as MP=1 on the same machine (225.6 against 136.7 tokens/s at best; with NCCL:
        169.5 vs 131.7). It needs GPUs that can write into each other's memory (tested
        over NVLink), so it is opt-in. Ignored at MP=1.
        launch_ahead: launch each decode step before the previous step's tokens reach the
        host (from the second step on), so that the GPU keeps computing while the host
        reads tokens, runs stop rules and the caller's code, up to one step's time of it
        (see decode_loop). A generation that ends on a stop token or stop string runs one
        wasted step, which also draws random numbers when sampling: later sampled calls
        then differ from those made with launch_ahead=False (each is reproducible). On by
        default on CUDA; on the CPU, where a step runs before its call returns, it would
        only delay each token by a step.
        A call that raises changes nothing."""
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive number of positions, "
                             f"got {prefill_chunk}")
        given = (("cuda_graphs", cuda_graphs), ("compile", compile),
                 ("symmetric_memory", symmetric_memory), ("launch_ahead", launch_ahead))
        settings = {**self.settings,
                    **{name: bool(value) for name, value in given if value is not None}}
        if any(settings[name] != self.settings[name]
               for name in ("cuda_graphs", "compile", "symmetric_memory")):
            self._make_runners(settings)
        else:  # graphs captured and code compiled so far stay valid
            self.settings = settings
        if prefill_chunk is not None:
            self.prefill_chunk = prefill_chunk
        return self

    def _make_runners(self, settings: dict) -> None:
        """Make the decode-step runner and compiled prefill that `settings` ask for; they
        become self.settings only once that has worked."""
        on_cuda = self.model.rope.device.type == "cuda"
        compile = settings["compile"]
        peers = None
        if settings["symmetric_memory"]:  # None where it cannot run
            peers = self.model.peers or allreduce.enable(self.model)
        graphed = (GraphedDecoder(self.model, compile)
                   if on_cuda and settings["cuda_graphs"] else None)
        compiled = torch.compile(self.model.forward_hidden, dynamic=True) if compile else None
        self.model.peers = peers
        self.graphed: Optional[GraphedDecoder] = graphed
        self.compiled_prefill = compiled
        self.settings = settings

    def prefill_forward(self, tokens: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Hidden states of prompt positions [start, end) (tokens: those columns), through
        the compiled forward pass if configure(compile=True) made one. Only first chunks
        are compiled: later ones attend with a lower-right causal bias, an object that
        torch.compile cannot build in a graph (it would break the graph at every layer)."""
        if self.compiled_prefill is None or start > 0:
            return self.model.forward_hidden(tokens, start, kv_len=end)
        # Compiled code runs under no_grad, not inference_mode (pytorch/pytorch#180823).
        with torch.inference_mode(False), torch.no_grad():
            return self.compiled_prefill(tokens, start, kv_len=end)

    # ---- the generation core ----------------------------------------------------------

    def check_batch(self, prompt_tokens: Sequence[List[int]]) -> None:
        params = self.model.params
        if len(prompt_tokens) > params.max_batch_size:
            raise ValueError(
                f"{len(prompt_tokens)} prompts exceed max_batch_size={params.max_batch_size}; "
                f"pass fewer prompts per call or build with a larger max_batch_size"
            )
        vocab = self.model.vocab_size
        for i, p in enumerate(prompt_tokens):
            if not isinstance(p, (list, tuple)) or not all(
                    type(t) is int or (isinstance(t, numbers.Integral) and not isinstance(t, bool))
                    for t in p):
                raise ValueError(f"prompt_tokens must be a list of token-id lists (one list of "
                                 f"ints per prompt), but item {i} is {p!r}; wrap a single "
                                 f"prompt in a list")
            if not p:
                raise ValueError(f"prompt {i} has no tokens")
            if min(p) < 0 or max(p) >= vocab:
                bad = next(t for t in p if not 0 <= t < vocab)
                raise ValueError(f"prompt {i} holds token id {bad}, outside the vocabulary "
                                 f"[0, {vocab}); encode text with this model's tokenizer")
            if len(p) > params.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens, more than max_seq_len="
                    f"{params.max_seq_len}; shorten it or build with a larger max_seq_len"
                )

    @torch.inference_mode()
    def prefill(self, prompt_tokens: List[List[int]], temperature: float, top_p: float,
                prompt_logprobs: Optional[List[List[float]]]):
        """Run every prompt through the model in chunks of `prefill_chunk` positions (all
        rows at once; placeholder tokens past a row's end are overwritten by that row's
        own decode steps before anything reads them). Returns the first (tokens, logprobs)
        after each prompt, and fills `prompt_logprobs` if it is a list."""
        model = self.model
        device = model.rope.device
        lens = [len(p) for p in prompt_tokens]
        padded = torch.zeros((len(lens), max(lens)), dtype=torch.long, device=device)
        for i, p in enumerate(prompt_tokens):
            padded[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
        last_index = torch.tensor(lens, device=device) - 1
        last_hidden = torch.empty((len(lens), model.params.dim), device=device,
                                  dtype=model.norm.weight.dtype)
        scores = []
        for start in range(0, max(lens), self.prefill_chunk):
            end = min(start + self.prefill_chunk, max(lens))
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
        return pick(model.output(last_hidden).float(), temperature, top_p)

    @torch.inference_mode()
    def decode_steps(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float,
        top_p: float,
        stop_ids: Set[int],
        prompt_logprobs: Optional[List[List[float]]] = None,
        on_token: Optional[Callable[[int, int, float], bool]] = None,
    ) -> Iterator[List[Optional[Tuple[int, float]]]]:
        """The generation core. Yield, once per step, each row's new (token, logprob), or
        None for a row that has finished. A row finishes on a token of `stop_ids` (not
        yielded) or after min(max_gen_len, max_seq_len - len(prompt)) tokens.

        If `prompt_logprobs` is a list, it receives each prompt's token log-probabilities
        (0.0 for the first token, which nothing predicts). `on_token(row, token, logprob)`
        is called for each new token; returning True finishes that row (stop strings).
        """
        self.check_batch(prompt_tokens)
        temperature, top_p = sampling_settings(temperature, top_p)
        max_seq_len = self.model.params.max_seq_len
        lens = [len(p) for p in prompt_tokens]
        budgets = [max(0, min(max_gen_len, max_seq_len - n)) for n in lens]
        if not any(budgets) and prompt_logprobs is None:
            return  # nothing to generate and nothing to score
        with self.exclusive():
            yield from self.decode_loop(prompt_tokens, lens, budgets, temperature, top_p,
                                        stop_ids, prompt_logprobs, on_token)

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

    def decode_loop(self, prompt_tokens, lens, budgets, temperature, top_p, stop_ids,
                    prompt_logprobs, on_token):
        """decode_steps after its checks: prefill, then one decode step per yield.

        With launch_ahead, the step that feeds this step's tokens back is launched before
        those tokens are read: the GPU computes it while the host copies the tokens out,
        yields them and runs the caller's code. It is launched for every row with budget
        left, so a row that turns out to have finished (a stop token or stop string) wastes
        its share of that step, and a generation that ends that way wastes a whole step.
        The prefill's tokens are handed out before the first step is launched: that launch
        may capture a CUDA graph or compile the step (seconds to minutes) the first time."""
        max_seq_len = self.model.params.max_seq_len
        ahead = False  # from the second step on (see above)
        tokens, logprobs = self.prefill(prompt_tokens, temperature, top_p, prompt_logprobs)
        copied = HostCopy(tokens, logprobs)

        # Where each row's next token goes. A prompt that fills the cache has no budget; its
        # (discarded) steps rewrite the last slot instead of running past the cache.
        positions = [min(n, max_seq_len - 1) for n in lens]
        produced = [0] * len(lens)
        active = [b > 0 for b in budgets]
        while any(active):
            launched = None
            # Launched if some row may need it: one with budget left after this token.
            if ahead and any(a and n + 1 < b for a, n, b in zip(active, produced, budgets)):
                launched = self.step(tokens, positions, temperature, top_p)
            step: List[Optional[Tuple[int, float]]] = [None] * len(lens)
            for i, (tok, lp) in enumerate(zip(*copied.wait())):
                if not active[i]:
                    continue
                if tok in stop_ids:
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
                launched = self.step(tokens, positions, temperature, top_p)
            tokens, logprobs = launched
            copied = HostCopy(tokens, logprobs)
            ahead = self.settings["launch_ahead"]
            # Finished rows keep their position so they never run past the cache.
            positions = [p + 1 if a else p for p, a in zip(positions, active)]

    def step(self, tokens, positions: List[int], temperature: float, top_p: float):
        """One decode step: from a CUDA graph where possible, else eagerly. Rows that are
        all at one position attend over exactly their keys with no mask."""
        kv_len = max(positions) + 1
        if self.graphed is not None and self.graphed.usable(kv_len):
            start = to_device(positions, tokens.device)
            return self.graphed(tokens, start, kv_len, temperature, top_p)
        same = all(p == positions[0] for p in positions)
        start = positions[0] if same else to_device(positions, tokens.device)
        return decode_step(self.model, tokens, start, kv_len, temperature, top_p)

    def run(self, prompt_tokens, max_gen_len, temperature, top_p, stop_ids, decode,
            stop=None, echo=False, prompt_logprobs=None) -> List[TextRow]:
        """Run the generation core to the end; one TextRow (tokens, logprobs, text cut at
        the first stop string) per prompt."""
        stop = check_stop(stop)
        rows = [TextRow(decode, stop, p if echo else ()) for p in prompt_tokens]
        if not prompt_tokens:
            return rows
        for _ in self.decode_steps(prompt_tokens, self.default_gen_len(max_gen_len),
                                   temperature, top_p, stop_ids, prompt_logprobs,
                                   on_token=lambda i, tok, lp: rows[i].add(tok, lp)):
            pass
        return rows

    def stream(self, prompt_tokens, max_gen_len, temperature, top_p, stop_ids, decode,
               stop=None) -> Iterator[str]:
        """Run the generation core on one prompt, yielding its new text as it becomes
        final (the pieces concatenate to the text `run` returns)."""
        row = TextRow(decode, check_stop(stop))
        for _ in self.decode_steps([prompt_tokens], self.default_gen_len(max_gen_len),
                                   temperature, top_p, stop_ids,
                                   on_token=lambda i, tok, lp: row.add(tok, lp)):
            delta = row.delta()
            if delta:
                yield delta
        tail = row.delta(final=True)
        if tail:
            yield tail

    def default_gen_len(self, max_gen_len: Optional[int]) -> int:
        if max_gen_len is None:
            return self.model.params.max_seq_len - 1
        try:  # ints, numpy integers, integer 0-d tensors; not floats or bools
            if isinstance(max_gen_len, bool):
                raise TypeError
            max_gen_len = operator.index(max_gen_len)
        except TypeError:
            raise ValueError(f"max_gen_len must be a whole number of tokens (or None for "
                             f"max_seq_len - 1), got {max_gen_len!r}") from None
        if max_gen_len < 0:
            raise ValueError(f"max_gen_len must be >= 0, got {max_gen_len}")
        return max_gen_len

    # ---- public API ---------------------------------------------------------------------

    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        stop_token: Optional[int] = None,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Generate from token lists. Returns each row's new tokens (prompt included with
        `echo`) and, with `logprobs`, the log-probability of each returned token (0.0 for
        the first prompt token). Generation stops at `stop_token` (default: EOS), which is
        not returned."""
        if stop_token is not None:
            stop_ids = {stop_token}
        else:  # a model from from_preset without a tokenizer has no EOS: run to max_gen_len
            stop_ids = {self.tokenizer.eos_id} if self.tokenizer is not None else set()
        prompt_tokens = [p.tolist() if hasattr(p, "tolist") else p for p in as_batch(
            prompt_tokens, "prompt_tokens", "wrap a single prompt's tokens in a list")]
        _, tokens, lps = self.echoed_run(prompt_tokens, max_gen_len, temperature, top_p,
                                         stop_ids, lambda t: "", None, echo, logprobs)
        return tokens, (lps if logprobs else None)

    def echoed_run(self, prompt_tokens, max_gen_len, temperature, top_p, stop_ids, decode,
                   stop, echo: bool, logprobs: bool):
        """run(), plus each row's returned tokens and logprobs: with `echo` the prompt's
        come first (the prompt scored by the model, 0.0 for its first token)."""
        prompt_lp = [] if logprobs and echo else None
        rows = self.run(prompt_tokens, max_gen_len, temperature, top_p, stop_ids, decode,
                        stop, echo, prompt_lp)
        tokens = [(list(p) if echo else []) + r.tokens for p, r in zip(prompt_tokens, rows)]
        lps = [(prompt_lp[i] if prompt_lp is not None else []) + r.logprobs
               for i, r in enumerate(rows)]
        return rows, tokens, lps

    def pieces(self, tokens: List[int]) -> List[str]:
        return [self.tokenizer.token_piece(t) for t in tokens]

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        stop: Optional[List[str]] = None,
    ) -> List[CompletionPrediction]:
        """Continue each prompt. With `echo` the prompt is part of the result (and of
        "tokens"/"logprobs"). Each row ends at EOS, after `max_gen_len` tokens (default
        max_seq_len - 1, within max_seq_len), or at the first of the `stop` strings,
        which is left out; "tokens" then keeps the tokens wholly before it."""
        prompts = as_batch(prompts, "prompts",
                           "wrap a single prompt in a list, or use stream_completion")
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        rows, tokens, lps = self.echoed_run(prompt_tokens, max_gen_len, temperature, top_p,
                                            {self.tokenizer.eos_id}, self.tokenizer.decode,
                                            stop, echo, logprobs)
        if logprobs:
            return [{"generation": row.text, "tokens": self.pieces(t), "logprobs": lp}
                    for row, t, lp in zip(rows, tokens, lps)]
        return [{"generation": row.text} for row in rows]

    def stream_completion(self, prompt: str, temperature: float = 0.6, top_p: float = 0.9,
                          max_gen_len: Optional[int] = None,
                          stop: Optional[List[str]] = None) -> Iterator[str]:
        """text_completion for one prompt, yielding the new text as it is produced."""
        return self.stream(self.tokenizer.encode(prompt, bos=True, eos=False), max_gen_len,
                           temperature, top_p, {self.tokenizer.eos_id},
                           self.tokenizer.decode, stop)

    def infilling_prompts(self, prefixes: List[str], suffixes: List[str], suffix_first: bool):
        require_infilling(self.tokenizer)
        fix = "wrap a single prefix and suffix in lists, or use stream_infilling"
        prefixes = as_batch(prefixes, "prefixes", fix)
        suffixes = as_batch(suffixes, "suffixes", fix)
        if len(prefixes) != len(suffixes):
            raise ValueError(f"got {len(prefixes)} prefixes but {len(suffixes)} suffixes; "
                             f"pass one suffix per prefix")
        return [infilling_prompt_tokens(self.tokenizer, pre, suf, suffix_first)
                for pre, suf in zip(prefixes, suffixes)]

    def text_infilling(
        self,
        prefixes: List[str],
        suffixes: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        suffix_first: bool = False,
        stop: Optional[List[str]] = None,
    ) -> List[InfillingPrediction]:
        """Fill the middle between each prefix and suffix (PSM format, or SPM with
        `suffix_first`). A row ends at <EOT>, EOS, `max_gen_len` or a `stop` string."""
        prompt_tokens = self.infilling_prompts(prefixes, suffixes, suffix_first)
        rows = self.run(prompt_tokens, max_gen_len, temperature, top_p, self.infill_stop_ids,
                        self.tokenizer.decode_infilling, stop)
        results = []
        for row, pre, suf in zip(rows, prefixes, suffixes):
            result = {"generation": row.text}
            if logprobs:
                result.update(logprobs=row.logprobs, tokens=self.pieces(row.tokens))
            result["full_text"] = pre + row.text + suf
            results.append(result)
        return results

    @property
    def infill_stop_ids(self) -> Set[int]:
        return {self.tokenizer.eot_id, self.tokenizer.eos_id}

    def stream_infilling(self, prefix: str, suffix: str, temperature: float = 0.6,
                         top_p: float = 0.9, max_gen_len: Optional[int] = None,
                         suffix_first: bool = False,
                         stop: Optional[List[str]] = None) -> Iterator[str]:
        """text_infilling for one prefix/suffix pair, yielding the middle as it is made."""
        (prompt,) = self.infilling_prompts([prefix], [suffix], suffix_first)
        return self.stream(prompt, max_gen_len, temperature, top_p, self.infill_stop_ids,
                           self.tokenizer.decode_infilling, stop)

    def chat_prompt(self, dialog: Dialog) -> Tuple[List[int], bool]:
        """(prompt tokens, unsafe) of a dialog in the tokenizer's chat format: the
        70B-Instruct `<step>` format when the tokenizer has `<step>`, else [INST]."""
        return chat_prompt(self.tokenizer, dialog)

    @property
    def step_format(self) -> bool:
        return self.tokenizer.step_id is not None

    @property
    def chat_stop_ids(self) -> Set[int]:
        return {self.tokenizer.eos_id, self.tokenizer.step_id} - {None}

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        stop: Optional[List[str]] = None,
    ) -> List[ChatPrediction]:
        """Answer each dialog as the assistant (format chosen by `chat_prompt`). Dialogs
        carrying chat tags or control tokens are not run: their content is UNSAFE_ERROR,
        with empty tokens and logprobs. A reply ends at EOS (`<step>` for 70B), at
        `max_gen_len` or at a `stop` string."""
        dialogs = as_batch(dialogs, "dialogs", "wrap a single dialog in a list")
        for i, dialog in enumerate(dialogs):
            if not isinstance(dialog, (list, tuple)):
                raise ValueError(f"dialogs must be a list of dialogs, each a list of messages, "
                                 f"but item {i} is a {type(dialog).__name__}; wrap a single "
                                 f"dialog in a list: chat_completion([dialog])")
        prompts = [self.chat_prompt(d) for d in dialogs]  # validates every dialog first
        safe = [i for i, (_, unsafe) in enumerate(prompts) if not unsafe]
        rows = [TextRow(self.tokenizer.decode) for _ in dialogs]
        if safe:
            ran = self.run([prompts[i][0] for i in safe], max_gen_len, temperature, top_p,
                           self.chat_stop_ids, self.tokenizer.decode, stop)
            for i, row in zip(safe, ran):
                rows[i] = row
        results = []
        for (_, unsafe), row in zip(prompts, rows):
            message = {"role": "assistant"}
            if self.step_format:
                message["destination"] = "user"
            message["content"] = UNSAFE_ERROR if unsafe else row.text
            result = {"generation": message}
            if logprobs:
                result.update(tokens=self.pieces(row.tokens), logprobs=row.logprobs)
            results.append(result)
        return results

    def stream_chat_completion(self, dialog: Dialog, temperature: float = 0.6,
                               top_p: float = 0.9, max_gen_len: Optional[int] = None,
                               stop: Optional[List[str]] = None) -> Iterator[str]:
        """chat_completion for one dialog, yielding the reply's text as it is produced."""
        prompt, unsafe = self.chat_prompt(dialog)
        if unsafe:
            return iter([UNSAFE_ERROR])
        return self.stream(prompt, max_gen_len, temperature, top_p, self.chat_stop_ids,
                           self.tokenizer.decode, stop)


def as_batch(value, name: str, fix: str) -> list:
    """A batch argument (one item per prompt) as a list. Any sequence or iterable will do
    (list, tuple, array, tensor, generator); a lone string, bytes or dict is refused, since
    iterating it would silently make a batch of its characters or keys."""
    if isinstance(value, (str, bytes, dict)):
        raise ValueError(f"{name} must be a list with one item per prompt, got "
                         f"{type(value).__name__}; {fix}")
    if hasattr(value, "tolist"):  # a tensor or an array
        return value.tolist()
    try:
        return list(value)
    except TypeError:
        raise ValueError(f"{name} must be a list with one item per prompt, got "
                         f"{type(value).__name__}; {fix}") from None


def sampling_settings(temperature, top_p) -> Tuple[float, float]:
    """temperature and top_p as floats (Python, numpy or 0-d tensor numbers), checked:
    temperature finite (0 or less means greedy), top_p in [0, 1]."""
    checked = []
    for name, value, valid, rule in (
            ("temperature", temperature, math.isfinite, "a finite number (0 or less: greedy)"),
            ("top_p", top_p, lambda v: 0 <= v <= 1, "a number in [0, 1]")):
        try:
            number = None if isinstance(value, (bool, str, bytes)) else float(value)
        except (TypeError, ValueError):
            number = None
        if number is None or not valid(number):
            raise ValueError(f"{name} must be {rule}, got {value!r}")
        checked.append(number)
    return checked[0], checked[1]


def check_stop(stop) -> List[str]:
    """Stop strings as a list; a bare string is one stop string."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
    return list(stop)
