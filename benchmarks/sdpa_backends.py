"""Prefill latency of CodeLlama-7B shapes (random bf16 weights) under each SDPA backend
PyTorch offers, to choose the attention kernel for long prompts.

    python benchmarks/sdpa_backends.py --lens 16384,32768
    python benchmarks/sdpa_backends.py --lens none --decode_ctx 100000
"""

import fire
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from llama import Llama

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def time_ms(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def decode(model, ctx: int):
    """One batch-1 decode step at context ctx (cache filled with random values)."""
    for layer in model.layers:
        layer.attention.cache.k.normal_()
        layer.attention.cache.v.normal_()
    token = torch.randint(0, model.vocab_size, (1, 1), device="cuda")
    for name, backend in BACKENDS.items():
        def step():
            with torch.no_grad(), sdpa_kernel([backend]):
                model.forward_hidden(token, ctx - 1, kv_len=ctx)
        try:
            ms = time_ms(step, repeats=10)
            print(f"decode ctx={ctx} {name:>9}: {ms:7.2f} ms/token = {1000 / ms:6.1f} tok/s")
        except RuntimeError as e:
            print(f"decode ctx={ctx} {name:>9}: unavailable ({str(e).splitlines()[0][:80]})")


def main(preset: str = "7b", lens="16384,32768", decode_ctx: int = 0):
    lens = [int(x) for x in str(lens).split(",") if x != "none"]
    gen = Llama.from_preset(preset, max_seq_len=max(lens + [decode_ctx]), max_batch_size=1,
                            device="cuda")
    model = gen.model
    if decode_ctx:
        decode(model, decode_ctx)
    for n in lens:
        tokens = torch.randint(0, model.vocab_size, (1, n), device="cuda")
        for name, backend in BACKENDS.items():
            def prefill():
                with torch.no_grad(), sdpa_kernel([backend]):
                    model.forward_hidden(tokens, 0, kv_len=n)
            try:
                print(f"L={n:>6} {name:>9}: {time_ms(prefill):8.1f} ms", flush=True)
            except RuntimeError as e:
                print(f"L={n:>6} {name:>9}: unavailable ({str(e).splitlines()[0][:80]})")
        with torch.no_grad():  # a prefill chunk after cached tokens: lower-right causal
            half = n // 2
            model.forward_hidden(tokens[:, :half], 0, kv_len=half)
            for name, backend in BACKENDS.items():
                def second_half():
                    with sdpa_kernel([backend]):
                        model.forward_hidden(tokens[:, half:], half, kv_len=n)
                try:
                    print(f"L={n:>6} 2nd half {name:>9}: {time_ms(second_half):8.1f} ms", flush=True)
                except RuntimeError as e:
                    print(f"L={n:>6} 2nd half {name:>9}: unavailable ({str(e).splitlines()[0][:80]})")


if __name__ == "__main__":
    fire.Fire(main)
