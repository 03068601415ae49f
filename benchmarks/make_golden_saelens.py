"""Write the SAELens and Gemma Scope golden fixtures: small dictionaries saved and run by SAELens itself.

    make bench-env && .venv-bench/bin/python benchmarks/make_golden_saelens.py

Run once; the outputs are committed and ``tests/test_saelens_format.py`` must reproduce them to 1e-5
with our readers (no SAELens import in the tests).

``tests/fixtures/saelens/<name>/``: a SAELens SAE or transcoder built with SAELens's own classes,
seeded random weights (non-zero biases, thresholds, skip matrices), saved with its ``save_model``
(``cfg.json`` + ``sae_weights.safetensors``), read back with ``SAE.load_from_disk`` and run on fixed
inputs; ``expected.safetensors`` holds the ``inputs``, the loaded SAE's ``features`` (``encode``) and
``output`` (``forward``). ``topk_legacy_cfg`` has a hand-written pre-6.0 config (``hook_point``,
``activation_fn: topk``) that SAELens reads with its own backwards-compatibility defaults. The
``hook_z`` fixture takes ``[N, n_heads, d_head]`` inputs, as SAELens does at ``hook_z``.

``tests/fixtures/gemma_scope/<repo>/layer_N/width_16k/average_l0_tiny/``: a Gemma-Scope-style
``params.npz`` written with numpy, loaded through SAELens's own Gemma Scope path
(``SAE.from_pretrained`` with its ``gemma_2`` / ``gemma_2_transcoder`` converters, reading a
Hugging Face cache made here, offline), widths overridden since the weights are tiny (the folder
names mirror the real repositories; nothing else about them is real). ``golden.json`` in each
folder names the sae_lens version.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

CACHE = tempfile.mkdtemp(prefix="golden_hf_cache_")
os.environ["HF_HUB_OFFLINE"] = "1"  # the Gemma Scope loaders read the cache made below, never the network
os.environ["HF_HUB_CACHE"] = CACHE

import numpy as np  # noqa: E402
import sae_lens  # noqa: E402
import torch  # noqa: E402
from sae_lens import SAE  # noqa: E402
from sae_lens.loading.pretrained_sae_loaders import (  # noqa: E402
    gemma_2_sae_huggingface_loader,
    gemma_2_transcoder_huggingface_loader,
)
from sae_lens.saes import (  # noqa: E402
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    Transcoder,
    TranscoderConfig,
)
from sae_lens.saes.sae import SAEMetadata  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

D_IN, D_SAE, N_TOK, N_HEADS, D_HEAD = 32, 64, 12, 4, 8
MODEL = "gpt2-small"  # a TransformerLens alias (of gpt2), so the reader's name normalisation is exercised

# name: (class, config class, hook, hook out, extra config)
SAES = {
    "standard": (StandardSAE, StandardSAEConfig, "blocks.0.hook_resid_post", None, {"apply_b_dec_to_input": True}),
    "topk": (TopKSAE, TopKSAEConfig, "blocks.1.hook_mlp_out", None,
             {"k": 6, "rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": True}),
    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, "blocks.1.hook_resid_pre", None, {"apply_b_dec_to_input": False}),
    "gated": (GatedSAE, GatedSAEConfig, "blocks.1.hook_resid_mid", None, {"apply_b_dec_to_input": True}),
    "hook_z": (StandardSAE, StandardSAEConfig, "blocks.0.attn.hook_z", None,
               {"apply_b_dec_to_input": True, "reshape_activations": "hook_z"}),
    "transcoder": (Transcoder, TranscoderConfig, "blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out",
                   {"apply_b_dec_to_input": False, "d_out": D_IN}),
    "skip_transcoder": (SkipTranscoder, SkipTranscoderConfig, "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out",
                        {"apply_b_dec_to_input": False, "d_out": D_IN}),
    "jumprelu_skip_transcoder": (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig, "blocks.1.ln2.hook_normalized",
                                 "blocks.1.hook_mlp_out", {"apply_b_dec_to_input": False, "d_out": D_IN}),
}
# repository, folder, converter, width overrides
GEMMA = {
    "res": ("google/gemma-scope-2b-pt-res", "layer_1/width_16k/average_l0_tiny", gemma_2_sae_huggingface_loader),
    "att": ("google/gemma-scope-2b-pt-att", "layer_0/width_16k/average_l0_tiny", gemma_2_sae_huggingface_loader),
    "transcoders": ("google/gemma-scope-2b-pt-transcoders", "layer_2/width_16k/average_l0_tiny",
                    gemma_2_transcoder_huggingface_loader),
}


def random_params(g: torch.Generator, names: list[str], d_out: int = D_IN) -> dict[str, torch.Tensor]:
    """Seeded weights: unit-scale encoder columns, biases and thresholds away from zero."""
    shapes = {"W_enc": (D_IN, D_SAE), "W_dec": (D_SAE, d_out), "b_enc": (D_SAE,), "b_dec": (d_out,),
              "threshold": (D_SAE,), "b_gate": (D_SAE,), "r_mag": (D_SAE,), "b_mag": (D_SAE,), "W_skip": (d_out, D_IN)}
    out = {}
    for name in names:
        t = torch.randn(*shapes[name], generator=g)
        if name == "W_enc":
            t = t / D_IN**0.5
        elif name == "W_dec":
            t = t * (0.5 + torch.rand(D_SAE, 1, generator=g)) / D_SAE**0.25  # rows of unequal norm
        elif name == "threshold":
            t = 0.05 + 0.3 * torch.rand(D_SAE, generator=g)
        else:
            t = t * 0.1 if name in ("r_mag", "W_skip") else t * 0.2
        out[name] = t.contiguous()
    return out


def record(sae, x: torch.Tensor, folder: Path, extra_meta: dict) -> None:
    with torch.no_grad():
        feats, out = sae.encode(x), sae(x)
    save_file({"inputs": x.contiguous(), "features": feats.contiguous(), "output": out.contiguous()},
              str(folder / "expected.safetensors"), metadata={"sae_lens": sae_lens.__version__, **extra_meta})
    print(f"{folder}: {type(sae).__name__}, mean L0 {(feats > 0).float().sum(-1).mean():.1f} of {feats.shape[-1]}")


def make_saelens(root: Path, g: torch.Generator) -> None:
    for name, (cls, cfg_cls, hook, hook_out, extra) in SAES.items():
        meta = SAEMetadata(hook_name=hook, model_name=MODEL, **({"hook_name_out": hook_out} if hook_out else {}))
        sae = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=meta, **extra))
        with torch.no_grad():
            for k, v in random_params(g, [k for k in sae.state_dict()]).items():
                getattr(sae, k).copy_(v)
        folder = root / name
        shutil.rmtree(folder, ignore_errors=True)
        sae.save_model(folder)
        back = SAE.load_from_disk(folder)
        x = torch.randn(N_TOK, N_HEADS, D_HEAD, generator=g) if name == "hook_z" else torch.randn(N_TOK, D_IN, generator=g)
        with torch.no_grad():
            assert torch.equal(back(x), sae(x)), f"SAELens's own save/load changed {name}"
        record(back, x, folder, {"hook_name": hook})
    # a config in the flat pre-6.0 layout, read by SAELens's backwards-compatibility path
    folder = root / "topk_legacy_cfg"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    cfg = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
           "model_name": MODEL, "hook_point": "blocks.2.hook_resid_post", "hook_point_layer": 2,
           "hook_point_head_index": None, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5},
           "apply_b_dec_to_input": True, "normalize_activations": False, "sae_lens_training_version": "3.13.0"}
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(random_params(g, ["W_enc", "W_dec", "b_enc", "b_dec"]), str(folder / "sae_weights.safetensors"))
    back = SAE.load_from_disk(folder)
    assert type(back).__name__ == "TopKSAE" and back.cfg.k == 5, "SAELens read the legacy config differently"
    record(back, torch.randn(N_TOK, D_IN, generator=g), folder, {"hook_name": "blocks.2.hook_resid_post"})


def _tiny(loader, **widths):
    """SAELens's converter with the widths of our tiny weights (its config reads them from the names)."""
    def convert(repo_id, folder_name, device="cpu", force_download=False, cfg_overrides=None):
        return loader(repo_id, folder_name, device, force_download, {**(cfg_overrides or {}), **widths})
    return convert


