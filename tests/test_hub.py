"""``hf:ORG/REPO[/PATH]`` references, offline: a Hugging Face cache laid out as huggingface_hub
writes it (``models--ORG--REPO/{refs/main, blobs/<hash>, snapshots/<sha>/...}``, files as links to
blobs) is read, and an absent repository fails at once with a message that says what to do."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from circuitgraph.cli.main import main
from dictionaries.errors import DictionaryError
from dictionaries.hub import parse_hub_reference, resolve_hub_reference
from dictionaries.persistence import load_dictionaries

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHA = "4f3c2b1a0918273645546372819a0b1c2d3e4f50"
GEMMA_PATH = "layer_1/width_16k/average_l0_tiny"


def _cache_repo(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay out ``files`` (repo path -> local file) as huggingface_hub's cache holds a downloaded repo."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(SHA)
    (root / "blobs").mkdir()
    for repo_path, src in files.items():
        data = src.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = root / "snapshots" / SHA / repo_path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return root


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    sl = FIXTURES / "saelens"
    _cache_repo(cache, "someorg/tiny-saes", {f"{name}/{f}": sl / name / f for name in ("gated", "hook_z", "transcoder")
                                             for f in ("cfg.json", "sae_weights.safetensors")})
    gemma = FIXTURES / "gemma_scope" / "gemma-scope-2b-pt-res" / GEMMA_PATH
    _cache_repo(cache, "google/gemma-scope-2b-pt-res", {f"{GEMMA_PATH}/params.npz": gemma / "params.npz"})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_cached_references_load_offline(hub_cache) -> None:
    (site, d), = load_dictionaries("hf:someorg/tiny-saes/gated").items()
    assert site.id == "L1.resid_mid"
    exp = load_file(str(FIXTURES / "saelens" / "gated" / "expected.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(d(exp["inputs"]).output, exp["output"], atol=1e-5, rtol=0)
    whole = load_dictionaries("hf:someorg/tiny-saes")  # the repository root: a folder of SAELens folders
    assert sorted(s.id for s in whole) == ["L0.attn_z", "L1.resid_mid", "L2.transcoder"]
    # Gemma Scope: the site comes from the cached repository's name and layer_N
    (site, d), = load_dictionaries(f"hf:google/gemma-scope-2b-pt-res/{GEMMA_PATH}").items()
    assert site.id == "L1.resid_post"
    exp = load_file(str(FIXTURES / "gemma_scope" / "gemma-scope-2b-pt-res" / GEMMA_PATH / "expected.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(d(exp["inputs"]).latents, exp["features"], atol=1e-5, rtol=0)
    assert resolve_hub_reference("hf:someorg/tiny-saes/gated", cache_dir=hub_cache).parts[-3:] == ("snapshots", SHA, "gated")


def test_cli_accepts_hub_references(hub_cache, capsys) -> None:
    assert main(["dicts", "mmcs", "hf:someorg/tiny-saes/gated", str(FIXTURES / "saelens" / "gated"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"L1.resid_mid": 1.0}
    assert main(["dicts", "mmcs", "hf:someorg/not-cached", "hf:someorg/tiny-saes"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuitgraph dicts: error: hf:someorg/not-cached: someorg/not-cached is not in the local")
    assert "Traceback" not in err


def test_absent_repository_fails_fast_and_says_what_to_do(hub_cache) -> None:
    start = time.perf_counter()
    with pytest.raises(DictionaryError) as info:
        load_dictionaries("hf:someorg/absent-saes/layer_3")
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"an absent repository took {elapsed:.2f} s to refuse offline"
    msg = str(info.value)
    assert "someorg/absent-saes is not in the local Hugging Face cache" in msg and str(hub_cache) in msg
    assert "downloads are off (HF_HUB_OFFLINE=1)" in msg and "`hf download someorg/absent-saes --include 'layer_3/*'`" in msg


def test_bad_references(hub_cache) -> None:
    with pytest.raises(DictionaryError, match=r"the cached copy of someorg/tiny-saes \(.*\) has no 'nope'; check the path"):
        load_dictionaries("hf:someorg/tiny-saes/nope")
    for bad in ("hf:only-a-name", "hf:", "hf:org/repo/../x"):
        with pytest.raises(DictionaryError, match="is not a hub reference; write hf:ORG/REPO or hf:ORG/REPO/PATH"):
            load_dictionaries(bad)
    assert parse_hub_reference("hf:a/b/c/d") == ("a/b", "c/d")
    assert parse_hub_reference("hf:a/b") == ("a/b", "")
