"""EleutherAI sparsify coders read as ours: outputs equal to sparsify's own (recorded by
benchmarks/make_golden_sparsify.py with eai-sparsify 1.3.3), hookpoints mapped to sites, bad
folders refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from circuitgraph.cli.main import main
from dictionaries.errors import DictionaryError
from dictionaries.persistence import load_dictionaries
from dictionaries.site import Site
from dictionaries.sparsify_format import hookpoint_site, load_sparsify

GOLDEN = Path(__file__).with_name("fixtures") / "sparsify"
SITES = {"layers.0.mlp": Site(0, "transcoder"), "layers.1": Site(1, "resid_post"), "layers.2.mlp": Site(2, "mlp_out")}


def test_golden_run_folder_reproduces_sparsify():
    """The whole run folder through --dicts' loader: every coder's latents (scattered from
    sparsify's top-k acts and indices) and outputs equal sparsify's to 1e-5."""
    expected = load_file(str(GOLDEN / "expected.safetensors"))
    dicts = load_dictionaries(GOLDEN)
    assert set(dicts) == set(SITES.values())
    for hookpoint, site in SITES.items():
        d = dicts[site]
        x = expected[f"{hookpoint}/inputs"]
        acts, idx = expected[f"{hookpoint}/latent_acts"], expected[f"{hookpoint}/latent_indices"]
        want = torch.zeros(x.shape[0], d.cfg.d_dict).scatter(1, idx, acts)
        with torch.no_grad():
            out = d(x)
        assert d.cfg.arch == "topk" and d.cfg.site == site.id
        assert (out.latents > 0).sum(1).tolist() == (acts > 0).sum(1).tolist()
        torch.testing.assert_close(out.latents, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.output, expected[f"{hookpoint}/sae_out"], atol=1e-5, rtol=0)
    assert dicts[Site(0, "transcoder")].W_skip is not None and dicts[Site(1, "resid_post")].W_skip is None


def test_single_hookpoint_folder_and_cli(tmp_path, capsys):
    """One hookpoint folder given alone, and a run folder through a CLI command's --dicts."""
    one = load_dictionaries(GOLDEN / "layers.1")
    assert list(one) == [Site(1, "resid_post")]
    seeded = shutil.copytree(GOLDEN / "layers.1", tmp_path / "layers.1" / "seed1")  # a run with several init_seeds
    assert list(load_dictionaries(seeded)) == [Site(1, "resid_post")]
    assert main(["dicts", "mmcs", str(GOLDEN), str(GOLDEN / "layers.2.mlp"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"L2.mlp_out": 1.0}


@pytest.mark.parametrize("hookpoint,transcode,site", [
    ("h.3", False, "L3.resid_post"), ("gpt_neox.layers.5", False, "L5.resid_post"),
    ("model.layers.2.mlp", True, "L2.transcoder"), ("transformer.h.0.mlp", False, "L0.mlp_out"),
    ("layers.11", False, "L11.resid_post"),
])
def test_hookpoints_map_to_sites(hookpoint, transcode, site):
    assert hookpoint_site(hookpoint, transcode).id == site


@pytest.mark.parametrize("hookpoint,transcode,match", [
    ("layers.3.self_attn", False, "no matching site"), ("embed_tokens", False, "no matching site"),
    ("layers.3.mlp.act_fn", False, "no matching site"), ("layers.3", True, "transcoder of a whole block"),
])
def test_unsupported_hookpoints_refused(hookpoint, transcode, match):
    with pytest.raises(DictionaryError, match=match):
        hookpoint_site(hookpoint, transcode)


def _copy(tmp_path: Path, name: str = "layers.2.mlp") -> Path:
    return Path(shutil.copytree(GOLDEN / "layers.2.mlp", tmp_path / name))


def _edit_cfg(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def _edit_weights(folder: Path, fn) -> None:
    w = load_file(str(folder / "sae.safetensors"))
    fn(w)
    save_file(w, str(folder / "sae.safetensors"))


def test_bad_folders_refused(tmp_path):
    renamed = _copy(tmp_path, "my_sae")
    with pytest.raises(DictionaryError, match="'my_sae' has no matching site"):
        load_dictionaries(renamed)
    group = _copy(tmp_path / "g")
    _edit_cfg(group, activation="groupmax")
    with pytest.raises(DictionaryError, match="groupmax"):
        load_sparsify(group)
    wide = _copy(tmp_path / "w")
    _edit_cfg(wide, num_latents=64)
    with pytest.raises(DictionaryError, match=r"encoder.weight \(32, 16\) \(expected \(64, 16\)\)"):
        load_sparsify(wide)
    noskip = _copy(tmp_path / "s")
    _edit_cfg(noskip, skip_connection=False)
    with pytest.raises(DictionaryError, match="W_skip unexpected"):
        load_sparsify(noskip)
    big_k = _copy(tmp_path / "k")
    _edit_cfg(big_k, k=33)
    with pytest.raises(DictionaryError, match="k=33 must lie between 1 and the 32 latents"):
        load_sparsify(big_k)
    nan = _copy(tmp_path / "n")
    _edit_weights(nan, lambda w: w["W_dec"].__setitem__((0, 0), float("nan")))
    with pytest.raises(DictionaryError, match="NaN or inf in W_dec"):
        load_sparsify(nan)
    nodec = _copy(tmp_path / "d")
    _edit_weights(nodec, lambda w: w.pop("W_dec"))
    with pytest.raises(DictionaryError, match="lacks W_dec"):
        load_sparsify(nodec)
    (tmp_path / "c" / "layers.2.mlp").mkdir(parents=True)
    (tmp_path / "c" / "layers.2.mlp" / "cfg.json").write_text("{not json")
    (tmp_path / "c" / "layers.2.mlp" / "sae.safetensors").write_bytes(b"x")
    with pytest.raises(DictionaryError, match="not valid JSON"):
        load_dictionaries(tmp_path / "c")
