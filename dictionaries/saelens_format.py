"""Read and write SAELens's on-disk format (``cfg.json`` + ``sae_weights.safetensors``).

So people can bring SAELens / Gemma-Scope-style SAEs here and take ours to SAELens. Mapping:

* ``standard`` <-> ``relu``; ``topk`` <-> ``topk`` (``k`` in the config); ``jumprelu`` <->
  ``jumprelu`` (``threshold`` stored directly); ``gated`` <-> ``gated`` (``b_gate`` is our
  ``b_enc``); our ``batchtopk`` is written as ``jumprelu`` with its inference threshold.
* SAELens subtracts ``b_dec`` from the input when ``apply_b_dec_to_input``; we fold that into the
  encoder bias (exactly equivalent). Our input/output scale factors are folded into the weights.
* Only autoencoders (``d_in == d_out``) and ``normalize_activations: none`` are covered.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dictionaries.architectures.base import SparseDictionary
from dictionaries.architectures.registry import build_dictionary
from dictionaries.config import DictionaryConfig
from dictionaries.errors import DictionaryError

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
_TO_SAELENS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated", "batchtopk": "jumprelu"}
_FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}


@torch.no_grad()
def save_saelens(d: SparseDictionary, folder: str | Path, hook_name: str = "", hook_layer: int = 0) -> Path:
    """Write ``d`` in SAELens's format (weights in model units, no input normalisation)."""
    if d.cfg.out_width != d.cfg.d_in or d.W_skip is not None:
        raise DictionaryError("the SAELens format here covers autoencoders only, not transcoders")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_in, n_out = float(d.norm_in), float(d.norm_out)
    w = {
        "W_enc": d.W_enc * n_in,
        "W_dec": d.W_dec / n_out,
        "b_enc": d.b_enc.clone(),
        "b_dec": d.b_dec / n_out,
    }
    arch = _TO_SAELENS[d.cfg.arch]
    if d.cfg.arch == "gated":
        w["b_gate"] = w.pop("b_enc")
        w["r_mag"] = d.r_mag.clone()
        w["b_mag"] = d.b_mag.clone()
    elif d.cfg.arch == "jumprelu":
        w["threshold"] = d.threshold.detach().clone()
    elif d.cfg.arch == "batchtopk":
        w["threshold"] = torch.full((d.cfg.d_dict,), float(d.threshold))
    save_file({k: v.contiguous().cpu() for k, v in w.items()}, str(folder / SAELENS_WEIGHTS))
    cfg = {
        "architecture": arch, "d_in": d.cfg.d_in, "d_sae": d.cfg.d_dict, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none",
        "reshape_activations": "hook_z" if hook_name.endswith("hook_z") else "none",
        "metadata": {"model_name": d.cfg.model_name, "hook_name": hook_name, "hook_layer": hook_layer},
        "model_name": d.cfg.model_name, "hook_name": hook_name, "hook_layer": hook_layer,
    }
    if arch == "topk":
        cfg["k"] = d.cfg.k
    (folder / SAELENS_CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


@torch.no_grad()
def load_saelens(folder: str | Path, device: str = "cpu") -> SparseDictionary:
    """Load a SAELens-format SAE folder as one of our dictionaries (same outputs on the same inputs)."""
    folder = Path(folder)
    cfg_path, w_path = folder / SAELENS_CFG, folder / SAELENS_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise DictionaryError(f"{folder} is not a SAELens SAE folder: it needs {SAELENS_CFG} and {SAELENS_WEIGHTS}")
    try:
        raw = json.loads(cfg_path.read_text())
        w = load_file(str(w_path))
    except (json.JSONDecodeError, SafetensorError, OSError) as err:
        raise DictionaryError(f"{folder} holds a corrupt SAELens file ({err})") from err
    arch = raw.get("architecture", "standard")
    if arch not in _FROM_SAELENS:
        raise DictionaryError(f"SAELens architecture {arch!r} is not supported; supported: {', '.join(_FROM_SAELENS)}")
    if raw.get("normalize_activations", "none") not in ("none", None):
        raise DictionaryError(
            f"SAE normalises activations with {raw['normalize_activations']!r}, which needs a scale this file "
            "does not store; fold the scaling factor into the weights first (SAELens: fold_activation_norm_scaling_factor)"
        )
    if arch == "topk" and "k" not in raw:
        raise DictionaryError(f"{cfg_path} describes a TopK SAE without k; add \"k\": <active latents> to it "
                              "(SAELens writes it for every TopK SAE)")
    d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
    meta = raw.get("metadata") or raw.get("meta") or {}
    cfg = DictionaryConfig(
        arch=_FROM_SAELENS[arch], d_in=d_in, d_dict=d_sae, k=int(raw.get("k", min(32, d_sae))),
        site="", model_name=str(meta.get("model_name") or raw.get("model_name") or ""),
    )
    d = build_dictionary(cfg)
    if w["W_enc"].shape != (d_in, d_sae) or w["W_dec"].shape != (d_sae, d_in):
        raise DictionaryError(f"{w_path}: W_enc/W_dec shapes {tuple(w['W_enc'].shape)}/{tuple(w['W_dec'].shape)} "
                              f"do not match d_in={d_in}, d_sae={d_sae}")
    d.W_enc.copy_(w["W_enc"])
    d.W_dec.copy_(w["W_dec"])
    d.b_dec.copy_(w["b_dec"])
    shift = w["b_dec"] @ w["W_enc"] if raw.get("apply_b_dec_to_input", True) else torch.zeros(d_sae)
    if arch == "gated":
        d.b_enc.copy_(w["b_gate"] - shift)
        d.r_mag.copy_(w["r_mag"])
        d.b_mag.copy_(w["b_mag"] - shift * w["r_mag"].exp())
    else:
        d.b_enc.copy_(w["b_enc"] - shift)
    if arch == "jumprelu":
        d.log_threshold.copy_(w["threshold"].clamp(min=1e-12).log())
    if not math.isfinite(float(d.W_enc.abs().sum())):
        raise DictionaryError(f"{w_path} holds non-finite weights")
    d.eval()
    return d.to(device)
