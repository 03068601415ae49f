"""circuit-tracer per-layer transcoder sets: the golden set written by circuit-tracer 0.5.0
(benchmarks/make_golden_circuit_tracer_transcoders.py) reproduced to 1e-5, our export read back
with the same outputs (and through the CLI), unfaithful or broken sets refused."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from circuitgraph.cli.main import main
from dictionaries.architectures.base import SparseDictionary
from dictionaries.architectures.registry import build_dictionary
from dictionaries.circuit_tracer_transcoders import load_transcoders_circuit_tracer, save_transcoders_circuit_tracer
from dictionaries.config import DictionaryConfig
from dictionaries.errors import DictionaryError
from dictionaries.persistence import load_dictionaries, save_dictionaries
from dictionaries.site import Site

GOLDEN = Path(__file__).with_name("fixtures") / "circuit_tracer_plt"


def test_golden_set_reproduces_circuit_tracer():
    expected = load_file(str(GOLDEN / "expected.safetensors"))
    dicts = load_dictionaries(GOLDEN)
    assert sorted(dicts) == [Site(i, "transcoder") for i in range(3)]
    assert [dicts[Site(i, "transcoder")].cfg.arch for i in range(3)] == ["relu", "jumprelu", "jumprelu"]
    for i in range(3):
        with torch.no_grad():
            out = dicts[Site(i, "transcoder")](expected["inputs"][i])
        torch.testing.assert_close(out.latents, expected["features"][i], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.output, expected["reconstruction"][i], atol=1e-5, rtol=0)
    assert (expected["features"] > 0).any(-1).all() and (expected["features"] == 0).any(-1).all()


def _random(arch: str, layer: int, d: int = 16, skip: bool = True, seed: int = 0, model: str = "m") -> SparseDictionary:
    g = torch.Generator().manual_seed(seed + layer)
    cfg = DictionaryConfig(arch=arch, d_in=d, d_dict=24, k=4, skip=skip, site=f"L{layer}.transcoder", model_name=model)
    t = build_dictionary(cfg)
    with torch.no_grad():
        for p in (t.W_enc, t.W_dec, t.b_enc, t.b_dec) + ((t.W_skip,) if skip else ()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        t.norm_in.fill_(1.7)
        t.norm_out.fill_(0.6)
        if arch == "jumprelu":
            t.log_threshold.copy_((torch.rand(24, generator=g) * 0.3 + 0.01).log())
        if arch == "batchtopk":
            t.threshold.fill_(0.2)
    return t.eval()


def _set(d: int = 16) -> dict[Site, SparseDictionary]:
    return {Site(0, "transcoder"): _random("relu", 0, d), Site(1, "transcoder"): _random("jumprelu", 1, d, skip=False),
            Site(2, "transcoder"): _random("batchtopk", 2, d)}


def test_export_round_trip(tmp_path):
    """Ours -> circuit-tracer's layout -> ours: the same latents and outputs (norms folded in,
    batchtopk as JumpReLU, a zero skip where a layer has none)."""
    ours = _set()
    folder = save_transcoders_circuit_tracer(ours, tmp_path / "ct")
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml"] + [f"layer_{i}.safetensors" for i in range(3)]
    assert "feature_input_hook: ln2.hook_normalized" in (folder / "config.yaml").read_text()
    assert torch.equal(load_file(str(folder / "layer_1.safetensors"))["W_skip"], torch.zeros(16, 16))
    back = load_dictionaries(folder)
    x = torch.randn(9, 16) * 2
    for site, d in ours.items():
        with torch.no_grad():
            a, b = d(x), back[site](x)
        assert (a.latents > 0).any() and (a.latents == 0).any()
        torch.testing.assert_close(b.latents, a.latents, atol=1e-5, rtol=0)
        torch.testing.assert_close(b.output, a.output, atol=1e-5, rtol=0)
    assert back[Site(0, "transcoder")].cfg.model_name == "m"


def test_cli_export_and_eval_on_the_model(tmp_path, capsys):
    """dicts export --to circuit-tracer writes a transcoder set for transcoder sites, and dicts eval
    of the exported set on the embedded model gives the numbers of the original folder."""
    archs = ("relu", "jumprelu", "batchtopk", "relu")
    ours = {Site(i, "transcoder"): _random(a, i, 128, seed=3, model="circuitgraph-toy") for i, a in enumerate(archs)}
    for d in ours.values():
        with torch.no_grad():
            d.W_enc.mul_(0.1)
            d.W_dec.mul_(0.05)
    save_dictionaries(ours, tmp_path / "ours")
    assert main(["dicts", "export", "--dicts", str(tmp_path / "ours"), "--to", "circuit-tracer",
                 "--out", str(tmp_path / "ct")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["model_kind"] == "transcoder_set" and report["layers"] == 4
    evals = []
    for folder in ("ours", "ct"):
        assert main(["dicts", "eval", "--dicts", str(tmp_path / folder), "--n-seq", "4", "--density-seqs", "0",
                     "--seq-len", "32", "--json"]) == 0
        evals.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    for sid, m in evals[0].items():
        for key in ("l0", "fvu", "kl"):
            assert evals[1][sid][key] == pytest.approx(m[key], rel=1e-5), (sid, key)


def test_export_refusals(tmp_path, capsys):
    with pytest.raises(DictionaryError, match="is topk"):
        save_transcoders_circuit_tracer({Site(0, "transcoder"): _random("topk", 0)}, tmp_path / "a")
    with pytest.raises(DictionaryError, match=r"at layers \[0, 2\]"):
        save_transcoders_circuit_tracer({Site(0, "transcoder"): _random("relu", 0),
                                         Site(2, "transcoder"): _random("relu", 2)}, tmp_path / "b")
    with pytest.raises(DictionaryError, match="no per-layer transcoder"):
        save_transcoders_circuit_tracer({}, tmp_path / "c")
    sae = build_dictionary(DictionaryConfig(arch="relu", d_in=16, d_dict=8, site="L0.resid_post"))
    save_dictionaries({Site(0, "resid_post"): sae}, tmp_path / "sae")
    clt = build_dictionary(DictionaryConfig(arch="relu", d_in=16, d_dict=8, site="L0.clt"))
    save_dictionaries({Site(0, "transcoder"): _random("relu", 0), Site(0, "clt"): clt}, tmp_path / "both")
    for folder, match in (("sae", "holds no transcoders to export"), ("both", "both cross-layer .clt. and per-layer")):
        assert main(["dicts", "export", "--dicts", str(tmp_path / folder), "--to", "circuit-tracer",
                     "--out", str(tmp_path / "o")]) == 2
        assert re.search(match, capsys.readouterr().err)


def _copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(GOLDEN, tmp_path / "set"))


def test_mlp_hooks_accepted_with_a_warning_for_mlp_out(tmp_path, caplog):
    folder = _copy(tmp_path)
    (folder / "config.yaml").write_text("model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\n"
                                        "feature_output_hook: mlp.hook_out\ntranscoders:\n"
                                        + "".join(f"  - layer_{i}.safetensors\n" for i in range(3)))
    with caplog.at_level(logging.WARNING):
        dicts = load_transcoders_circuit_tracer(folder)
    assert len(dicts) == 3 and "normalise the MLP output" in caplog.text


@pytest.mark.parametrize("config,match", [
    ("model_kind: transcoder_set\nfeature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n",
     "read hook_resid_mid.*not linear"),
    ("model_kind: transcoder_set\nfeature_input_hook: hook_resid_pre\nfeature_output_hook: hook_mlp_out\n",
     "'hook_resid_pre' .* not supported"),
    ("model_kind: transcoder_set\nfeature_input_hook: ln2.hook_normalized\nfeature_output_hook: hook_mlp_out\n"
     "transcoders:\n  - hf://google/gemma-scope-2b-pt-transcoders/layer_0/params.npz\n", "download the set first"),
    ("model_kind: transcoder_set\nfeature_input_hook: ln2.hook_normalized\nfeature_output_hook: hook_mlp_out\n"
     "transcoders:\n  - layer_0.npz\n", "not .safetensors"),
    ("model_kind: cross_layer_transcoder\n", "not transcoder_set"),
    ("feature_input_hook: [unclosed\n", "not valid YAML"),
])
def test_bad_configs_refused(tmp_path, config, match):
    folder = _copy(tmp_path)
    (folder / "config.yaml").write_text(config)
    with pytest.raises(DictionaryError, match=match):
        load_dictionaries(folder)


def _edit(path: Path, fn) -> None:
    w = load_file(str(path))
    fn(w)
    save_file(w, str(path))


def test_bad_layer_files_refused(tmp_path):
    cases = {
        "shape": lambda w: w.__setitem__("W_dec", torch.zeros(24, 15)),
        "nan": lambda w: w["b_enc"].__setitem__(0, float("nan")),
        "negative": lambda w: w["activation_function.threshold"].__setitem__(0, -0.1),
        "unknown": lambda w: w.__setitem__("log_thresholds", torch.zeros(24)),
        "missing": lambda w: w.pop("b_dec"),
    }
    matches = {"shape": r"W_dec \(24, 15\) \(expected \(24, 16\)\)", "nan": "NaN or inf in b_enc",
               "negative": "negative JumpReLU thresholds", "unknown": "unknown tensors \\['log_thresholds'\\]",
               "missing": "lacks b_dec"}
    for name, fn in cases.items():
        folder = Path(shutil.copytree(GOLDEN, tmp_path / name))
        _edit(folder / "layer_1.safetensors", fn)
        with pytest.raises(DictionaryError, match=matches[name]):
            load_transcoders_circuit_tracer(folder)
    gap = Path(shutil.copytree(GOLDEN, tmp_path / "gap"))
    (gap / "layer_1.safetensors").rename(gap / "layer_3.safetensors")
    with pytest.raises(DictionaryError, match="found layer_0..layer_0 and also layer_2.safetensors, layer_3"):
        load_dictionaries(gap)
    nocfg = Path(shutil.copytree(GOLDEN, tmp_path / "nocfg"))
    (nocfg / "config.yaml").unlink()
    with pytest.raises(DictionaryError, match="no config.yaml"):
        load_dictionaries(nocfg)
