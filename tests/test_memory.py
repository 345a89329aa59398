"""The build-time memory check (llama/memory.py) on the CPU: weights plus KV cache
against the host's available memory."""

import pytest
import torch

from llama import distributed, memory
from llama.model import ModelArgs


@pytest.fixture(autouse=True)
def one_process_group():
    distributed.initialize(None, torch.device("cpu"))


def seven_b(seq_len=4096):
    return ModelArgs.from_name("7b", max_seq_len=seq_len, max_batch_size=1)


def test_available_host_memory_is_read():
    free = memory.available_host_memory()
    assert free is None or 2**20 < free < 2**50


def test_a_model_too_big_for_the_host_is_refused_with_numbers(monkeypatch):
    monkeypatch.setattr(memory, "available_host_memory", lambda: 20 * memory.GIB)
    with pytest.raises(MemoryError, match=r"^25\.1 GiB of weights plus 4\.0 GiB of KV cache "
                       r"\(1 x 4096 tokens\) in float32 do not fit in the 20\.0 GiB free on "
                       r"this machine; lower max_seq_len or max_batch_size, or use bfloat16"):
        memory.check_fits(seven_b(), torch.device("cpu"), torch.float32)
    memory.check_fits(seven_b(), torch.device("cpu"), torch.bfloat16)  # 12.6 + 2 GiB fits
    with pytest.raises(MemoryError, match=r"in bfloat16 do not fit .* or use a GPU$"):
        memory.check_fits(seven_b(16384), torch.device("cpu"), torch.bfloat16)


def test_processes_on_one_host_share_its_memory(monkeypatch):
    monkeypatch.setattr(memory, "available_host_memory", lambda: 20 * memory.GIB)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(MemoryError, match=r"in bfloat16 per process \(2 processes on this "
                                          r"machine\) do not fit in the 20\.0 GiB free"):
        memory.check_fits(seven_b(), torch.device("cpu"), torch.bfloat16)


def test_unknown_host_memory_and_other_devices_are_not_checked(monkeypatch):
    monkeypatch.setattr(memory, "available_host_memory", lambda: None)
    memory.check_fits(seven_b(), torch.device("cpu"), torch.float32)
    monkeypatch.setattr(memory, "available_host_memory", lambda: 0)
    memory.check_fits(seven_b(), torch.device("mps"), torch.float16)
