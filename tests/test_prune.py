"""Pruning latents that never fire: outputs unchanged wherever the removed latents are inactive."""

from __future__ import annotations

import json

import pytest
import torch

from dictionaries.architectures.registry import build_dictionary
from dictionaries.config import DictionaryConfig
from dictionaries.errors import DictionaryError
from dictionaries.metrics import firing_density
from dictionaries.persistence import load_dictionaries
from dictionaries.prune import prune_latents


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu", "gated"])
def test_pruned_dictionary_has_the_same_outputs(arch):
    torch.manual_seed(0)
    d = build_dictionary(DictionaryConfig(arch, 16, 64, 24, k=4, skip=True), seed=3)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.1 * torch.randn_like(p))
        dead = torch.zeros(64, dtype=torch.bool)
        dead[::3] = True
        d.b_enc[dead] = -1e4  # these latents can never fire
        if arch == "gated":
            d.b_mag[dead] = -1e4
    d.eval()
    x = torch.randn(500, 16)
    before = d(x)
    assert not (before.latents[:, dead] > 0).any() and (before.latents[:, ~dead] > 0).any()
    p = prune_latents(d, ~dead)
    after = p(x)
    assert p.cfg.d_dict == int((~dead).sum())
    assert torch.equal(after.latents, before.latents[:, ~dead])
    assert torch.allclose(after.output, before.output, atol=1e-6)


def test_prune_refuses_fewer_latents_than_k():
    d = build_dictionary(DictionaryConfig("topk", 8, 16, k=4))
    keep = torch.zeros(16, dtype=torch.bool)
    keep[:3] = True
    with pytest.raises(DictionaryError, match="fewer than k=4"):
        prune_latents(d, keep)


def test_cli_prune_counts_on_the_training_stream(tmp_path, capsys, default_model):
    """`dicts prune` keeps exactly the latents that fire on the training stream's first sequences:
    afterwards none of the kept latents is dead on those sequences, and the spliced model is unchanged."""
    from circuitgraph.cli.main import main
    from circuitgraph.toylang.corpus import CorpusConfig, ToyCorpus

    d = tmp_path / "d"
    assert main(["--threads", "1", "train-dictionaries", "--sites", "transcoder", "--layers", "3", "--k", "4",
                 "--expansion", "8", "--tokens", "8k", "--batch-tokens", "1024", "--chunk-sequences", "32",
                 "--seq-len", "64", "--out", str(d)]) == 0
    capsys.readouterr()
    assert main(["dicts", "prune", "--dicts", str(d), "--out", str(tmp_path / "p"), "--seqs", "40", "--seq-len", "64"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    before, after = load_dictionaries(d), load_dictionaries(tmp_path / "p")
    (site,) = before
    assert report["latents"][site.id]["after"] == after[site].cfg.d_dict < before[site].cfg.d_dict
    stream = ToyCorpus(CorpusConfig(seed=1, seq_len=64)).sequences(0, 40)  # training read seed + 1 = 1
    dens_before = firing_density(default_model, before, stream)[site]
    assert after[site].cfg.d_dict == int((dens_before > 0).sum())
    assert (firing_density(default_model, after, stream)[site] > 0).all()
    _, cache = default_model.run_with_cache(stream)
    x = cache[site.input_hook].reshape(-1, 128)
    with torch.no_grad():
        assert torch.allclose(before[site](x).output, after[site](x).output, atol=1e-5)


def test_prune_refusals(tmp_path, capsys):
    from circuitgraph.cli.main import main

    d = build_dictionary(DictionaryConfig("relu", 8, 16))
    with pytest.raises(DictionaryError, match=r"keep must be a \[16\] bool mask"):
        prune_latents(d, torch.ones(8, dtype=torch.bool))
    with pytest.raises(DictionaryError, match="no latent fired"):
        prune_latents(d, torch.zeros(16, dtype=torch.bool))
    from circuitgraph.models.loading import V1_DICTS_DIR

    assert main(["dicts", "prune", "--dicts", str(V1_DICTS_DIR), "--out", str(tmp_path / "p"), "--seqs", "0"]) == 2
    assert "--seqs 0" in capsys.readouterr().err
    assert main(["dicts", "prune", "--dicts", str(V1_DICTS_DIR), "--out", str(V1_DICTS_DIR)]) == 2
