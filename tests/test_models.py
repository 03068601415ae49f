"""Model loading: the embedded default, save/load round trip, offline and corrupt-file errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from circuitgraph.errors import ModelLoadError
from circuitgraph.models import load_default, load_model, resolve_model, save_model


def test_default_model_shape_and_reproducible_logits(default_model) -> None:
    assert default_model.cfg.n_layers == 4 and default_model.cfg.d_model == 128 and default_model.cfg.n_heads == 4
    toks = default_model.to_tokens("When Mary and John went to the store, John gave a drink to")
    again = load_default()
    assert torch.equal(default_model(toks), again(toks))


def test_load_default_from_a_fresh_process_offline() -> None:
    code = "from circuitgraph.models import load_default; m = load_default(); print(m.cfg.n_layers)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "4"


def test_save_load_round_trip(default_model, tmp_path) -> None:
    save_model(default_model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    toks = default_model.to_tokens("The keys that the man holds")
    assert torch.equal(default_model(toks), loaded(toks))
    assert loaded.to_string(toks[0]) == default_model.to_string(toks[0])


def test_corrupt_and_mismatched_files(default_model, tmp_path) -> None:
    folder = save_model(default_model, tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(folder)
    folder = save_model(default_model, tmp_path / "m2")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["d_model"] = 64
    cfg["d_head"] = 16
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="does not match"):
        load_model(folder)
    with pytest.raises(ModelLoadError, match="config.json not found"):
        load_model(tmp_path / "nowhere")


def test_hub_name_fails_fast_offline() -> None:
    with pytest.raises(ModelLoadError, match="needs the internet"):
        resolve_model("gpt2")


def test_bidirectional_model_saves_and_loads_bidirectional(tmp_path):
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from circuitgraph.models import load_model, save_model

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=8, d_head=8, n_heads=2, d_mlp=32, d_vocab=20,
                                  act_fn="gelu", attention_dir="bidirectional", seed=0)
    model = HookedTransformer(cfg)
    back = load_model(save_model(model, tmp_path / "m"))
    assert back.cfg.attention_dir == "bidirectional"
    tokens = torch.randint(0, 20, (2, 8))
    with torch.no_grad():  # a causal reload would differ at every position but the last
        torch.testing.assert_close(back(tokens), model(tokens))