def make_gemma_scope(root: Path, g: torch.Generator) -> None:
    sha = "0123456789abcdef0123456789abcdef01234567"
    for kind, (repo, sub, loader) in GEMMA.items():
        folder = root / repo.split("/")[1] / sub
        shutil.rmtree(root / repo.split("/")[1], ignore_errors=True)
        folder.mkdir(parents=True)
        params = random_params(g, ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"])
        np.savez(folder / "params.npz", **{k: v.numpy().astype(np.float32) for k, v in params.items()})
        cache = Path(CACHE) / f"models--{repo.replace('/', '--')}"
        (cache / "refs").mkdir(parents=True)
        (cache / "refs" / "main").write_text(sha)
        (cache / "snapshots" / sha / sub).mkdir(parents=True)
        shutil.copy(folder / "params.npz", cache / "snapshots" / sha / sub / "params.npz")
        widths = {"d_in": D_IN, "d_sae": D_SAE} | ({"d_out": D_IN} if kind == "transcoders" else {})
        sae = SAE.from_pretrained(repo, sub, converter=_tiny(loader, **widths))
        x = torch.randn(N_TOK, N_HEADS, D_HEAD, generator=g) if kind == "att" else torch.randn(N_TOK, D_IN, generator=g)
        record(sae, x, folder, {"hook_name": sae.cfg.metadata.hook_name, "loader": loader.__name__})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    version = {"sae_lens": sae_lens.__version__, "torch": torch.__version__, "written_by": "benchmarks/make_golden_saelens.py"}
    for sub, make in (("saelens", make_saelens), ("gemma_scope", make_gemma_scope)):
        root = Path(args.out) / sub
        root.mkdir(parents=True, exist_ok=True)
        make(root, g)
        (root / "golden.json").write_text(json.dumps(version, indent=2) + "\n")
    shutil.rmtree(CACHE, ignore_errors=True)


if __name__ == "__main__":
    main()
