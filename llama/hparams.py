"""Model hyperparameters as a checkpoint states them (params.json, or config.json through
hf.py), refused with the key and the file named when no working model can be built from
them: a zero, negative or non-finite value, a number written as a string, heads that do
not split the width. Such values would otherwise load and give garbage, or fail later
with a TypeError or ZeroDivisionError that names neither.
"""

import json
import math
import operator
from pathlib import Path
from typing import Dict, Optional

# Whole numbers of at least 1 (ffn_hidden_dim is config.json's intermediate_size).
COUNTS = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "vocab_size",
          "ffn_hidden_dim")
# Finite numbers above 0.
POSITIVE = ("norm_eps", "rope_theta", "ffn_dim_multiplier")
# May be null: n_kv_heads (as many as n_heads), ffn_dim_multiplier (none).
OPTIONAL = ("n_kv_heads", "ffn_dim_multiplier")


def read_json(path: Path) -> dict:
    """A JSON object of a checkpoint folder (params.json, config.json, the safetensors
    index), its damage reported with its name."""
    try:
        value = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); download the model again") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a JSON object; "
                         f"download the model again")
    return value


def is_count(value) -> bool:
    """A whole number of at least 1; not a bool (Python counts True as 1). Also the
    check of the library's own size arguments."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def whole_number(value) -> Optional[int]:
    """`value` as an int if it is a whole number: an int, a numpy integer or an integer
    0-d tensor, not a bool (Python counts True as 1) or a float; else None. For the
    arguments of calls, which may come from numpy or torch."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def is_positive(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def check(values: dict, path: Path, names: Optional[Dict[str, str]] = None) -> None:
    """Refuse hyperparameters (under params.json's names; `names` gives the file's own
    name of each, for config.json) that cannot describe a working model.
    vocab_size -1 means "from the tokenizer", as in Meta's files."""
    def name(key):
        return (names or {}).get(key, key)

    for key, value in values.items():
        if (value is None and key in OPTIONAL) or (key == "vocab_size" and value == -1):
            continue
        if key in COUNTS and not is_count(value):
            what = "a whole number of at least 1"
        elif key in POSITIVE and not is_positive(value):
            what = "a finite number above 0"
        else:
            continue
        raise ValueError(f"{path}: {name(key)} must be {what}, got {value!r}; fix it or "
                         f"download the model again")
    dim, heads = values["dim"], values["n_heads"]
    kv = values.get("n_kv_heads") or heads
    if dim % heads or dim // heads % 2:
        raise ValueError(
            f"{path}: {name('dim')}={dim} does not split into {name('n_heads')}={heads} "
            f"heads of one even width (rotary embeddings rotate pairs of dimensions)")
    if heads % kv:
        raise ValueError(
            f"{path}: {name('n_heads')}={heads} is not a multiple of "
            f"{name('n_kv_heads')}={kv}; each key/value head serves a whole number of "
            f"query heads")
