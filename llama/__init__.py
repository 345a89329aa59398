"""Code Llama inference: a faithful, bug-fixed rebuild of Meta's reference `llama` package.

Names are imported on first use, so that `import llama.cli` (every command's `--help`)
does not wait seconds for torch; `from llama import Llama` works as ever.
"""

import importlib
import importlib.util

# name -> the submodule that defines it
_EXPORTS = {
    "ChatPrediction": "generation",
    "CompletionPrediction": "generation",
    "InfillingPrediction": "generation",
    "Llama": "generation",
    "sample_top_p": "sampling",
    "ModelArgs": "model",
    "Transformer": "model",
    "Dialog": "prompts",
    "Message": "prompts",
    "dialog_prompt_tokens": "prompts",
    "infilling_prompt_tokens": "prompts",
    "Tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # found directly from now on
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):  # a submodule
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
