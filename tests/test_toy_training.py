"""Training the toy model: loss goes down, and a killed run resumes to exactly the same weights."""

from __future__ import annotations

import pytest
import torch

from circuitgraph.models import load_model
from circuitgraph.models.toy_training import ToyModelConfig, ToyTrainConfig, train_toy_model
from circuitgraph.toylang.corpus import ToyCorpus

TINY = ToyModelConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=64, n_ctx=32)
TRAIN = ToyTrainConfig(steps=6, batch_size=4, warmup=2, checkpoint_every=2, lr=3e-3)


def test_kill_and_resume_gives_identical_weights(tmp_path, monkeypatch) -> None:
    straight = train_toy_model(tmp_path / "a", TINY, TRAIN)

    real_batches = ToyCorpus.batches

    def dying_batches(self, batch_size, start=0):
        for i, batch in enumerate(real_batches(self, batch_size, start)):
            if i == 5:  # after the checkpoint at step 4, during step 5
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(ToyCorpus, "batches", dying_batches)
    with pytest.raises(KeyboardInterrupt):
        train_toy_model(tmp_path / "b", TINY, TRAIN)
    assert (tmp_path / "b" / "train_checkpoint.safetensors").is_file()
    monkeypatch.setattr(ToyCorpus, "batches", real_batches)
    resumed = train_toy_model(tmp_path / "b", TINY, TRAIN)
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert not (tmp_path / "b" / "train_checkpoint.safetensors").exists()
    reloaded = load_model(tmp_path / "b")
    toks = reloaded.to_tokens("When Mary and John")
    assert torch.equal(reloaded(toks), resumed(toks))


def test_resume_refuses_other_settings(tmp_path, monkeypatch) -> None:
    real_batches = ToyCorpus.batches

    def dying_batches(self, batch_size, start=0):
        for i, batch in enumerate(real_batches(self, batch_size, start)):
            if i == 3:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(ToyCorpus, "batches", dying_batches)
    with pytest.raises(KeyboardInterrupt):
        train_toy_model(tmp_path, TINY, TRAIN)
    monkeypatch.setattr(ToyCorpus, "batches", real_batches)
    with pytest.raises(ValueError, match="other settings"):
        train_toy_model(tmp_path, TINY, ToyTrainConfig(steps=8, batch_size=4, warmup=2, checkpoint_every=2))


def test_loss_decreases(tmp_path) -> None:
    from circuitgraph.models.toy_training import build_untrained
    from circuitgraph.toylang.corpus import CorpusConfig

    cfg = ToyTrainConfig(steps=60, batch_size=8, warmup=5, checkpoint_every=100, lr=5e-3)
    model = train_toy_model(tmp_path, TINY, cfg)
    untrained = build_untrained(TINY, cfg.seed)
    held = ToyCorpus(CorpusConfig(seed=99, seq_len=TINY.n_ctx)).tokens(16)  # documents never trained on
    with torch.no_grad():
        before = untrained(held, return_type="loss").item()
        after = model(held, return_type="loss").item()
    assert after < before - 1.5


def test_same_seed_gives_bit_identical_weights(tmp_path) -> None:
    # 32 x 128 tokens per step: large enough that the embedding backward runs multi-threaded
    cfg_m = ToyModelConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=64, n_ctx=128)
    cfg_t = ToyTrainConfig(steps=3, batch_size=32, warmup=1, checkpoint_every=100)
    a = train_toy_model(tmp_path / "a", cfg_m, cfg_t).state_dict()
    b = train_toy_model(tmp_path / "b", cfg_m, cfg_t).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
