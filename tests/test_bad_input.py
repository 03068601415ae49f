"""Bad input across the package: each error names the problem and the fix, and nothing is lost."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from circuitgraph.errors import ModelLoadError, TaskError
from circuitgraph.models import resolve_model
from circuitgraph.tasks.registry import make_dataset
from circuitgraph.toylang.corpus import CorpusConfig, ToyCorpus
from dictionaries.activations import ActivationStore, StoreConfig
from dictionaries.architectures.registry import build_dictionary
from dictionaries.checkpoint import load_checkpoint
from dictionaries.config import DictionaryConfig
from dictionaries.errors import DictionaryError
from dictionaries.persistence import load_dictionaries
from dictionaries.saelens_format import load_saelens, save_saelens
from dictionaries.site import Site, expand_sites
from dictionaries.token_sources import TensorTokens, tensor_file_tokens, text_file_tokens
from dictionaries.training import TrainConfig, train_dictionaries


def test_token_source_errors(default_model, tmp_path) -> None:
    with pytest.raises(ValueError, match="missing, corrupt or truncated"):
        tensor_file_tokens(tmp_path / "none.safetensors")
    save_file({"ids": torch.zeros(2, 4, dtype=torch.long)}, str(tmp_path / "t.safetensors"))
    with pytest.raises(ValueError, match="has no 'tokens' tensor"):
        tensor_file_tokens(tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match=r"must be \[n_sequences, seq_len\]"):
        TensorTokens(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="not found"):
        text_file_tokens(tmp_path / "none.txt", default_model)
    (tmp_path / "short.txt").write_text("Mary went home.")
    with pytest.raises(ValueError, match="fewer than one sequence of 128; give more text"):
        text_file_tokens(tmp_path / "short.txt", default_model)


def test_activation_store_errors(default_model) -> None:
    corpus = ToyCorpus(CorpusConfig(seq_len=32))
    with pytest.raises(ValueError, match="do not exist in this model"):
        ActivationStore(default_model, ["blocks.0.hook_resid_typo"], corpus)
    with pytest.raises(ValueError, match="raise chunk_sequences or lower batch_tokens"):
        ActivationStore(default_model, [Site(0, "resid_post").input_hook], corpus, StoreConfig(batch_tokens=4096, chunk_sequences=2))
    with pytest.raises(ValueError, match="batch_tokens=0 must be at least 1"):
        StoreConfig(batch_tokens=0)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="widths must be positive"):
        DictionaryConfig(arch="topk", d_in=0, d_dict=8, k=1)
    with pytest.raises(ValueError, match="unknown dictionary config fields"):
        DictionaryConfig.from_dict({"arch": "topk", "d_in": 4, "d_dict": 8, "k": 2, "bogus": 1})
    with pytest.raises(ValueError, match="less than one batch"):
        TrainConfig.of(tokens=100, batch_tokens=4096)
    with pytest.raises(ValueError, match="must lie in"):
        TrainConfig.of(decay_frac=2.0)
    with pytest.raises(ValueError, match="no site kinds given"):
        expand_sites(" , ", "all", 4)
    with pytest.raises(ValueError, match="grad_clip=-1.0 is negative; pass a positive norm, or 0"):
        TrainConfig.of(grad_clip=-1.0)
    from circuitgraph.attribution.circuit import CircuitConfig
    from circuitgraph.attribution.dataset import DatasetAttributionConfig

    with pytest.raises(ValueError, match="positions must be 'aggregate' or 'from_end'"):
        CircuitConfig(positions="start")
    with pytest.raises(ValueError, match="positions must be 'aggregate' or 'from_end'"):
        DatasetAttributionConfig(positions="start")


def test_resume_with_other_settings_is_refused_and_keeps_the_checkpoint(default_model, tmp_path, monkeypatch) -> None:
    cfg = TrainConfig.of(arch="topk", k=8, expansion=2, tokens=512 * 6, batch_tokens=512, chunk_sequences=24,
                      model_batch=8, checkpoint_every=2, warmup_steps=2)
    corpus = ToyCorpus(CorpusConfig(seed=1, seq_len=64))
    real = ActivationStore.batches

    def dying(self, start_step=0):
        for i, b in enumerate(real(self, start_step)):
            if i == 3:
                raise KeyboardInterrupt
            yield b

    monkeypatch.setattr(ActivationStore, "batches", dying)
    with pytest.raises(KeyboardInterrupt):
        train_dictionaries(default_model, [Site(0, "resid_post")], corpus, cfg, tmp_path)
    monkeypatch.setattr(ActivationStore, "batches", real)
    ckpt = tmp_path / "train_checkpoint.safetensors"
    before = ckpt.read_bytes()
    with pytest.raises(DictionaryError, match="other settings or sites; delete it or rerun with the same flags"):
        train_dictionaries(default_model, [Site(1, "resid_post")], corpus, cfg, tmp_path)
    assert ckpt.read_bytes() == before and load_checkpoint(ckpt).meta["step"] == 2
    with pytest.raises(DictionaryError, match="no sites to train"):
        train_dictionaries(default_model, [], corpus, cfg, tmp_path)


def test_corrupt_checkpoint_and_empty_dictionary_folder(tmp_path) -> None:
    (tmp_path / "ck.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt or truncated.*delete it to restart"):
        load_checkpoint(tmp_path / "ck.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DictionaryError, match="holds no dictionary folders"):
        load_dictionaries(tmp_path / "empty")
    with pytest.raises(DictionaryError, match="does not exist"):
        load_dictionaries(tmp_path / "nowhere")


def test_saelens_refusals(tmp_path) -> None:
    tc = build_dictionary(DictionaryConfig(arch="topk", d_in=4, d_dict=8, d_out=6, k=2))
    with pytest.raises(DictionaryError, match="SAELens has no topk transcoder"):
        save_saelens(tc, tmp_path / "tc")
    folder = save_saelens(build_dictionary(DictionaryConfig(arch="relu", d_in=4, d_dict=8)), tmp_path / "sl")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "matryoshka"}))
    with pytest.raises(DictionaryError, match="'matryoshka' is not supported"):
        load_saelens(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(DictionaryError, match="fold the scaling factor into the weights first"):
        load_saelens(folder)
    with pytest.raises(DictionaryError, match="not a SAELens SAE folder"):
        load_saelens(tmp_path / "nowhere")
    topk = save_saelens(build_dictionary(DictionaryConfig(arch="topk", d_in=4, d_dict=8, k=3, site="L0.mlp_out")),
                        tmp_path / "tk")
    assert load_saelens(topk).cfg.k == 3
    cfg = json.loads((topk / "cfg.json").read_text())
    (topk / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "k"}))
    with pytest.raises(DictionaryError, match="TopK SAE without k"):  # was silently k = 32
        load_saelens(topk)


def test_model_and_task_errors(default_model, tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="llama2.c checkpoint .* not found"):
        resolve_model(str(tmp_path / "missing.bin"))
    with pytest.raises(TaskError, match="unknown split 'test'; use 'heldout' or 'train'"):
        make_dataset("ioi", default_model, n=2, split="test")  # type: ignore[arg-type]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "circuitgraph", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,message", [
    (("tasks", "eval", "--tasks", " , "), "--tasks is empty"),
    (("dicts", "eval", "--dicts", "/no/such/dir"), "dictionary folder /no/such/dir does not exist"),
])
def test_cli_errors(args, message) -> None:
    out = run_cli(*args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_api_and_file_refusals_name_the_problem(default_model, tmp_path):
    """Inputs a reviewer found raising raw Python errors or loading silently."""
    import json as _json

    import circuitgraph as cg
    from circuitgraph.errors import CircuitGraphError, TaskError

    with pytest.raises(CircuitGraphError, match="data must be a prompt .* got int"):
        cg.trace(default_model, None, 12345)
    with pytest.raises(CircuitGraphError, match=r"PromptDataset.from_records\(rows, model\)"):
        cg.trace(default_model, None, [{"prompt": "When Mary went", "answer": " Mary"}])
    f = tmp_path / "r.json"
    f.write_text(_json.dumps({"rows": 5}))
    with pytest.raises(TaskError, match="holds a list of row objects"):
        cg.PromptDataset.from_file(f, default_model)
    g = cg.trace(default_model, None, "When Mary and John went to the park", progress=False)
    with pytest.raises(CircuitGraphError, match="node ids are strings"):
        g.top_features(3)


def test_saelens_integer_weights_refused(tmp_path):
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from circuitgraph.api import load_dictionaries
    from dictionaries.errors import DictionaryError

    src = Path(__file__).resolve().parent / "fixtures" / "saelens" / "standard"
    shutil.copytree(src, tmp_path / "s")
    w = load_file(str(tmp_path / "s" / "sae_weights.safetensors"))
    save_file({**w, "W_enc": w["W_enc"].to(torch.int32)}, str(tmp_path / "s" / "sae_weights.safetensors"))
    with pytest.raises(DictionaryError, match="tensor W_enc is torch.int32; SAELens weights are floating point"):
        load_dictionaries(str(tmp_path / "s"))
