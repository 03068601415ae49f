"""Training dictionaries on the embedded model: one pass feeds all, exact resume, NaN stops, metrics."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from circuitgraph.toylang.corpus import CorpusConfig, ToyCorpus
from dictionaries.activations import ActivationStore
from dictionaries.checkpoint import load_checkpoint
from dictionaries.errors import DictionaryError
from dictionaries.metrics import evaluate_dictionaries
from dictionaries.persistence import dictionary_state_equal, load_dictionaries
from dictionaries.site import Site, expand_sites
from dictionaries.training import TrainConfig, train_dictionaries

SITES = [Site(1, "resid_post"), Site(1, "transcoder"), Site(2, "attn_z"), Site(0, "mlp_out")]
SMALL = TrainConfig.of(arch="topk", k=8, expansion=2, tokens=512 * 8, batch_tokens=512, chunk_sequences=24,
                    model_batch=8, checkpoint_every=2, warmup_steps=2)


def corpus() -> ToyCorpus:
    return ToyCorpus(CorpusConfig(seed=1, seq_len=64))


def test_one_model_pass_feeds_every_dictionary(default_model, tmp_path) -> None:
    calls = []
    handle = default_model.hook_embed.register_forward_hook(lambda *a: calls.append(1))
    try:
        train_dictionaries(default_model, SITES, corpus(), SMALL, tmp_path)
    finally:
        handle.remove()
    per_chunk = SMALL.store.chunk_sequences * 63 // SMALL.store.batch_tokens  # 2 batches per chunk
    chunks = -(-SMALL.steps // per_chunk)
    assert len(calls) == chunks * (SMALL.store.chunk_sequences // SMALL.store.model_batch)
    assert set(load_dictionaries(tmp_path)) == set(SITES)


def test_killed_run_resumes_to_identical_weights(default_model, tmp_path, monkeypatch) -> None:
    straight = train_dictionaries(default_model, SITES[:2], corpus(), SMALL, tmp_path / "a").dictionaries
    real = ActivationStore.batches

    def dying(self, start_step=0):
        for i, b in enumerate(real(self, start_step)):
            if i == 5:
                raise KeyboardInterrupt
            yield b

    monkeypatch.setattr(ActivationStore, "batches", dying)
    with pytest.raises(KeyboardInterrupt):
        train_dictionaries(default_model, SITES[:2], corpus(), SMALL, tmp_path / "b")
    assert load_checkpoint(tmp_path / "b" / "train_checkpoint.safetensors").meta["step"] == 4
    monkeypatch.setattr(ActivationStore, "batches", real)
    resumed = train_dictionaries(default_model, SITES[:2], corpus(), SMALL, tmp_path / "b").dictionaries
    for site in SITES[:2]:
        assert dictionary_state_equal(straight[site], resumed[site]), site


def test_nan_activations_stop_with_step_and_site(default_model, tmp_path, monkeypatch) -> None:
    real = ActivationStore.chunk

    def poisoned(self, index):
        acts = real(self, index)
        if index == 3:
            acts["blocks.1.hook_resid_post"][5, 0] = float("nan")
        return acts

    monkeypatch.setattr(ActivationStore, "chunk", poisoned)
    # chunk 3 holds steps 6 and 7 (two batches per chunk); the checkpoint after step 6 survives
    with pytest.raises(DictionaryError, match=r"L1\.resid_post .* at step 6.*intact"):
        train_dictionaries(default_model, SITES[:1], corpus(), SMALL, tmp_path)
    assert load_checkpoint(tmp_path / "train_checkpoint.safetensors").meta["step"] == 6


def test_bad_sites_are_clear_errors(default_model) -> None:
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        expand_sites("resid_post", "7", default_model.cfg.n_layers)
    with pytest.raises(ValueError, match="unknown site kind 'resid_middle'"):
        expand_sites("resid_middle", "all", default_model.cfg.n_layers)
    with pytest.raises(DictionaryError, match="out of range"):
        train_dictionaries(default_model, [Site(9, "mlp_out")], corpus(), SMALL, "unused")


def test_trained_dictionaries_reconstruct_and_recover_ce(default_model, tmp_path) -> None:
    cfg = TrainConfig.of(arch="topk", k=16, expansion=4, tokens=4096 * 60, batch_tokens=4096, lr=2e-3)
    dicts = train_dictionaries(default_model, [Site(1, "resid_post"), Site(1, "transcoder")],
                               ToyCorpus(CorpusConfig(seed=1)), cfg, tmp_path).dictionaries
    tokens = ToyCorpus(CorpusConfig(seed=999)).tokens(16)
    metrics = evaluate_dictionaries(default_model, dicts, tokens)
    for site, m in metrics.items():
        assert m.l0 <= 16.0 + 1e-6
        assert m.fvu < 0.4, (site, m.fvu)
        assert m.ce_zero > m.ce_spliced > m.ce_clean - 0.05
        assert m.ce_recovered > 0.5, (site, m.ce_recovered)
        assert 0 <= m.dead_frac <= 1 and m.kl >= 0


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "circuitgraph", *args], capture_output=True, text=True, timeout=600)


def test_cli_train_and_eval(tmp_path) -> None:
    out = run_cli("train-dictionaries", "--model", "default", "--sites", "resid_post,transcoder", "--layers", "0",
                  "--arch", "topk", "--k", "8", "--expansion", "2", "--tokens", "16k", "--batch-tokens", "2048",
                  "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["dictionaries"] == 2
    ev = run_cli("dicts", "eval", "--model", "default", "--dicts", str(tmp_path), "--n-seq", "4", "--json")
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert set(result) == {"L0.resid_post", "L0.transcoder"}
    assert {"l0", "fvu", "dead_frac", "ce_recovered", "kl"} <= set(result["L0.resid_post"])


@pytest.mark.parametrize("args,message", [
    (("--sites", "resid_post", "--layers", "9"), "layer 9 is out of range"),
    (("--sites", "bogus"), "unknown site kind 'bogus'"),
    (("--arch", "bogus"), "invalid choice: 'bogus'"),
    (("--grad-clip", "-1"), "grad_clip=-1.0 is negative"),
])
def test_cli_bad_input(tmp_path, args, message) -> None:
    out = run_cli("train-dictionaries", "--out", str(tmp_path), "--tokens", "8k", *args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def _local_hf_dataset(folder, n_docs: int = 40) -> list[str]:
    """A Hugging Face dataset as a local folder of JSON lines (``datasets.load_dataset(folder)``)."""
    texts = ToyCorpus(CorpusConfig(seed=3, seq_len=64)).texts(n_docs)
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return texts


def test_hf_dataset_source_streams_tokenised_examples(default_model, tmp_path) -> None:
    from dictionaries.token_sources import hf_dataset_tokens

    texts = _local_hf_dataset(tmp_path / "ds")
    src = hf_dataset_tokens(str(tmp_path / "ds"), default_model, seq_len=16, n_sequences=5)
    stream = [t for text in texts for t in default_model.to_tokens(text, prepend_bos=False)[0].tolist()]
    seqs = src.sequences(0, 5)
    assert seqs.shape == (5, 16)
    assert (seqs[:, 0] == default_model.tokenizer.bos_token_id).all()
    assert seqs[:, 1:].reshape(-1).tolist() == stream[: 5 * 15]
    with pytest.raises(ValueError, match="no column 'body'.*text, id"):
        hf_dataset_tokens(str(tmp_path / "ds"), default_model, column="body")
    with pytest.raises(ValueError, match="fewer tokens than one sequence of 100000"):
        hf_dataset_tokens(str(tmp_path / "ds"), default_model, seq_len=100_000)
    with pytest.raises(ValueError, match="could not open the Hugging Face dataset"):
        hf_dataset_tokens("no-such-user/no-such-dataset", default_model)  # HF_HUB_OFFLINE=1: fails fast


def test_cli_trains_on_a_hf_dataset(tmp_path) -> None:
    _local_hf_dataset(tmp_path / "ds", n_docs=200)
    out = run_cli("train-dictionaries", "--sites", "resid_post", "--layers", "1", "--k", "8", "--expansion", "2",
                  "--tokens", "4096", "--batch-tokens", "1024", "--hf-dataset", str(tmp_path / "ds"),
                  "--seq-len", "32", "--out", str(tmp_path / "dicts"))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["dictionaries"] == 1
    bad = run_cli("train-dictionaries", "--sites", "resid_post", "--layers", "1", "--tokens", "4096",
                  "--hf-dataset", str(tmp_path / "ds"), "--hf-column", "body", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "no column 'body'" in bad.stderr and "Traceback" not in bad.stderr


def test_dimension_mismatch_on_load(default_model, tmp_path) -> None:
    from dictionaries.persistence import check_against_model

    train_dictionaries(default_model, [Site(0, "resid_post")], corpus(), SMALL, tmp_path)
    dicts = load_dictionaries(tmp_path)
    small = type(default_model.cfg)(n_layers=1, d_model=64, n_ctx=32, d_head=16, n_heads=4, d_vocab=10, act_fn="gelu")
    with pytest.raises(DictionaryError, match="widths"):
        check_against_model(dicts, small)
    assert torch.isfinite(dicts[Site(0, "resid_post")].W_dec).all()


def test_activation_cache_gives_identical_training(default_model, tmp_path, monkeypatch) -> None:

    cached = SMALL.replace(activation_cache=str(tmp_path / "cache"))
    first = train_dictionaries(default_model, SITES[:2], corpus(), cached, tmp_path / "a").dictionaries
    shards = sorted((tmp_path / "cache").glob("chunk_*.safetensors"))
    assert len(shards) == 4
    calls = []
    handle = default_model.hook_embed.register_forward_hook(lambda *a: calls.append(1))
    try:
        second = train_dictionaries(default_model, SITES[:2], corpus(), cached, tmp_path / "b").dictionaries
    finally:
        handle.remove()
    assert calls == []  # every chunk came from disk
    plain = train_dictionaries(default_model, SITES[:2], corpus(), SMALL, tmp_path / "c").dictionaries
    for site in SITES[:2]:
        assert dictionary_state_equal(first[site], second[site])
        assert dictionary_state_equal(first[site], plain[site])


def test_end_to_end_kl_term_lowers_kl(default_model, tmp_path) -> None:
    """With the e2e KL term in the loss, the spliced model's KL to the clean model is lower
    (held-out text) than with reconstruction alone, same seed and data; the model is untouched."""
    base = TrainConfig.of(arch="topk", k=4, expansion=2, tokens=1024 * 30, batch_tokens=1024, chunk_sequences=24,
                       model_batch=8, checkpoint_every=100, warmup_steps=3, e2e_sequences=8)
    sites = [Site(2, "resid_post")]
    before = [p.detach().clone() for p in default_model.parameters()]
    plain = train_dictionaries(default_model, sites, corpus(), base, tmp_path / "plain").dictionaries
    e2e = train_dictionaries(default_model, sites, corpus(), base.replace(e2e_kl_coeff=10.0),
                             tmp_path / "e2e").dictionaries
    assert all(torch.equal(a, b) and b.requires_grad for a, b in zip(before, default_model.parameters(), strict=True))
    held_out = ToyCorpus(CorpusConfig(seed=4242, seq_len=64)).sequences(0, 24)
    kl_plain = evaluate_dictionaries(default_model, plain, held_out)[sites[0]].kl
    kl_e2e = evaluate_dictionaries(default_model, e2e, held_out)[sites[0]].kl
    assert kl_e2e < 0.8 * kl_plain, (kl_plain, kl_e2e)
    with pytest.raises(ValueError, match="e2e_kl_coeff"):
        TrainConfig.of(e2e_kl_coeff=-1.0)
