"""SAELens folders and Gemma Scope params.npz read by our loaders reproduce SAELens's own outputs.

The fixtures (``tests/fixtures/saelens``, ``tests/fixtures/gemma_scope``) were written and run by
SAELens itself (``benchmarks/make_golden_saelens.py``, sae_lens version in ``golden.json``); no
SAELens import here. Our writer is checked against SAELens in ``benchmarks/check_writers_saelens.py``;
here it is checked by reading back and by the keys SAELens itself writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformer_lens import HookedTransformerConfig

from dictionaries.architectures.registry import build_dictionary
from dictionaries.config import DictionaryConfig
from dictionaries.errors import DictionaryError
from dictionaries.formats import detect_format
from dictionaries.gemma_scope_format import gemma_scope_site, load_gemma_scope
from dictionaries.persistence import check_against_model, load_dictionaries
from dictionaries.saelens_format import load_saelens, load_saelens_sites, save_saelens
from dictionaries.site import Site

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SAELENS = FIXTURES / "saelens"
GEMMA = FIXTURES / "gemma_scope"
SAELENS_SITES = {
    "standard": "L0.resid_post", "topk": "L1.mlp_out", "jumprelu": "L1.resid_pre", "gated": "L1.resid_mid",
    "hook_z": "L0.attn_z", "transcoder": "L2.transcoder", "skip_transcoder": "L0.transcoder",
    "jumprelu_skip_transcoder": "L1.transcoder", "topk_legacy_cfg": "L2.resid_post",
}
GEMMA_SITES = {
    "gemma-scope-2b-pt-res/layer_1/width_16k/average_l0_tiny": "L1.resid_post",
    "gemma-scope-2b-pt-att/layer_0/width_16k/average_l0_tiny": "L0.attn_z",
    "gemma-scope-2b-pt-transcoders/layer_2/width_16k/average_l0_tiny": "L2.transcoder",
}
TINY_MODEL = HookedTransformerConfig(n_layers=3, d_model=32, n_ctx=8, d_head=8, n_heads=4, d_mlp=64, d_vocab=10,
                                     act_fn="gelu", model_name="gpt2")


def _check_outputs(d, folder: Path) -> None:
    exp = load_file(str(folder / "expected.safetensors"))
    x = exp["inputs"].reshape(exp["inputs"].shape[0], -1)  # hook_z: [N, n_heads, d_head] -> [N, n_heads*d_head]
    with torch.no_grad():
        out = d(x)
    torch.testing.assert_close(out.latents, exp["features"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.output, exp["output"].reshape(x.shape[0], -1), atol=1e-5, rtol=0)
    assert (exp["features"] > 0).any() and (exp["features"] == 0).any()  # the fixture exercises the sparsifier


@pytest.mark.parametrize("name", sorted(SAELENS_SITES))
def test_saelens_fixture_reproduces_saelens_outputs(name: str) -> None:
    folder = SAELENS / name
    (site, d), = load_saelens_sites(folder).items()
    assert site.id == SAELENS_SITES[name] == d.cfg.site
    assert d.cfg.model_name == "gpt2"  # SAELens's "gpt2-small" is TransformerLens's alias of gpt2
    assert (d.W_skip is not None) == ("skip" in name)
    _check_outputs(d, folder)


@pytest.mark.parametrize("path", sorted(GEMMA_SITES))
def test_gemma_scope_fixture_reproduces_saelens_outputs(path: str) -> None:
    folder = GEMMA / path
    (site, d), = load_gemma_scope(folder / "params.npz").items()
    assert site.id == GEMMA_SITES[path] and d.cfg.arch == "jumprelu"
    _check_outputs(d, folder)


def test_folder_of_saelens_folders_is_one_dictionary_set() -> None:
    dicts = load_dictionaries(SAELENS)  # what --dicts tests/fixtures/saelens reads
    assert sorted(s.id for s in dicts) == sorted(SAELENS_SITES.values())
    check_against_model(dicts, TINY_MODEL)  # widths and the (normalised) model name fit a 3-layer gpt2-like model
    one = load_dictionaries(SAELENS / "gated")
    assert [s.id for s in one] == ["L1.resid_mid"]
    assert detect_format(SAELENS / "gated").name == "SAELens SAE or transcoder"
    for path, site in GEMMA_SITES.items():  # --dicts accepts the params.npz or its folder
        assert [s.id for s in load_dictionaries(GEMMA / path / "params.npz")] == [site]
        assert [s.id for s in load_dictionaries(GEMMA / path)] == [site]


def test_hook_z_flattening_is_head_major() -> None:
    """SAELens flattens hook_z as (n_heads d_head); so do our activations ([B, P, H, dh] -> [B*P, H*dh])."""
    exp = load_file(str(SAELENS / "hook_z" / "expected.safetensors"))
    d = load_saelens(SAELENS / "hook_z")
    z = exp["inputs"][None]  # [1, N, H, dh]: a batch of one sequence as TransformerLens gives hook_z
    ours = z.reshape(z.shape[0] * z.shape[1], -1)  # dictionaries/activations.py's flattening
    torch.testing.assert_close(d.encode(ours), exp["features"], atol=1e-5, rtol=0)
    swapped = z.transpose(-1, -2).reshape(z.shape[1], -1)  # the other order gives other features
    assert not torch.allclose(d.encode(swapped), exp["features"], atol=1e-3)


@pytest.mark.parametrize(("arch", "skip", "d_out", "site", "saelens_arch"), [
    ("relu", False, 0, Site(0, "resid_post"), "standard"),
    ("topk", False, 0, Site(1, "mlp_out"), "topk"),
    ("jumprelu", False, 0, Site(1, "resid_pre"), "jumprelu"),
    ("gated", False, 0, Site(1, "resid_mid"), "gated"),
    ("relu", False, 0, Site(0, "attn_z"), "standard"),
    ("relu", False, 0, Site(2, "transcoder"), "transcoder"),
    ("relu", True, 0, Site(0, "transcoder"), "skip_transcoder"),
    ("jumprelu", True, 0, Site(1, "transcoder"), "jumprelu_skip_transcoder"),
    ("batchtopk", True, 0, Site(1, "transcoder"), "jumprelu_skip_transcoder"),
    ("jumprelu", False, 48, Site(1, "mlp_post"), "jumprelu_transcoder"),
])
def test_writer_round_trip_and_saelens_keys(arch, skip, d_out, site, saelens_arch, tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    d = build_dictionary(DictionaryConfig(arch=arch, d_in=32, d_dict=64, d_out=d_out, k=6, skip=skip, site=site.id,
                                          model_name="gpt2"))
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        d.norm_in.fill_(1.7)
        d.norm_out.fill_(0.6)
        if arch == "batchtopk":
            d.threshold.fill_(0.2)
    d.eval()
    folder = save_saelens(d, tmp_path / "sl", site=site)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == saelens_arch
    meta = cfg["metadata"]
    assert meta["hook_name"] == site.input_hook and meta.get("hook_name_out", site.output_hook) == site.output_hook
    if d_out == 0:  # SAELens itself wrote a fixture of this architecture: same config keys, same tensors
        ref = next(SAELENS / n for n in SAELENS_SITES if json.loads((SAELENS / n / "cfg.json").read_text())
                   ["architecture"] == saelens_arch)
        assert set(cfg) == set(json.loads((ref / "cfg.json").read_text()))
        assert set(load_file(str(folder / "sae_weights.safetensors"))) == set(load_file(str(ref / "sae_weights.safetensors")))
    (got_site, e), = load_saelens_sites(folder).items()
    assert got_site == site
    x = torch.randn(16, 32, generator=g)
    with torch.no_grad():
        a, b = d(x), e(x)
    assert (a.latents > 0).any()
    torch.testing.assert_close(b.latents, a.latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.output, a.output, atol=1e-5, rtol=1e-5)


def _edit_cfg(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "cfg.json").read_text())
    meta = cfg.get("metadata", {})
    for key, value in changes.items():
        target = meta if key.startswith("hook") else cfg
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
    (dst / "cfg.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(("fixture", "changes", "message"), [
    ("standard", {"hook_name": "hook_embed"}, "hook hook_embed is not a site; dictionaries here read one of"),
    ("transcoder", {"hook_name": "blocks.2.hook_mlp_in"}, "transcoders here read blocks.L.ln2.hook_normalized"),
    ("transcoder", {"hook_name_out": None}, "names the hook it writes in metadata.hook_name_out"),
    ("hook_z", {"hook_head_index": 2}, "reads one attention head"),
    ("standard", {"normalize_activations": "expected_average_only_in"}, "fold the scaling factor into the weights"),
    ("topk", {"k": None}, "TopK SAE without k"),
    ("standard", {"architecture": "matching_pursuit"}, "'matching_pursuit' is not supported; supported: standard"),
    ("transcoder", {"apply_b_dec_to_input": True}, "SAELens itself refuses it"),
    ("standard", {"hook_name": None}, "names no hook; add \"hook_name\""),
])
def test_saelens_refusals_name_the_problem(fixture, changes, message, tmp_path) -> None:
    folder = _edit_cfg(SAELENS / fixture, tmp_path / "x", **changes)
    with pytest.raises(DictionaryError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_dictionaries(folder)


def test_saelens_site_from_folder_name_and_bad_tensors(tmp_path) -> None:
    folder = _edit_cfg(SAELENS / "standard", tmp_path / "L3.mlp_out", hook_name=None)
    assert [s.id for s in load_dictionaries(folder)] == ["L3.mlp_out"]  # no hook: the folder names the site
    w = load_file(str(folder / "sae_weights.safetensors"))
    from safetensors.torch import save_file

    save_file({**w, "b_enc": torch.full_like(w["b_enc"], float("nan"))}, str(folder / "sae_weights.safetensors"))
    with pytest.raises(DictionaryError, match="b_enc hold NaN or infinite values"):
        load_dictionaries(folder)
    save_file({**w, "W_extra": torch.zeros(3)}, str(folder / "sae_weights.safetensors"))
    with pytest.raises(DictionaryError, match="'W_extra' is not part of a SAELens standard"):
        load_dictionaries(folder)
    (folder / "sae_weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DictionaryError, match="corrupt SAELens file"):
        load_dictionaries(folder)


def test_writer_refusals() -> None:
    with pytest.raises(DictionaryError, match="SAELens has no topk transcoder"):
        save_saelens(build_dictionary(DictionaryConfig(arch="topk", d_in=4, d_dict=8, d_out=6, k=2)), "unused")
    with pytest.raises(DictionaryError, match="no SAELens form; export the set with"):
        save_saelens(build_dictionary(DictionaryConfig(arch="relu", d_in=4, d_dict=8, d_out=8, out_layers=2)), "unused")


def test_gemma_scope_site_rules_and_refusals(tmp_path) -> None:
    assert gemma_scope_site("x/models--google--gemma-scope-9b-it-res/snapshots/abc/layer_20/width_16k/c/params.npz") \
        == Site(20, "resid_post")
    assert gemma_scope_site("gemma-scope-2b-pt-mlp/layer_3/width_65k/average_l0_9/params.npz") == Site(3, "mlp_out")
    src = GEMMA / next(iter(GEMMA_SITES)) / "params.npz"
    named = tmp_path / "L5.resid_post"
    named.mkdir()
    shutil.copy(src, named / "params.npz")
    assert [s.id for s in load_dictionaries(tmp_path)] == ["L5.resid_post"]  # a folder of site-named folders
    loose = tmp_path / "mine"
    loose.mkdir()
    shutil.copy(src, loose / "params.npz")
    with pytest.raises(DictionaryError, match=r"cannot tell which site .* L20.resid_post/params.npz\) or pass the site: load_gemma_scope\(path, site=Site"):
        load_dictionaries(loose / "params.npz")
    assert list(load_gemma_scope(loose, site=Site(4, "mlp_out"))) == [Site(4, "mlp_out")]
    with pytest.raises(DictionaryError, match="embedding SAE"):
        gemma_scope_site("gemma-scope-2b-pt-embeddings/layer_0/width_4k/average_l0_6/params.npz")
    with np.load(src) as data:
        params = dict(data)
    np.savez(loose / "params.npz", **{k: v for k, v in params.items() if k != "threshold"})
    with pytest.raises(DictionaryError, match="missing threshold"):
        load_gemma_scope(loose, site=Site(4, "mlp_out"))
    np.savez(loose / "params.npz", **params, scaling_factor=np.full(64, 2.0, dtype=np.float32))
    with pytest.raises(DictionaryError, match="scaling_factor is not all ones"):
        load_gemma_scope(loose, site=Site(4, "mlp_out"))
    np.savez(loose / "params.npz", **{**params, "b_dec": params["b_dec"][:5]})
    with pytest.raises(DictionaryError, match="do not fit W_enc"):
        load_gemma_scope(loose, site=Site(4, "mlp_out"))
    (loose / "params.npz").write_bytes(b"junk")
    with pytest.raises(DictionaryError, match="missing or corrupt"):
        load_gemma_scope(loose, site=Site(4, "mlp_out"))


def test_cli_export_to_saelens_reads_back(tmp_path, capsys) -> None:
    from circuitgraph.cli.main import main
    from circuitgraph.models.loading import V1_DICTS_DIR
    from dictionaries.persistence import save_dictionaries

    g = torch.Generator().manual_seed(2)
    dicts = {}
    for arch, skip, site in (("relu", False, Site(0, "resid_post")), ("topk", False, Site(1, "attn_z")),
                             ("jumprelu", True, Site(2, "transcoder"))):
        d = build_dictionary(DictionaryConfig(arch=arch, d_in=32, d_dict=64, k=6, skip=skip, site=site.id))
        with torch.no_grad():
            for p in d.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        dicts[site] = d.eval()
    save_dictionaries(dicts, tmp_path / "ours")
    assert main(["dicts", "export", "--dicts", str(tmp_path / "ours"), "--to", "saelens", "--out", str(tmp_path / "sl")]) == 0
    assert json.loads(capsys.readouterr().out)["sites"] == ["L0.resid_post", "L1.attn_z", "L2.transcoder"]
    back = load_dictionaries(tmp_path / "sl")
    assert set(back) == set(dicts)
    x = torch.randn(8, 32, generator=g)
    for site, d in dicts.items():
        torch.testing.assert_close(back[site](x).output, d(x).output, atol=1e-5, rtol=1e-5)
    # the v1 set's transcoders are TopK, which SAELens cannot hold: one clear line, no traceback
    assert main(["dicts", "export", "--dicts", str(V1_DICTS_DIR), "--to", "saelens", "--out", str(tmp_path / "v1")]) == 2
    assert "L0.transcoder: SAELens has no topk transcoder" in capsys.readouterr().err
    assert not (tmp_path / "v1").exists() or not any((tmp_path / "v1").iterdir())  # nothing half-written


def test_transcoder_reading_mlp_hook_in_is_the_ln2_transcoder(tmp_path) -> None:
    """circuit-tracer's (and TransformerBridge's) name for the MLP's normalised input reads as ln2.hook_normalized."""
    original = load_dictionaries(SAELENS / "transcoder")
    (site,) = original
    folder = _edit_cfg(SAELENS / "transcoder", tmp_path / "x", hook_name=f"blocks.{site.layer}.mlp.hook_in")
    renamed = load_dictionaries(folder)
    assert list(renamed) == [site] and site.kind == "transcoder"
    x = torch.randn(5, original[site].cfg.d_in, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(renamed[site](x).output, original[site](x).output, rtol=0, atol=0)


@pytest.mark.parametrize("fixture", ["standard", "gated", "jumprelu", "skip_transcoder"])
def test_saelens_tensor_of_the_wrong_shape_is_named(fixture, tmp_path) -> None:
    from safetensors.torch import save_file

    src = load_file(str(SAELENS / fixture / "sae_weights.safetensors"))
    for name in sorted(src):
        if name in ("W_enc", "W_dec"):
            continue
        folder = _edit_cfg(SAELENS / fixture, tmp_path / name)
        save_file({**src, name: src[name][..., :-1].contiguous()}, str(folder / "sae_weights.safetensors"))
        with pytest.raises(DictionaryError, match=f"tensor {name} has shape"):
            load_dictionaries(folder)
