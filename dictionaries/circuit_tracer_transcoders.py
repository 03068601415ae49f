"""Read and write circuit-tracer's per-layer transcoder sets (``TranscoderSet``).

circuit-tracer (``circuit_tracer.transcoder.single_layer_transcoder``) keeps a set for an
``n``-layer model as one folder (the layout of its local cache) with ``layer_{i}.safetensors``
for ``i = 0 .. n-1``, each holding

* ``W_enc`` ``[d_transcoder, d_model]``, ``b_enc`` ``[d_transcoder]``;
* ``W_dec`` ``[d_transcoder, d_model]``, ``b_dec`` ``[d_model]``;
* ``activation_function.threshold`` ``[d_transcoder]`` for JumpReLU (absent: ReLU);
* ``W_skip`` ``[d_model, d_model]`` for a linear skip, applied as ``x @ W_skip.T``;

and a ``config.yaml`` with ``model_kind: transcoder_set``, ``feature_input_hook`` and
``feature_output_hook`` (hook names inside a TransformerLens block; ``transcoders:`` may list the
layer files instead). Features are ``act(x @ W_enc.T + b_enc)``; the MLP output is
``f @ W_dec + b_dec (+ x @ W_skip.T)``.

Mapping to ours (``transcoder`` sites, which read ``blocks.L.ln2.hook_normalized`` and write
``blocks.L.hook_mlp_out``): ``relu`` <-> ReLU, ``jumprelu`` <-> JumpReLU, our ``batchtopk`` is
written as JumpReLU with its inference threshold on every latent; ``topk`` and ``gated`` have no
equivalent there and are refused. Our input/output scales fold into the weights. circuit-tracer
reads ``W_skip`` of every layer when layer 0 has one, so a layer without a skip is written with a
zero one (the same outputs).

Input hooks: ``ln2.hook_normalized`` is ours; ``mlp.hook_in`` (the hook circuit-tracer's
replacement model puts on the MLP's input) is the same activation, as a TransformerLens block
feeds the ``ln2`` output straight to its MLP. ``hook_resid_mid`` is refused: it is the residual
stream *before* the layer norm, which is not linear, so no weights reading the normalised input
compute the same features. Output hooks: ``hook_mlp_out`` is ours; ``mlp.hook_out`` (the raw MLP
output) is the same except in models that normalise the MLP output (Gemma 2 and 3), where a
warning is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from dictionaries.architectures.base import SparseDictionary
from dictionaries.architectures.registry import build_dictionary
from dictionaries.atomic import atomic_save_file, atomic_write_text
from dictionaries.circuit_tracer_format import CONFIG_YAML, read_tensors
from dictionaries.config import DictionaryConfig
from dictionaries.errors import DictionaryError
from dictionaries.site import Site

log = logging.getLogger(__name__)
INPUT_HOOKS = ("ln2.hook_normalized", "mlp.hook_in")
OUTPUT_HOOKS = ("hook_mlp_out", "mlp.hook_out")
THRESHOLD = "activation_function.threshold"


def is_circuit_tracer_transcoder_set(folder: str | Path) -> bool:
    """Whether ``folder`` looks like a circuit-tracer transcoder set (``layer_0.safetensors``, or a
    ``config.yaml`` saying ``model_kind: transcoder_set``)."""
    folder = Path(folder)
    if (folder / "layer_0.safetensors").is_file():
        return True
    cfg = folder / CONFIG_YAML
    return cfg.is_file() and "transcoder_set" in cfg.read_text(errors="replace")


@torch.no_grad()
def save_transcoders_circuit_tracer(dicts: Mapping[Site, SparseDictionary], folder: str | Path) -> Path:
    """Write the ``transcoder`` dictionaries of ``dicts`` (layers 0..n-1, each present) as a
    circuit-tracer transcoder set: ``layer_{i}.safetensors`` and ``config.yaml``."""
    sites = sorted((s for s in dicts if s.kind == "transcoder"), key=lambda s: s.layer)
    if not sites:
        raise DictionaryError("no per-layer transcoder (transcoder) dictionaries to export")
    layers = [s.layer for s in sites]
    if layers != list(range(len(sites))):
        raise DictionaryError(f"circuit-tracer's transcoder set needs one transcoder for every layer from 0; "
                              f"these are at layers {layers}. Train --sites transcoder --layers all")
    for s in sites:
        d = dicts[s]
        if d.cfg.arch not in ("relu", "jumprelu", "batchtopk"):
            raise DictionaryError(f"{s.id} is {d.cfg.arch}: circuit-tracer's transcoders are relu or jump_relu; "
                                  "train with --arch batchtopk, jumprelu or relu to export")
        if d.cfg.out_width != d.cfg.d_in:
            raise DictionaryError(f"{s.id} maps width {d.cfg.d_in} to {d.cfg.out_width}; circuit-tracer's "
                                  "transcoders read and write d_model")
    skip = any(dicts[s].W_skip is not None for s in sites)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for s in sites:
        d = dicts[s]
        n_in, n_out = d.norm_in.float(), d.norm_out.float()
        w = {"W_enc": (d.W_enc.float() * n_in).T.contiguous(), "b_enc": d.b_enc.float().clone(),
             "W_dec": (d.W_dec.float() / n_out).contiguous(), "b_dec": (d.b_dec.float() / n_out).contiguous()}
        if d.cfg.arch == "jumprelu":
            w[THRESHOLD] = d.threshold.detach().float().clone()
        elif d.cfg.arch == "batchtopk":
            w[THRESHOLD] = d.threshold.detach().float().expand(d.cfg.d_dict).clone()
        if skip:
            w_skip = torch.zeros(d.cfg.d_in, d.cfg.d_in) if d.W_skip is None else d.W_skip.float() * n_in / n_out
            w["W_skip"] = w_skip.T.contiguous()
        atomic_save_file({k: v.cpu() for k, v in w.items()}, folder / f"layer_{s.layer}.safetensors")
    model_name = dicts[sites[0]].cfg.model_name
    atomic_write_text(folder / CONFIG_YAML, (
        "model_kind: transcoder_set\n"
        f"model_name: {model_name or 'unknown'}\n"
        f"feature_input_hook: {INPUT_HOOKS[0]}\n"
        f"feature_output_hook: {OUTPUT_HOOKS[0]}\n"
        f"scan: {folder.name}\n"))
    return folder


def _config(folder: Path) -> dict:
    import yaml  # a dependency of transformers, hence of transformer-lens

    path = folder / CONFIG_YAML
    if not path.is_file():
        raise DictionaryError(f"{folder} holds layer_*.safetensors but no {CONFIG_YAML}; circuit-tracer keeps the "
                              "hooks the transcoders read and write there (feature_input_hook, feature_output_hook). "
                              "Add it, e.g. 'model_kind: transcoder_set', 'feature_input_hook: ln2.hook_normalized', "
                              "'feature_output_hook: hook_mlp_out'")
    try:
        cfg = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise DictionaryError(f"{path} is not valid YAML ({err})") from err
    if not isinstance(cfg, dict) or cfg.get("model_kind", "transcoder_set") != "transcoder_set":
        raise DictionaryError(f"{path}: model_kind is {cfg.get('model_kind') if isinstance(cfg, dict) else cfg!r}, "
                              "not transcoder_set")
    hin, hout = cfg.get("feature_input_hook"), cfg.get("feature_output_hook")
    if hin == "hook_resid_mid":
        raise DictionaryError(
            f"{path}: these transcoders read hook_resid_mid, the residual stream before the MLP's layer norm. "
            "Per-layer transcoders here read the normalised MLP input (ln2.hook_normalized); the norm is not linear, "
            "so no conversion of the weights computes the same features. Use transcoders that read "
            "ln2.hook_normalized or mlp.hook_in")
    if hin not in INPUT_HOOKS or hout not in OUTPUT_HOOKS:
        raise DictionaryError(f"{path}: feature_input_hook {hin!r} / feature_output_hook {hout!r} are not supported; "
                              f"input one of {', '.join(INPUT_HOOKS)}, output one of {', '.join(OUTPUT_HOOKS)}")
    if hout == "mlp.hook_out":
        log.warning("%s: mlp.hook_out (the raw MLP output) is read as hook_mlp_out; they differ in models that "
                    "normalise the MLP output (Gemma 2 and 3)", path)
    return cfg


def _layer_files(folder: Path, cfg: dict) -> list[Path]:
    listed = cfg.get("transcoders")
    if listed is not None:
        if not isinstance(listed, list) or not listed:
            raise DictionaryError(f"{folder / CONFIG_YAML}: transcoders must be a list of layer files")
        remote = [p for p in listed if str(p).startswith("hf://")]
        if remote:
            raise DictionaryError(f"{folder / CONFIG_YAML} lists hub files ({remote[0]}, ...); download the set first "
                                  "(circuit_tracer.utils.caching.save_transcoders_to_cache) and pass the cached folder")
        files = [Path(p) if Path(p).is_absolute() else folder / p for p in listed]
        odd = [str(p) for p in files if p.suffix != ".safetensors" or not p.is_file()]
        if odd:
            raise DictionaryError(f"{folder / CONFIG_YAML} lists {', '.join(odd[:3])}: missing, or not .safetensors "
                                  "(only circuit-tracer's safetensors layer files are read)")
        return files
    n = 0
    while (folder / f"layer_{n}.safetensors").is_file():
        n += 1
    extra = sorted(p.name for p in folder.glob("layer_*.safetensors")
                   if not p.stem[6:].isdigit() or int(p.stem[6:]) >= n)
    if n == 0 or extra:
        raise DictionaryError(f"{folder}: layers must be numbered 0..n-1 with one layer_i.safetensors each; found "
                              + (f"layer_0..layer_{n - 1} and also {', '.join(extra)}" if n else "no layer_0.safetensors"))
    return [folder / f"layer_{i}.safetensors" for i in range(n)]


@torch.no_grad()
def load_transcoders_circuit_tracer(folder: str | Path, device: str = "cpu",
                                    model_name: str = "") -> dict[Site, SparseDictionary]:
    """Read a circuit-tracer transcoder set folder as our ``transcoder`` dictionaries (``L0.transcoder``
    ..), with the same features and outputs."""
    folder = Path(folder)
    cfg = _config(folder)
    model_name = model_name or str(cfg.get("model_name") or "")
    out: dict[Site, SparseDictionary] = {}
    for i, path in enumerate(_layer_files(folder, cfg)):
        w = {k: v.float() for k, v in read_tensors(path).items()}
        known = {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip", THRESHOLD}
        missing = sorted({"W_enc", "b_enc", "W_dec", "b_dec"} - set(w))
        if missing or set(w) - known:
            raise DictionaryError(f"{path}: " + (f"lacks {', '.join(missing)}" if missing else
                                                 f"holds unknown tensors {sorted(set(w) - known)}")
                                  + "; not a circuit-tracer transcoder layer (or one of a kind it cannot load)")
        d_dict, d_model = w["W_enc"].shape
        shapes = {"b_enc": (d_dict,), "W_dec": (d_dict, d_model), "b_dec": (d_model,), "W_skip": (d_model, d_model)}
        bad = [f"{k} {tuple(w[k].shape)} (expected {s})" for k, s in shapes.items() if k in w and tuple(w[k].shape) != s]
        threshold = w.get(THRESHOLD)
        if threshold is not None:
            try:
                threshold = threshold.expand(d_dict).clone()
            except RuntimeError:
                bad.append(f"{THRESHOLD} {tuple(threshold.shape)} (expected ({d_dict},))")
        if bad:
            raise DictionaryError(f"{path}: {'; '.join(bad)} with W_enc {(d_dict, d_model)}; the file is inconsistent")
        nonfinite = [k for k, t in w.items() if not bool(torch.isfinite(t).all())]
        if nonfinite:
            raise DictionaryError(f"{path} holds NaN or inf in {', '.join(nonfinite)}; the file is corrupt")
        if threshold is not None and bool((threshold < 0).any()):
            raise DictionaryError(f"{path}: negative JumpReLU thresholds let negative features through, which a "
                                  "JumpReLU here (threshold = exp(log_threshold)) cannot express")
        dcfg = DictionaryConfig(arch="relu" if threshold is None else "jumprelu", d_in=d_model, d_dict=d_dict,
                                skip="W_skip" in w, site=f"L{i}.transcoder", model_name=model_name)
        d = build_dictionary(dcfg)
        d.W_enc.copy_(w["W_enc"].T)
        d.b_enc.copy_(w["b_enc"])
        d.W_dec.copy_(w["W_dec"])
        d.b_dec.copy_(w["b_dec"])
        if "W_skip" in w:
            d.W_skip.copy_(w["W_skip"].T)
        if threshold is not None:
            d.log_threshold.copy_(threshold.clamp(min=1e-30).log())
        d.eval()
        out[Site(i, "transcoder")] = d.to(device)
    return out
