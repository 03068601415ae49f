"""Read EleutherAI sparsify's on-disk sparse coders (TopK SAEs and transcoders).

sparsify (``sparsify.SparseCoder``) saves each trained hookpoint as a folder named after the
hookpoint, holding ``cfg.json`` (its ``SparseCoderConfig`` fields plus ``d_in``) and
``sae.safetensors`` with

* ``encoder.weight`` ``[n, d_in]`` and ``encoder.bias`` ``[n]`` (an ``nn.Linear``);
* ``W_dec`` ``[n, d_in]`` and ``b_dec`` ``[d_in]``;
* ``W_skip`` ``[d_in, d_in]`` when ``skip_connection`` (applied as ``x @ W_skip.T``).

Its equations: an SAE centres its input first, ``pre = relu((x - b_dec) @ W_e.T + b_e)``; a
transcoder (``transcode: true``) does not, ``pre = relu(x @ W_e.T + b_e)``; both keep the ``k``
largest values of ``pre`` and output ``top @ W_dec + b_dec (+ x @ W_skip.T)``. A training run is a
folder of such hookpoint folders; :func:`dictionaries.persistence.load_dictionaries` reads one
hookpoint folder or the whole run (each sub-folder in turn). A run with several ``init_seeds``
nests one ``seedN/`` folder per seed under each hookpoint; give one of those folders.

Mapping to ours (``topk``, no input/output scaling): ``W_enc = W_e.T``, ``b_enc = b_e - W_e @ b_dec``
for an SAE (the centring folded into the bias, exactly), ``b_enc = b_e`` for a transcoder;
``W_dec``, ``b_dec`` as they are; ``W_skip`` transposed. Hookpoints are Hugging Face module names
relative to the model's base (``layers.3``, ``h.3``, ``gpt_neox.layers.3``, ``model.layers.3``):

=================================== =========== =========================================
hookpoint                            coder       our site
=================================== =========== =========================================
``<layers>.L`` (a block's output)     SAE         ``L{L}.resid_post``
``<layers>.L.mlp`` (the MLP output)   SAE         ``L{L}.mlp_out``
``<layers>.L.mlp``                    transcoder  ``L{L}.transcoder`` (MLP input -> MLP output)
=================================== =========== =========================================

Anything else (attention outputs, a transcoder of a whole block, ``groupmax`` activations) is
refused with the reason. The coders saw the Hugging Face model's activations, which equal the
TransformerLens hooks when the model is loaded without weight processing (``fold_ln``,
``center_writing_weights``); see docs/dictionaries.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from dictionaries.architectures.base import SparseDictionary
from dictionaries.architectures.registry import build_dictionary
from dictionaries.circuit_tracer_format import read_tensors
from dictionaries.config import DictionaryConfig
from dictionaries.errors import DictionaryError
from dictionaries.site import Site

SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
_HOOKPOINT = re.compile(r"^(?:[A-Za-z_]\w*\.)*?(?:layers|h|blocks|layer)\.(\d+)(\.mlp)?$")


def is_sparsify_coder(path: str | Path) -> bool:
    """Whether ``path`` is one sparsify hookpoint folder (``cfg.json`` + ``sae.safetensors``)."""
    path = Path(path)
    return (path / SPARSIFY_WEIGHTS).is_file() and (path / SPARSIFY_CFG).is_file()


def hookpoint_site(hookpoint: str, transcode: bool) -> Site:
    """Our site for a sparsify hookpoint (a Hugging Face module name), or a clear refusal."""
    m = _HOOKPOINT.match(hookpoint)
    if m is None:
        raise DictionaryError(
            f"sparsify hookpoint {hookpoint!r} has no matching site: supported are a block's output "
            "(e.g. layers.3, h.3, gpt_neox.layers.3 -> resid_post) and an MLP (layers.3.mlp -> mlp_out for an SAE, "
            "transcoder for a transcoder). The hookpoint is the folder's name; rename a folder that was renamed"
        )
    layer, mlp = int(m.group(1)), bool(m.group(2))
    if mlp:
        return Site(layer, "transcoder" if transcode else "mlp_out")
    if transcode:
        raise DictionaryError(
            f"sparsify hookpoint {hookpoint!r} is a transcoder of a whole block (block input -> block output); "
            "no site here reads a block's input and writes its output. Transcoders of the MLP (layers.L.mlp) are supported"
        )
    return Site(layer, "resid_post")


def _config(folder: Path) -> dict:
    try:
        raw = json.loads((folder / SPARSIFY_CFG).read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as err:
        raise DictionaryError(f"{folder / SPARSIFY_CFG} is not valid JSON ({err}); the file is corrupt") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("d_in"), int):
        raise DictionaryError(f"{folder / SPARSIFY_CFG} lacks an integer d_in; it is not a sparsify config")
    activation = raw.get("activation", "topk")
    if activation != "topk":
        raise DictionaryError(f"{folder}: sparsify activation {activation!r} is not supported (only topk; "
                              "groupmax keeps one latent per group, which no architecture here does)")
    return raw


@torch.no_grad()
def load_sparsify(folder: str | Path, device: str = "cpu", model_name: str = "") -> dict[Site, SparseDictionary]:
    """Read one sparsify hookpoint folder as ``{site: topk dictionary}`` with the same outputs."""
    folder = Path(folder)
    if not is_sparsify_coder(folder):
        raise DictionaryError(f"{folder} is not a sparsify hookpoint folder: it needs {SPARSIFY_CFG} and {SPARSIFY_WEIGHTS}")
    raw = _config(folder)
    transcode = bool(raw.get("transcode", False))
    seeded = re.fullmatch(r"seed\d+", folder.name) is not None  # runs with several init_seeds: <hookpoint>/seedN/
    site = hookpoint_site(folder.parent.name if seeded else folder.name, transcode)
    w = read_tensors(folder / SPARSIFY_WEIGHTS)
    missing = [k for k in ("encoder.weight", "encoder.bias", "W_dec", "b_dec") if k not in w]
    if missing:
        raise DictionaryError(f"{folder / SPARSIFY_WEIGHTS} lacks {', '.join(missing)}; the coder was saved without "
                              "its decoder or the file is incomplete")
    d_in = raw["d_in"]
    n = int(raw.get("num_latents") or 0) or d_in * int(raw.get("expansion_factor", 32))
    k = int(raw.get("k", 32))
    skip = bool(raw.get("skip_connection", False))
    shapes = {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    if skip:
        shapes["W_skip"] = (d_in, d_in)
    bad = [f"{key} {tuple(w[key].shape) if key in w else 'missing'} (expected {shape})"
           for key, shape in shapes.items() if key not in w or tuple(w[key].shape) != shape]
    bad += [f"{key} unexpected" for key in sorted(set(w) - set(shapes))]
    if bad:
        raise DictionaryError(f"{folder}: {'; '.join(bad)} do not match {SPARSIFY_CFG} (d_in={d_in}, {n} latents, "
                              f"skip_connection={skip}); the files come from different coders")
    if not 0 < k <= n:
        raise DictionaryError(f"{folder / SPARSIFY_CFG}: k={k} must lie between 1 and the {n} latents")
    w = {key: w[key].float() for key in shapes}
    nonfinite = [key for key, t in w.items() if not bool(torch.isfinite(t).all())]
    if nonfinite:
        raise DictionaryError(f"{folder / SPARSIFY_WEIGHTS} holds NaN or inf in {', '.join(nonfinite)}; the coder is corrupt")
    cfg = DictionaryConfig(arch="topk", d_in=d_in, d_dict=n, k=k, skip=skip, site=site.id, model_name=model_name)
    d = build_dictionary(cfg)
    d.W_enc.copy_(w["encoder.weight"].T)
    centre = torch.zeros(n) if transcode else w["encoder.weight"] @ w["b_dec"]  # SAEs encode x - b_dec
    d.b_enc.copy_(w["encoder.bias"] - centre)
    d.W_dec.copy_(w["W_dec"])
    d.b_dec.copy_(w["b_dec"])
    if skip:
        d.W_skip.copy_(w["W_skip"].T)
    d.eval()
    return {site: d.to(device)}
