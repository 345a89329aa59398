"""Code Llama inference: a faithful, bug-fixed rebuild of Meta's reference `llama` package."""

from .generation import (
    ChatPrediction,
    CompletionPrediction,
    InfillingPrediction,
    Llama,
)
from .sampling import sample_top_p
from .model import ModelArgs, Transformer
from .prompts import Dialog, Message, dialog_prompt_tokens, infilling_prompt_tokens
from .tokenizer import Tokenizer

__all__ = [
    "ChatPrediction",
    "CompletionPrediction",
    "Dialog",
    "InfillingPrediction",
    "Llama",
    "Message",
    "ModelArgs",
    "Tokenizer",
    "Transformer",
    "dialog_prompt_tokens",
    "infilling_prompt_tokens",
    "sample_top_p",
]
