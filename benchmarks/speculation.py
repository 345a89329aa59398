"""Speculative decoding in the speed benchmark (`bench.py --draft ...`).

With --draft, every decode scenario runs a second time with the draft, on the same model
in the same process, and reports tokens/s, the speed-up over the plain run, the
acceptance rate and whether the tokens equal the plain run's. --edit_file adds a
code-editing scenario: a source file, then its first lines again with one line changed,
so that the rest of the file is the natural continuation. --verify_widths times one
verify forward of w tokens per row against one plain decode step, and with a draft
model its decode step too, and the speed-ups those costs imply at given acceptance rates.
"""

from pathlib import Path
from typing import List, Optional

import torch

from benchmarks.timing import Timer
from llama import Llama
from llama.drafting import LookupDrafter
from llama.sampling import Sampling
from llama.speculative import Speculation, verify

ACCEPTANCE_RATES = (0.6, 0.7, 0.8)
EDIT_HEAD_LINES = 8  # lines of the edited copy in the prompt


def edit_prompt(path: str, head_lines: int = EDIT_HEAD_LINES) -> str:
    """The file, a blank line, then its first `head_lines` lines again with the first
    non-blank one marked as edited: what an editor asks a model to continue when it wants
    the file back with a change near its top."""
    lines = Path(path).read_text().splitlines(keepends=True)
    head = lines[:head_lines]
    first = next((i for i, line in enumerate(head) if line.strip()), 0)
    head[first] = head[first].rstrip("\n") + "  # edited\n"
    return "".join(lines) + "\n\n" + "".join(head)


def make_draft(spec: str, configure: dict, **build_kw):
    """configure's draft for --draft: a name, or a Llama built and configured (decode
    mode) like the target."""
    if spec in ("lookup", "int4"):
        return spec
    if spec.startswith("preset:"):
        draft = Llama.from_preset(spec[len("preset:"):], **build_kw)
    else:
        draft = Llama.build(spec, **build_kw)
    return draft.configure(**configure)


def drafted(gen: Llama, draft, k: int, batch: int, timed_decodes, plain: dict) -> dict:
    """The scenario again with `draft`: timed_decodes() is bench.py's timing of the
    scenario's decode, `plain` the plain run's figures."""
    gen.configure(draft=draft, draft_tokens=k)
    try:
        steps, seconds, extra = timed_decodes()
        stats = dict(gen.engine.speculation.stats)
    finally:
        gen.configure(draft=None)
    tps = batch * steps / seconds
    return {"tokens_per_s": tps, "speedup": tps / plain["tokens_per_s"],
            "acceptance": stats["accepted"] / max(1, stats["proposed"]),
            "accepted_per_round": stats["accepted"] / max(1, stats["rounds"]), **stats,
            "same_tokens": (extra.get("tokens_fingerprint")
                            == plain.get("tokens_fingerprint")),
            "runs_ms_per_step": extra["runs_ms_per_step"]}


def step_costs(gen: Llama, timer: Timer, widths: List[int], batch: int,
               context: int, repeats: int, draft: Optional[Llama] = None) -> dict:
    """Milliseconds of one plain decode step and of one verify forward of each width (w
    tokens per row, through the runner speculation uses), at `context` cached positions;
    with a draft model, its decode step and the implied speed-ups."""
    device = gen.model.rope.device
    costs = {"decode_step_ms": decode_step_ms(gen, timer, batch, context, repeats),
             "verify_ms": {}}
    for w in widths:
        runner = Speculation(LookupDrafter(), max(1, w - 1)).chunks(gen.engine)
        tokens = torch.ones((batch, w), dtype=torch.long, device=device)
        n_drafted = torch.zeros(batch, dtype=torch.long, device=device)

        def once():
            return runner(verify, tokens, [context] * batch, [n_drafted])
        costs["verify_ms"][w] = 1000 * timer.median(once, repeats, warmup=2)
    step = costs["decode_step_ms"]
    costs["verify_over_step"] = {w: ms / step for w, ms in costs["verify_ms"].items()}
    if isinstance(draft, Llama):
        draft_ms = decode_step_ms(draft, timer, batch, context, repeats)
        costs["draft_step_ms"] = draft_ms
        costs["implied_speedup"] = {
            f"k={w - 1} a={a}": implied_speedup(a, w - 1, step, draft_ms, ms)
            for w, ms in costs["verify_ms"].items() if w > 1 for a in ACCEPTANCE_RATES}
    return costs


def decode_step_ms(gen: Llama, timer: Timer, batch: int, context: int,
                   repeats: int) -> float:
    tokens = torch.ones(batch, dtype=torch.long, device=gen.model.rope.device)
    greedy = Sampling(0.0, 1.0)
    positions = [context] * batch
    return 1000 * timer.median(lambda: gen.engine.decoder(tokens, positions, greedy),
                               repeats, warmup=2)


def implied_speedup(acceptance: float, k: int, step_ms: float, draft_ms: float,
                    verify_ms: float) -> float:
    """Tokens/s of a draft model against plain decoding, if each proposal is accepted
    with probability `acceptance` independently: a round of k draft steps and one verify
    yields (1 - a^(k+1)) / (1 - a) tokens on average."""
    tokens = (1 - acceptance ** (k + 1)) / (1 - acceptance)
    return tokens * step_ms / (k * draft_ms + verify_ms)
