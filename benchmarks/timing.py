"""The benchmarks' timer: CUDA events on CUDA, the clock elsewhere, and peak memory."""

import gc
import statistics
import time
from typing import Callable, Optional

import torch

from benchmarks.common import GiB


class Timer:
    """Marks on the device's timeline: CUDA events on CUDA (recorded after a synchronize
    unless told not to), time.perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self, sync: bool = True):
        if not self.cuda:
            return time.perf_counter()
        if sync:
            torch.cuda.synchronize()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000

    def median(self, fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
        """Median seconds of `repeats` calls of fn, after `warmup` untimed calls."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(max(1, repeats)):
            start = self.mark()
            fn()
            times.append(self.seconds(start, self.mark()))
        return statistics.median(times)

    def reset_peak(self) -> None:
        """Free what earlier work left, so that the next peak is the next work's own."""
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> Optional[float]:
        """Peak CUDA memory allocated since reset_peak; None off CUDA (not measured)."""
        return torch.cuda.max_memory_allocated() / GiB if self.cuda else None
