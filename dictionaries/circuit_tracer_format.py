"""Read and write circuit-tracer's on-disk format of cross-layer transcoders.

circuit-tracer (``circuit_tracer.transcoder.cross_layer_transcoder``) stores a CLT of an
``n``-layer model as one folder with, for every layer ``i``:

* ``W_enc_{i}.safetensors``: ``W_enc_{i}`` ``[d_transcoder, d_model]``, ``b_enc_{i}`` ``[d_transcoder]``,
  ``b_dec_{i}`` ``[d_model]`` (the bias of MLP output ``i``) and, for JumpReLU, ``threshold_{i}``;
* ``W_dec_{i}.safetensors``: ``W_dec_{i}`` ``[d_transcoder, n - i, d_model]`` (writes into MLP outputs
  ``i .. n-1``);

plus a ``config.yaml`` (``model_kind: cross_layer_transcoder``, ``feature_input_hook:
hook_resid_mid``, ``feature_output_hook: hook_mlp_out``) when loaded through its hub helpers.
Features are ``relu(x @ W_enc.T + b_enc)`` or JumpReLU ``z * (z > threshold)``; the MLP output ``j``
is ``sum_{i <= j} f_i @ W_dec_i[:, j - i] + b_dec_j``.

Mapping to ours (``clt`` sites, :mod:`dictionaries.cross_layer`): our input/output scales fold into
the weights; our per-source decoder biases are summed per output layer (on import, each layer's
bias goes to its own source, which is equivalent). ``relu`` <-> relu, ``jumprelu`` <-> jump_relu,
our ``batchtopk`` is written as jump_relu with its inference threshold on every latent. TopK has
no equivalent there (it is not a per-latent function of the pre-activation) and is refused.
A linear skip is not part of the saved format and is refused too.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dictionaries.architectures.base import SparseDictionary
from dictionaries.architectures.registry import build_dictionary
from dictionaries.atomic import atomic_save_file, atomic_write_text
from dictionaries.config import DictionaryConfig
from dictionaries.cross_layer import check_clt_sites, clt_sites
from dictionaries.errors import DictionaryError
from dictionaries.site import Site

CONFIG_YAML = "config.yaml"


def is_circuit_tracer_clt(folder: str | Path) -> bool:
    """Whether ``folder`` looks like a circuit-tracer CLT (``W_enc_0.safetensors`` present)."""
    return (Path(folder) / "W_enc_0.safetensors").is_file()


@torch.no_grad()
def save_clt_circuit_tracer(dicts: Mapping[Site, SparseDictionary], folder: str | Path) -> Path:
    """Write the ``clt`` dictionaries of ``dicts`` (which must start at layer 0) in circuit-tracer's format."""
    sites = clt_sites(list(dicts))
    if not sites:
        raise DictionaryError("no cross-layer transcoder (clt) dictionaries to export")
    n = sites[0].layer + dicts[sites[0]].cfg.out_layers
    check_clt_sites(sites, n)
    if sites[0].layer != 0:
        raise DictionaryError(f"circuit-tracer's format holds a CLT from layer 0; this one starts at layer {sites[0].layer}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width = dicts[sites[0]].cfg.error_width
    b_dec = torch.zeros(n, width, dtype=torch.float32)
    for s in sites:
        d = dicts[s]
        if d.cfg.arch not in ("relu", "jumprelu", "batchtopk"):
            raise DictionaryError(f"{s.id} is {d.cfg.arch}: circuit-tracer reads relu or jump_relu CLTs; train with "
                                  "--arch batchtopk, jumprelu or relu to export")
        if d.W_skip is not None:
            raise DictionaryError(f"{s.id} has a linear skip, which circuit-tracer's CLT files do not store")
        b_dec[s.layer:] += (d.b_dec / d.norm_out).reshape(-1, width).float()
    jump = any(dicts[s].cfg.arch != "relu" for s in sites)
    for s in sites:
        d = dicts[s]
        enc = {f"W_enc_{s.layer}": (d.W_enc * d.norm_in).T.contiguous().float(),
               f"b_enc_{s.layer}": d.b_enc.float().clone(), f"b_dec_{s.layer}": b_dec[s.layer].clone()}
        if jump:
            enc[f"threshold_{s.layer}"] = _threshold(d).float()
        w_dec = (d.W_dec / d.norm_out).reshape(d.cfg.d_dict, d.cfg.out_layers, width).contiguous().float()
        atomic_save_file(enc, folder / f"W_enc_{s.layer}.safetensors")
        atomic_save_file({f"W_dec_{s.layer}": w_dec}, folder / f"W_dec_{s.layer}.safetensors")
    model_name = dicts[sites[0]].cfg.model_name
    atomic_write_text(folder / CONFIG_YAML, (
        "model_kind: cross_layer_transcoder\n"
        f"model_name: {model_name or 'unknown'}\n"
        "feature_input_hook: hook_resid_mid\n"
        "feature_output_hook: hook_mlp_out\n"))
    return folder


def _threshold(d: SparseDictionary) -> torch.Tensor:
    if d.cfg.arch == "jumprelu":
        return d.threshold.detach().clone()
    if d.cfg.arch == "batchtopk":
        return d.threshold.detach().expand(d.cfg.d_dict).clone()
    return torch.zeros(d.cfg.d_dict)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path``, or a :class:`DictionaryError` naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise DictionaryError(f"cannot read {path}: {err}; the file is missing or corrupt") from err


@torch.no_grad()
def load_clt_circuit_tracer(folder: str | Path, model_name: str = "") -> dict[Site, SparseDictionary]:
    """Read a circuit-tracer CLT folder as our ``clt`` dictionaries (``L0.clt`` ..), outputs equal."""
    folder = Path(folder)
    cfg_file = folder / CONFIG_YAML
    if cfg_file.is_file():
        text = cfg_file.read_text()
        for key, want in (("feature_input_hook", "hook_resid_mid"), ("feature_output_hook", "hook_mlp_out")):
            for line in text.splitlines():
                if line.split(":")[0].strip() == key and line.split(":", 1)[1].strip().strip("\"'") != want:
                    raise DictionaryError(f"{cfg_file}: {key} is {line.split(':', 1)[1].strip()}; only CLTs that read "
                                          f"hook_resid_mid and write hook_mlp_out are supported")
    n = 0
    while (folder / f"W_enc_{n}.safetensors").is_file():
        n += 1
    if n == 0:
        raise DictionaryError(f"{folder} holds no W_enc_0.safetensors: not a circuit-tracer cross-layer transcoder")
    for kind in ("W_enc", "W_dec"):
        extra = sorted(p.name for p in folder.glob(f"{kind}_*.safetensors")
                       if not p.stem.split("_")[-1].isdigit() or int(p.stem.split("_")[-1]) >= n)
        missing = [f"{kind}_{i}.safetensors" for i in range(n) if not (folder / f"{kind}_{i}.safetensors").is_file()]
        if extra or missing:
            raise DictionaryError(f"{folder}: layers must be numbered 0..n-1 with one W_enc_i and one W_dec_i each; "
                                  f"found W_enc_0..W_enc_{n - 1} but " + (f"missing {', '.join(missing)}" if missing
                                                                          else f"also {', '.join(extra)}"))
    out: dict[Site, SparseDictionary] = {}
    first: tuple[int, bool] = (0, False)
    for i in range(n):
        enc = read_tensors(folder / f"W_enc_{i}.safetensors")
        dec = read_tensors(folder / f"W_dec_{i}.safetensors")
        try:
            w_enc, b_enc, b_dec, w_dec = enc[f"W_enc_{i}"], enc[f"b_enc_{i}"], enc[f"b_dec_{i}"], dec[f"W_dec_{i}"]
        except KeyError as err:
            raise DictionaryError(f"{folder}: layer {i} lacks tensor {err}; the folder is incomplete") from err
        d_dict, d_model = w_enc.shape
        if tuple(w_dec.shape) != (d_dict, n - i, d_model):
            raise DictionaryError(f"{folder}: W_dec_{i} has shape {tuple(w_dec.shape)}, expected {(d_dict, n - i, d_model)}")
        for name, t in (("W_enc", w_enc), ("b_enc", b_enc), ("b_dec", b_dec), ("W_dec", w_dec),
                        ("threshold", enc.get(f"threshold_{i}"))):
            if t is not None and not torch.isfinite(t).all():
                raise DictionaryError(f"{folder}: {name}_{i} holds NaN or inf values; the file is corrupt")
        shape = (d_model, f"threshold_{i}" in enc)
        if i == 0:
            first = shape
        elif shape != first:
            raise DictionaryError(f"{folder}: layer {i} (d_model {shape[0]}, threshold {'present' if shape[1] else 'absent'}) "
                                  f"differs from layer 0 (d_model {first[0]}, threshold {'present' if first[1] else 'absent'}); "
                                  "every layer of a CLT has the same width and activation")
        threshold = enc.get(f"threshold_{i}")
        arch = "jumprelu" if threshold is not None else "relu"
        cfg = DictionaryConfig(arch=arch, d_in=d_model, d_dict=d_dict, d_out=(n - i) * d_model, out_layers=n - i,
                               site=f"L{i}.clt", model_name=model_name)
        d = build_dictionary(cfg)
        d.W_enc.copy_(w_enc.T.float())
        d.b_enc.copy_(b_enc.float())
        d.W_dec.copy_(w_dec.reshape(d_dict, -1).float())
        bias = torch.zeros((n - i) * d_model)
        bias[:d_model] = b_dec.float()
        d.b_dec.copy_(bias)
        if threshold is not None:
            d.log_threshold.copy_(threshold.float().reshape(-1).clamp(min=1e-30).log())
        d.eval()
        out[Site(i, "clt")] = d
    return out
