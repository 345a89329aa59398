"""The Transformer against Hugging Face's LlamaForCausalLM, and the KV-cache invariants."""

import json

import pytest
import torch

from conftest import build, hf_model
from llama import ModelArgs
from llama.checkpoint import read_params


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kv_heads", [2, 4])  # grouped-query attention, and plain MHA
def test_logits_match_transformers(make_model, kv_heads):
    folder, args, state = make_model(n_kv_heads=kv_heads)
    gen = build(folder)
    tokens = torch.randint(0, args.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    ours = gen.model.forward(tokens, 0)
    assert ours.dtype == torch.float32 and ours.shape == (3, 40, args.vocab_size)
    theirs = hf_model(args, state)(tokens).logits
    assert rel_err(ours, theirs) < 1e-4


def test_rope_theta_matters(make_model):
    """rope_theta from params.json reaches the rotation (HF given the same theta agrees)."""
    folder, args, state = make_model(rope_theta=10000.0)
    tokens = torch.randint(0, args.vocab_size, (1, 48), generator=torch.Generator().manual_seed(2))
    ours = build(folder).model.forward(tokens, 0)
    assert rel_err(ours, hf_model(args, state)(tokens).logits) < 1e-4
    other = ModelArgs(**{**args.__dict__, "rope_theta": 1e6})
    assert rel_err(ours, hf_model(other, state)(tokens).logits) > 1e-3


def test_incremental_decoding_and_chunked_prefill(make_model):
    folder, args, _ = make_model()
    model = build(folder).model
    tokens = torch.randint(0, args.vocab_size, (2, 30), generator=torch.Generator().manual_seed(3))
    full = model.forward(tokens, 0)
    # One token at a time.
    steps = torch.cat([model.forward(tokens[:, i:i + 1], i) for i in range(30)], dim=1)
    assert rel_err(steps, full) < 1e-5
    # Chunks of several tokens with start_pos > 0: the reference's square mask crashed here.
    chunks = [model.forward(tokens[:, a:b], a) for a, b in [(0, 7), (7, 8), (8, 21), (21, 30)]]
    assert rel_err(torch.cat(chunks, dim=1), full) < 1e-5


def test_rows_at_different_positions(make_model):
    """Per-row start positions give each row what it would get alone."""
    folder, args, _ = make_model()
    model = build(folder).model
    g = torch.Generator().manual_seed(4)
    a, b = (torch.randint(0, args.vocab_size, (1, n), generator=g) for n in (9, 5))
    alone = []
    for x in (a, b):  # each prompt alone: prefill all but the last token, decode the last
        model.forward(x[:, :-1], 0)
        alone.append(model.forward(x[:, -1:], x.shape[1] - 1))
    pad = torch.zeros(1, 4, dtype=torch.long)
    model.forward(torch.cat([a[:, :-1], torch.cat([b[:, :-1], pad], 1)]), 0)
    both = model.forward(torch.cat([a[:, -1:], b[:, -1:]]), torch.tensor([8, 4]))
    assert rel_err(both[0, -1], alone[0][0]) < 1e-5
    assert rel_err(both[1, -1], alone[1][0]) < 1e-5


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_ragged_decoding_with_a_boolean_mask(make_model, kv_heads):
    """Decoding steps with one start per row (a boolean mask on the CPU) and with one
    start for all rows (no mask) give the full forward's logits."""
    folder, args, _ = make_model(n_kv_heads=kv_heads)
    model = build(folder).model
    tokens = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    full = model.forward(tokens, 0)
    model.forward(tokens[:, :10], 0)
    same = [model.forward(tokens[:, i:i + 1], i) for i in range(10, 17)]
    per_row = [model.forward(tokens[:, i:i + 1], torch.tensor([i, i])) for i in range(17, 24)]
    assert rel_err(torch.cat(same + per_row, dim=1), full[:, 10:]) < 1e-5


def test_state_dict_keeps_metas_names_and_loads_them(make_model):
    """The fused projections save as Meta's wq/wk/wv and w1/w3 (same tensors as the
    checkpoint), and load_state_dict of Meta's names fuses them again."""
    folder, args, state = make_model()
    model = build(folder).model
    saved = model.state_dict()
    assert set(saved) == set(state) - {"rope.freqs"}
    for key, value in saved.items():
        assert torch.equal(value, state[key]), key
    tokens = torch.randint(0, args.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    want = model.forward(tokens, 0)
    other = build(make_model(seed=3)[0]).model
    assert rel_err(other.forward(tokens, 0), want) > 1e-2
    other.load_state_dict({k: v.clone() for k, v in saved.items()})
    assert torch.equal(other.forward(tokens, 0), want)


def test_cache_overflow_is_an_error(make_model):
    folder, args, _ = make_model()
    model = build(folder, max_seq_len=16).model
    with pytest.raises(ValueError, match="KV cache"):
        model.forward(torch.zeros(1, 17, dtype=torch.long), 0)


def test_negative_start_is_an_error(make_model):
    """It would read RoPE angles and write cache slots from the far end of the tables."""
    model = build(make_model()[0], max_seq_len=16).model
    for start in (-1, torch.tensor([-2])):
        with pytest.raises(ValueError, match="start_pos must be >= 0"):
            model.forward(torch.zeros(1, 4, dtype=torch.long), start)
    with torch.inference_mode(), pytest.raises(ValueError, match="start_pos must be >= 0"):
        model.forward_hidden(torch.zeros(1, 4, dtype=torch.long), -1, kv_len=4)


PARAMS = {  # the released params.json files (34B/70B carry n_kv_heads)
    "7b": ({"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256,
            "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5, "rope_theta": 1000000}, 32016,
           11008, 6_738_546_688),
    "13b": ({"dim": 5120, "n_layers": 40, "n_heads": 40, "multiple_of": 256,
             "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5, "rope_theta": 1000000}, 32016,
            13824, 13_016_028_160),
    "34b": ({"dim": 8192, "n_layers": 48, "n_heads": 64, "n_kv_heads": 8, "multiple_of": 256,
             "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5, "rope_theta": 1000000,
             "vocab_size": 32000}, 32000, 22016, 33_743_970_304),
    "70b": ({"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "multiple_of": 4096,
             "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 10000,
             "vocab_size": -1}, 32016, 28672, 68_976_910_336),
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_every_released_params_json_loads(tmp_path, name):
    params, vocab, hidden, n_params = PARAMS[name]
    (tmp_path / "params.json").write_text(json.dumps(params, indent=4))
    read = read_params(tmp_path)
    read["vocab_size"] = vocab
    args = ModelArgs(max_seq_len=16, max_batch_size=1, **read)
    assert args.ffn_hidden_dim == hidden
    assert args.num_params() == n_params
    preset = ModelArgs.from_name(name)
    assert (preset.dim, preset.n_layers, preset.kv_heads, preset.ffn_hidden_dim) == (
        args.dim, args.n_layers, args.kv_heads, hidden)
