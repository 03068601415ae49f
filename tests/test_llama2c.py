"""llama2.c loader on the real stories260K checkpoint.

Checks against an independent plain-torch forward pass written from the format description, the
known greedy continuation, and a direct re-implementation of llama2.c's ``encode``.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from circuitgraph.errors import ModelLoadError
from circuitgraph.models.llama2c import load_llama2c, read_llama2c_vocab

from .conftest import STORIES_DIR

MODEL = STORIES_DIR / "stories260K.bin"
TOKENIZER = STORIES_DIR / "tok512.bin"


@pytest.fixture(scope="module")
def stories():
    return load_llama2c(MODEL, TOKENIZER)


def reference_forward(tokens: list[int]) -> torch.Tensor:
    """llama2.c's forward pass in plain torch, straight from the file (no TransformerLens)."""
    raw = MODEL.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", raw)
    f = np.frombuffer(raw, dtype="<f4", offset=28)
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        out = torch.from_numpy(f[pos : pos + n].copy()).reshape(shape)
        pos += n
        return out

    hd = dim // n_heads
    emb = take(vocab, dim)
    rms_att, wq, wk, wv, wo = take(n_layers, dim), take(n_layers, dim, dim), take(n_layers, n_kv * hd, dim), take(n_layers, n_kv * hd, dim), take(n_layers, dim, dim)
    rms_ffn, w1, w2, w3 = take(n_layers, dim), take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
    rms_final = take(dim)

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w

    T = len(tokens)
    x = emb[torch.tensor(tokens)]
    freqs = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.outer(torch.arange(T).float(), freqs)  # [T, hd/2]
    cos, sin = ang.cos(), ang.sin()

    def rope(v):  # v: [T, heads, hd]; rotate adjacent pairs (2i, 2i+1)
        a, b = v[..., 0::2], v[..., 1::2]
        out = torch.empty_like(v)
        out[..., 0::2] = a * cos[:, None] - b * sin[:, None]
        out[..., 1::2] = a * sin[:, None] + b * cos[:, None]
        return out

    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    for layer in range(n_layers):
        h = rms(x, rms_att[layer])
        q = rope((h @ wq[layer].T).view(T, n_heads, hd))
        k = rope((h @ wk[layer].T).view(T, n_kv, hd)).repeat_interleave(n_heads // n_kv, dim=1)
        v = (h @ wv[layer].T).view(T, n_kv, hd).repeat_interleave(n_heads // n_kv, dim=1)
        att = torch.einsum("qhd,khd->hqk", q, k) / hd**0.5
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        o = torch.einsum("hqk,khd->qhd", att, v).reshape(T, dim)
        x = x + o @ wo[layer].T
        h = rms(x, rms_ffn[layer])
        x = x + (torch.nn.functional.silu(h @ w1[layer].T) * (h @ w3[layer].T)) @ w2[layer].T
    return rms(x, rms_final) @ emb.T


def reference_encode(text: str) -> list[int]:
    """llama2.c run.c ``encode``: dummy prefix space, per-character lookup with byte fallback, score-ranked merges."""
    vocab = read_llama2c_vocab(TOKENIZER, 512)
    index = {p: i for i, p in enumerate(vocab.pieces)}
    ids = [index[" "]] if text else []
    for ch in text:
        if ch in index:
            ids.append(index[ch])
        else:
            ids.extend(b + 3 for b in ch.encode("utf-8"))
    while True:
        best, best_i = -1e10, -1
        for i in range(len(ids) - 1):
            merged = vocab.pieces[ids[i]] + vocab.pieces[ids[i + 1]]
            if merged in index and vocab.scores[index[merged]] > best:
                best, best_i = vocab.scores[index[merged]], i
        if best_i < 0:
            return ids
        ids[best_i : best_i + 2] = [index[vocab.pieces[ids[best_i]] + vocab.pieces[ids[best_i + 1]]]]


def test_logits_match_plain_torch_forward(stories) -> None:
    tokens = stories.to_tokens("Once upon a time, there was a little dog named Max.")[0].tolist()
    ours = stories(torch.tensor([tokens]))[0]
    ref = reference_forward(tokens)
    assert (ours - ref).abs().max().item() < 1e-4


def test_greedy_continuation_matches_known_text(stories) -> None:
    out = stories.generate("Once upon a time", max_new_tokens=30, do_sample=False, verbose=False)
    assert out.startswith("Once upon a time, there was a little girl named Lily. She loved to play outside in the park.")


def test_own_continuation_scores_about_039_nats(stories) -> None:
    toks = stories.generate(stories.to_tokens("Once upon a time"), max_new_tokens=120, do_sample=False, verbose=False)
    with torch.no_grad():
        loss = stories(toks.clone(), return_type="loss").item()
    assert 0.25 < loss < 0.55


@pytest.mark.parametrize("text", ["Once upon a time", "Lily and Tom went to the park. They played!", "naïve café ☃ x"])
def test_tokenizer_matches_llama2c_encode(stories, text: str) -> None:
    assert stories.to_tokens(text, prepend_bos=False)[0].tolist() == reference_encode(text)
    assert stories.to_string(stories.to_tokens(text, prepend_bos=False)[0]) == text


def test_truncated_checkpoint_is_a_clear_error(tmp_path) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(MODEL.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_llama2c(bad)
    with pytest.raises(ModelLoadError, match="not found"):
        load_llama2c(tmp_path / "missing.bin")


def test_model_flag_resolves_a_llama2c_checkpoint() -> None:
    from circuitgraph.models import resolve_model

    model = resolve_model(str(MODEL))  # tokenizer found beside it (tok512.bin)
    assert model.cfg.n_layers == 5 and model.tokenizer is not None
    explicit = resolve_model(f"{MODEL}:{TOKENIZER}")
    toks = model.to_tokens("Once upon a time")
    with torch.no_grad():
        assert torch.equal(model(toks), explicit(toks))


def test_dictionaries_on_a_real_model_sample_their_own_text(tmp_path) -> None:
    """Without --text, a model that has no corpus trains on text sampled from itself."""
    import argparse

    from circuitgraph.cli.dicts_cmd import token_source
    from circuitgraph.models.loading import resolve_model
    from dictionaries.token_sources import ModelSampledTokens

    model = resolve_model(str(MODEL))
    src = token_source(argparse.Namespace(tokens_file=None, text=None, seq_len=16), model, seed=0)
    assert isinstance(src, ModelSampledTokens) and src.sequences(0, 2).shape == (2, 16)


def test_answers_with_a_leading_space_are_the_next_word_token(stories) -> None:
    """SentencePiece marks a word's leading space itself: the answer ' Lily' (written as for GPT-2)
    is the token that follows 'time' in the tokenised prompt, not '▁' + 'Lily'; a byte-level
    tokenizer keeps its own rule (' Lily' and 'Lily' differ)."""
    from circuitgraph.errors import TaskError
    from circuitgraph.models.loading import load_default
    from circuitgraph.tasks.dataset import single_token_id

    prompt = stories.to_tokens("Once upon a time Lily")[0].tolist()
    assert single_token_id(stories, " Lily") == single_token_id(stories, "Lily") == prompt[-1]
    with pytest.raises(TaskError, match=r"is 2 tokens \['▁', 'x'\]"):
        single_token_id(stories, "x")
    toy = load_default()
    assert single_token_id(toy, " Lily") != single_token_id(toy, "Lily")
