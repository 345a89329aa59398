"""`Llama`: the public API. Build a model from a checkpoint folder (loading.py) and
generate with it.

Every public method turns its inputs into prompt token lists (prompts.py), runs the one
generation core (engine.Engine.generate) and shapes its output; text-level rules (stop
strings, streamed deltas) live in text.TextRow.
"""

import numbers
import warnings
from typing import Iterator, List, Optional, Set, Tuple, TypedDict

import torch

from . import drafting, loading, speculative
from .engine import Engine
from .model import Transformer
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
    completion_prompt_tokens,
    dialog_prompt_tokens,
    infilling_prompt_tokens,
    require_infilling,
)
from .sampling import Sampling, sample_top_p
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
        dtype=None,
        quantize: Optional[str] = None,
    ) -> "Llama":
        """Load a model folder and its tokenizer: Meta's format (`params.json`,
        `consolidated.NN.pth`) or a Hugging Face Llama folder (`config.json`, safetensors).

        Works in a plain Python process (a one-process group is made on the spot) and
        under `torchrun --nproc_per_node N`; the checkpoint's shards are re-split for N.
        The KV cache holds `max_batch_size` sequences of `max_seq_len` tokens.
        tokenizer_path defaults to `<ckpt_dir>/tokenizer.model`; device (a torch.device or
        a name such as "cuda:1") to CUDA, else MPS, else CPU; dtype (torch.float32,
        bfloat16 or float16, or its name) to bf16 on CUDA (fp16 without bf16), fp16 on
        MPS, float32 on CPU.
        All ranks must use the same `seed` so that they sample the same tokens.
        quantize: "int8" or "int4" stores the linear layers' weights in 8 or 4 bits
        (quantize.py), quantized one tensor at a time while loading.
        """
        return Llama(*loading.from_checkpoint(ckpt_dir, tokenizer_path, max_seq_len,
                                              max_batch_size, model_parallel_size, seed,
                                              device, dtype, quantize))

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
        dtype=None,
        quantize: Optional[str] = None,
        **overrides,
    ) -> "Llama":
        """A model with the real shapes of a Code Llama size ("7b", "13b", "34b", "70b",
        "tiny") and random weights made on the device: for benchmarks, no download needed.
        Without `tokenizer_path` only the token-level API (`generate`, `model`) works, and
        `generate` runs to max_gen_len unless given a stop_token."""
        return Llama(*loading.from_preset(name, max_seq_len, max_batch_size,
                                          model_parallel_size, tokenizer_path, seed, device,
                                          dtype, quantize, **overrides))

    def __init__(self, model: Transformer, tokenizer: Optional[Tokenizer]):
        """Wrap a loaded model; on CUDA decode steps replay CUDA graphs (see `configure`)."""
        self.model = model
        self.tokenizer = tokenizer
        self.engine = Engine(model)
        self.engine.speculate(None, speculative.DEFAULT_DRAFT_TOKENS)

    def configure(self, decode: Optional[str] = None, prefill_chunk: Optional[int] = None,
                  symmetric_memory: Optional[bool] = None, *,
                  draft=speculative.KEEP, draft_tokens: Optional[int] = None,
                  cuda_graphs: Optional[bool] = None,
                  compile: Optional[bool] = None) -> "Llama":
        """Choose how prompts and decode steps run; options left out keep their values,
        which `generator.settings` shows. A call that raises changes nothing.

        decode: "graphs" (the default on CUDA: each decode step replays a CUDA graph),
        "compiled" (steps compiled by torch.compile, then graphed on CUDA; also each
        prompt's first prefill chunk, with dynamic shapes; the first call of each batch
        size rounded up to a power of two, greedy or sampled, compiles for a minute or
        more), or "eager" (the default elsewhere; graphs need CUDA with Triton).
        prefill_chunk: prompt positions per forward pass (default 16384); larger chunks
        prefill long prompts faster and need more activation memory.
        symmetric_memory: at MP>1 on CUDA, end each attention and feed-forward block of a
        decoding step with one kernel that sums the ranks' partial results through
        symmetric memory, adds the residual and applies the next RMSNorm (allreduce.py),
        instead of an NCCL all-reduce and two more kernels. It needs GPUs that can write
        into each other's memory (tested over NVLink), so it is opt-in. Ignored where it
        cannot run (MP=1, no CUDA).
        draft: speculative decoding (docs/speculative.md): None (off, the default),
        "lookup" (propose the continuation of the latest earlier match of the last few
        tokens in the prompt and the text so far), "int4" (the target's weights in int4,
        quantize.py) or another Llama sharing this one's tokenizer,
        model-parallel size and device, with a KV cache at least as large. Greedy output
        is the same as without a draft; sampled output has the same distribution.
        draft_tokens: tokens proposed per row per round (default 4).
        cuda_graphs, compile: the older spelling of `decode` (deprecated)."""
        if cuda_graphs is not None or compile is not None:
            warnings.warn("configure(cuda_graphs=..., compile=...) is deprecated; use "
                          "configure(decode='eager' | 'graphs' | 'compiled')",
                          DeprecationWarning, stacklevel=2)
            decode = legacy_decode_mode(decode, cuda_graphs, compile)
        k = speculative.draft_tokens_setting(self.engine, draft_tokens)
        drafter = draft if draft is speculative.KEEP else drafting.make_drafter(self, draft)
        speculation = speculative.configure(self.engine, drafter, k)
        self.engine.configure(decode, prefill_chunk, symmetric_memory)
        self.engine.speculate(speculation, k)
        return self

    @property
    def settings(self) -> dict:
        """The options in force (see configure)."""
        return dict(self.engine.settings)

    @property
    def prefill_chunk(self) -> int:
        return self.engine.settings["prefill_chunk"]

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
            if isinstance(stop_token, bool) or not isinstance(stop_token, numbers.Integral):
                raise ValueError(f"stop_token must be one token id (an int), got "
                                 f"{stop_token!r}; to stop at text, use the text methods' "
                                 f"stop=[...]")
            stop_ids = {int(stop_token)}
        else:  # a model from from_preset without a tokenizer has no EOS: run to max_gen_len
            stop_ids = {self.tokenizer.eos_id} if self.tokenizer is not None else set()
        prompt_tokens = [p.tolist() if hasattr(p, "tolist") else p for p in as_batch(
            prompt_tokens, "prompt_tokens", "wrap a single prompt's tokens in a list")]
        sampling = Sampling(temperature, top_p, max_gen_len, stop_ids)
        _, tokens, lps = echoed_rows(self.engine, prompt_tokens, sampling, lambda t: "",
                                     None, echo, logprobs)
        return tokens, (lps if logprobs else None)

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
        prompt_tokens = [completion_prompt_tokens(self.tokenizer, x) for x in prompts]
        sampling = Sampling(temperature, top_p, max_gen_len, {self.tokenizer.eos_id})
        rows, tokens, lps = echoed_rows(self.engine, prompt_tokens, sampling,
                                        self.tokenizer.decode, stop, echo, logprobs)
        if logprobs:
            return [{"generation": row.text, "tokens": self.pieces(t), "logprobs": lp}
                    for row, t, lp in zip(rows, tokens, lps)]
        return [{"generation": row.text} for row in rows]

    def stream_completion(self, prompt: str, temperature: float = 0.6, top_p: float = 0.9,
                          max_gen_len: Optional[int] = None,
                          stop: Optional[List[str]] = None) -> Iterator[str]:
        """text_completion for one prompt, yielding the new text as it is produced."""
        sampling = Sampling(temperature, top_p, max_gen_len, {self.tokenizer.eos_id})
        prompt_tokens = completion_prompt_tokens(self.tokenizer, prompt)
        return stream_text(self.engine, prompt_tokens, sampling, self.tokenizer.decode, stop)

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
        prompt_tokens = infilling_batch(self.tokenizer, prefixes, suffixes, suffix_first)
        sampling = Sampling(temperature, top_p, max_gen_len, self.infill_stop_ids)
        rows = text_rows(self.engine, prompt_tokens, sampling,
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
        (prompt,) = infilling_batch(self.tokenizer, [prefix], [suffix], suffix_first)
        sampling = Sampling(temperature, top_p, max_gen_len, self.infill_stop_ids)
        return stream_text(self.engine, prompt, sampling, self.tokenizer.decode_infilling,
                           stop)

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
            sampling = Sampling(temperature, top_p, max_gen_len, self.chat_stop_ids)
            ran = text_rows(self.engine, [prompts[i][0] for i in safe], sampling,
                            self.tokenizer.decode, stop)
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
        sampling = Sampling(temperature, top_p, max_gen_len, self.chat_stop_ids)
        return stream_text(self.engine, prompt, sampling, self.tokenizer.decode, stop)


def text_rows(engine: Engine, prompt_tokens, sampling: Sampling, decode, stop=None,
              echo=False, prompt_logprobs=None) -> List[TextRow]:
    """One engine call as one TextRow (tokens, logprobs, text cut at the first stop
    string) per prompt."""
    rows = [TextRow(decode, check_stop(stop), p if echo else ()) for p in prompt_tokens]
    if prompt_tokens:
        for _ in engine.generate(prompt_tokens, sampling, prompt_logprobs,
                                 on_token=lambda i, tok, lp: rows[i].add(tok, lp)):
            pass
    return rows


def echoed_rows(engine: Engine, prompt_tokens, sampling: Sampling, decode, stop,
                echo: bool, logprobs: bool):
    """text_rows, plus each row's returned tokens and logprobs: with `echo` the prompt's
    come first (the prompt scored by the model, 0.0 for its first token)."""
    prompt_lp = [] if logprobs and echo else None
    rows = text_rows(engine, prompt_tokens, sampling, decode, stop, echo, prompt_lp)
    tokens = [(list(p) if echo else []) + r.tokens for p, r in zip(prompt_tokens, rows)]
    lps = [(prompt_lp[i] if prompt_lp is not None else []) + r.logprobs
           for i, r in enumerate(rows)]
    return rows, tokens, lps


def stream_text(engine: Engine, prompt_tokens, sampling: Sampling, decode,
                stop=None) -> Iterator[str]:
    """One prompt's new text as it becomes final (the pieces concatenate to the text
    text_rows gives). Arguments are checked now, not at the first next()."""
    row = TextRow(decode, check_stop(stop))
    steps = engine.generate([prompt_tokens], sampling,
                            on_token=lambda i, tok, lp: row.add(tok, lp))

    def pieces():
        for _ in steps:
            delta = row.delta()
            if delta:
                yield delta
        tail = row.delta(final=True)
        if tail:
            yield tail
    return pieces()


def infilling_batch(tokenizer: Tokenizer, prefixes, suffixes, suffix_first: bool):
    """Prompt tokens of each (prefix, suffix) pair in PSM or SPM format."""
    require_infilling(tokenizer)
    fix = "wrap a single prefix and suffix in lists, or use stream_infilling"
    prefixes = as_batch(prefixes, "prefixes", fix)
    suffixes = as_batch(suffixes, "suffixes", fix)
    if len(prefixes) != len(suffixes):
        raise ValueError(f"got {len(prefixes)} prefixes but {len(suffixes)} suffixes; "
                         f"pass one suffix per prefix")
    return [infilling_prompt_tokens(tokenizer, pre, suf, suffix_first)
            for pre, suf in zip(prefixes, suffixes)]


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


def check_stop(stop) -> List[str]:
    """Stop strings as a list; a bare string is one stop string."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
    return list(stop)


def legacy_decode_mode(decode: Optional[str], cuda_graphs: Optional[bool],
                       compile: Optional[bool]) -> Optional[str]:
    """configure's decode mode from its older cuda_graphs/compile switches."""
    if decode is not None:
        raise ValueError("pass either decode= or the older cuda_graphs=/compile=, not both")
    if compile and cuda_graphs is False:
        raise ValueError("compile=True with cuda_graphs=False is no longer a mode; use "
                         "decode='compiled' (graphed where CUDA graphs run) or 'eager'")
    if compile:
        return "compiled"
    return "eager" if cuda_graphs is False else None
