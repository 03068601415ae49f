"""Read and write SAELens's on-disk format (``cfg.json`` + ``sae_weights.safetensors``).

So people can bring SAELens SAEs and transcoders here and take ours to SAELens. Architectures:

============================ ==================== =======================================================
SAELens ``architecture``     ours                 notes
============================ ==================== =======================================================
``standard``                 ``relu``
``topk``                     ``topk``             ``k`` from the config; ``rescale_acts_by_decoder_norm``
                                                  folded into the weights (same latents)
``jumprelu``                 ``jumprelu``         ``threshold`` stored directly
``gated``                    ``gated``            SAELens's ``b_gate`` is our ``b_enc``
``transcoder``               ``relu``             ``d_out`` wide decoder
``skip_transcoder``          ``relu`` + skip      SAELens's ``W_skip`` is ``[d_out, d_in]``; ours is its transpose
``jumprelu_transcoder``      ``jumprelu``
``jumprelu_skip_transcoder`` ``jumprelu`` + skip
============================ ==================== =======================================================

* SAELens subtracts ``b_dec`` from an SAE's input when ``apply_b_dec_to_input``; we fold that into
  the encoder bias (exactly equivalent). Our input/output scale factors are folded into the weights
  when writing; our ``batchtopk`` is written as ``jumprelu`` with its inference threshold.
* The site comes from the hook names (``metadata.hook_name`` and, for transcoders,
  ``metadata.hook_name_out``; see :meth:`Site.from_hook`), or else from a folder named like a site
  id (``L2.resid_post``). SAELens flattens ``hook_z`` (``reshape_activations: hook_z``) as
  ``... n_heads d_head -> ... (n_heads d_head)``, the order our ``attn_z`` site uses.
* Refused, with the reason: ``normalize_activations`` other than ``none``, a TopK SAE without ``k``,
  an SAE of one attention head (``hook_head_index``), hooks that are no site, other architectures.
* Configs written before SAELens 6 (flat keys, ``hook_point``, ``activation_fn: topk``) are read
  with SAELens's own defaults for them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dictionaries.architectures.base import SparseDictionary
from dictionaries.errors import DictionaryError
from dictionaries.foreign_weights import ForeignWeights, build_from_weights
from dictionaries.site import Site

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.54.12"
"""The SAELens version whose format :func:`save_saelens` writes (``benchmarks/check_writers_saelens.py``
reads our files back with it); written as ``metadata.sae_lens_version`` so SAELens reads the
config as a 6.x one."""
_AUTOENCODERS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
_TRANSCODERS = {"transcoder": ("relu", False), "skip_transcoder": ("relu", True),
                "jumprelu_transcoder": ("jumprelu", False), "jumprelu_skip_transcoder": ("jumprelu", True)}
_IGNORED_WEIGHTS = ("scaling_factor",)
"""Tensors some SAELens files carry that change nothing here (refused below unless all ones)."""


class SaeLensConfig(NamedTuple):
    """The fields of a SAELens ``cfg.json`` this reader uses, defaults applied."""

    architecture: str
    """SAELens architecture name (see the module table)."""
    d_in: int
    """Input width."""
    d_sae: int
    """Number of latents."""
    d_out: int
    """Output width (``d_in`` for an SAE)."""
    k: int
    """Active latents per token (``topk``; 0 otherwise)."""
    apply_b_dec_to_input: bool
    """Whether the input is centred by ``b_dec`` before encoding (SAEs only)."""
    rescale_acts_by_decoder_norm: bool
    """TopK chooses latents by pre-activation times decoder norm (``topk`` only)."""
    hook_name: str
    """TransformerLens hook read ("" if not given)."""
    hook_name_out: str
    """Hook written by a transcoder ("" for an SAE or if not given)."""
    model_name: str
    """Model the SAE was trained on ("" if not given)."""


def is_saelens_folder(path: str | Path) -> bool:
    """Whether ``path`` is one SAELens SAE folder (``cfg.json`` + ``sae_weights.safetensors``)."""
    path = Path(path)
    return (path / SAELENS_WEIGHTS).is_file() and (path / SAELENS_CFG).is_file()


def read_saelens_config(raw: dict, where: str | Path) -> SaeLensConfig:
    """Parse a SAELens ``cfg.json`` dictionary (any 5.x or 6.x layout); ``where`` names it in errors."""
    meta = raw.get("metadata") or {}

    def field(*names: str, default=None):
        for name in names:
            for source in (meta, raw):
                if source.get(name) is not None:
                    return source[name]
        return default

    arch = raw.get("architecture") or "standard"
    k = raw.get("k")
    fn_k = (raw.get("activation_fn_kwargs") or {}).get("k")
    if arch == "standard" and field("activation_fn", "activation_fn_str") == "topk" and fn_k is not None:
        arch, k = "topk", fn_k  # SAELens < 6 spelt a TopK SAE this way
    if arch not in _AUTOENCODERS and arch not in _TRANSCODERS:
        raise DictionaryError(f"{where}: SAELens architecture {arch!r} is not supported; supported: "
                              f"{', '.join([*_AUTOENCODERS, *_TRANSCODERS])}")
    norm = raw.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise DictionaryError(
            f"{where}: the SAE normalises activations with {norm!r}, which needs a scale this file "
            "does not store; fold the scaling factor into the weights first (SAELens: fold_activation_norm_scaling_factor)"
        )
    if arch == "topk" and k is None:
        raise DictionaryError(f"{where} describes a TopK SAE without k; add \"k\": <active latents> to it "
                              "(SAELens writes it for every TopK SAE)")
    head = field("hook_head_index", "hook_point_head_index")
    hook = str(field("hook_name", "hook_point", default=""))
    if head is not None:
        raise DictionaryError(f"{where}: the SAE reads one attention head (hook_head_index={head}) of {hook}; "
                              "sites here read all heads of blocks.L.attn.hook_z, flattened")
    if raw.get("reshape_activations") == "hook_z" and hook and not hook.endswith("hook_z"):
        raise DictionaryError(f"{where}: reshape_activations is hook_z but the hook is {hook}; fix the config")
    apply_b_dec = bool(raw.get("apply_b_dec_to_input", True))
    if arch in _TRANSCODERS and apply_b_dec:
        raise DictionaryError(f"{where}: a SAELens transcoder with apply_b_dec_to_input true (SAELens itself refuses "
                              "it: b_dec is an output bias); set it to false")
    try:
        d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
        d_out = int(raw.get("d_out") or d_in) if arch in _TRANSCODERS else d_in
    except (KeyError, TypeError, ValueError) as err:
        raise DictionaryError(f"{where}: d_in and d_sae must be integers ({err})") from err
    return SaeLensConfig(arch, d_in, d_sae, d_out, int(k or 0), apply_b_dec, bool(raw.get("rescale_acts_by_decoder_norm")),
                         hook, str(field("hook_name_out", default="")), str(field("model_name", default="")))


def saelens_site(cfg: SaeLensConfig, folder: Path) -> Site:
    """The site of a SAELens SAE: from its hook names, else from a folder named like a site id."""
    if cfg.hook_name:
        try:
            return Site.from_hook(cfg.hook_name, cfg.hook_name_out or None)
        except ValueError as err:
            hint = (" (a SAELens transcoder names the hook it writes in metadata.hook_name_out)"
                    if cfg.architecture in _TRANSCODERS and not cfg.hook_name_out else "")
            raise DictionaryError(f"{folder / SAELENS_CFG}: {err}{hint}") from err
    try:
        return Site.parse(folder.name)
    except ValueError:
        raise DictionaryError(f"{folder / SAELENS_CFG} names no hook; add \"hook_name\": \"blocks.L.hook_resid_post\" "
                              "(and \"hook_name_out\" for a transcoder) to its metadata, or name the folder after "
                              "its site, e.g. L2.resid_post") from None


def _read(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not is_saelens_folder(folder):
        raise DictionaryError(f"{folder} is not a SAELens SAE folder: it needs {SAELENS_CFG} and {SAELENS_WEIGHTS}")
    try:
        raw = json.loads((folder / SAELENS_CFG).read_text())
        w = load_file(str(folder / SAELENS_WEIGHTS))
    except (json.JSONDecodeError, SafetensorError, OSError, UnicodeDecodeError) as err:
        raise DictionaryError(f"{folder} holds a corrupt SAELens file ({err}); re-download or re-save it") from err
    if not isinstance(raw, dict):
        raise DictionaryError(f"{folder / SAELENS_CFG} is not a JSON object; it is not a SAELens config")
    for name, t in w.items():
        if not t.is_floating_point():
            raise DictionaryError(f"{folder / SAELENS_WEIGHTS}: tensor {name} is {t.dtype}; SAELens weights are "
                                  "floating point. The file is damaged or not a SAELens SAE")
    return raw, {k: v.float() for k, v in w.items()}


def _weights(cfg: SaeLensConfig, w: dict[str, torch.Tensor], source: str) -> ForeignWeights:
    """SAELens tensors -> our equations (centring and decoder-norm rescaling folded in)."""
    gated = cfg.architecture == "gated"
    names = {"W_enc", "W_dec", "b_dec", "b_gate" if gated else "b_enc"}
    arch, skip = _TRANSCODERS.get(cfg.architecture, (_AUTOENCODERS.get(cfg.architecture), False))
    names |= {"jumprelu": {"threshold"}, "gated": {"r_mag", "b_mag"}}.get(arch, set()) | ({"W_skip"} if skip else set())
    missing = sorted(names - set(w))
    if missing:
        raise DictionaryError(f"{source}: a SAELens {cfg.architecture} needs tensors {missing}, which the file lacks")
    unused = sorted(set(w) - names)
    for name in unused:
        if name not in _IGNORED_WEIGHTS or not torch.allclose(w[name], torch.ones_like(w[name])):
            raise DictionaryError(f"{source}: tensor {name!r} is not part of a SAELens {cfg.architecture}; "
                                  "this reader would ignore it and change the outputs")
    if tuple(w["W_enc"].shape) != (cfg.d_in, cfg.d_sae) or tuple(w["W_dec"].shape) != (cfg.d_sae, cfg.d_out):
        raise DictionaryError(f"{source}: W_enc/W_dec shapes {tuple(w['W_enc'].shape)}/{tuple(w['W_dec'].shape)} "
                              f"do not match d_in={cfg.d_in}, d_sae={cfg.d_sae}, d_out={cfg.d_out}")
    expected = {"b_dec": (cfg.d_out,), "W_skip": (cfg.d_out, cfg.d_in)}
    expected.update({n: (cfg.d_sae,) for n in ("b_enc", "b_gate", "threshold", "r_mag", "b_mag")})
    for name in sorted(names & set(expected)):
        if tuple(w[name].shape) != expected[name]:
            raise DictionaryError(f"{source}: tensor {name} has shape {tuple(w[name].shape)}, but d_in={cfg.d_in}, "
                                  f"d_sae={cfg.d_sae}, d_out={cfg.d_out} make it {expected[name]}; the file is "
                                  "damaged or its config belongs to another SAE")
    W_enc, W_dec = w["W_enc"], w["W_dec"]
    b_enc = w["b_gate" if gated else "b_enc"]
    shift = w["b_dec"] @ W_enc if cfg.apply_b_dec_to_input and cfg.architecture in _AUTOENCODERS else 0.0
    out = ForeignWeights(arch=arch, W_enc=W_enc, W_dec=W_dec, b_enc=b_enc - shift, b_dec=w["b_dec"], k=cfg.k,
                         threshold=w.get("threshold"), W_skip=w["W_skip"].T if skip else None)
    if gated:
        out.r_mag, out.b_mag = w["r_mag"], w["b_mag"] - shift * w["r_mag"].exp()
    if cfg.architecture == "topk" and cfg.rescale_acts_by_decoder_norm:
        norms = W_dec.norm(dim=-1)  # latents chosen on pre * |W_dec_i| and decoded as acts / |W_dec_i|
        out.W_enc, out.b_enc, out.W_dec = W_enc * norms, out.b_enc * norms, W_dec / norms[:, None]
    return out


@torch.no_grad()
def load_saelens_sites(folder: str | Path, device: str = "cpu") -> dict[Site, SparseDictionary]:
    """``{site: dictionary}`` for one SAELens SAE folder (same outputs on the same inputs)."""
    folder = Path(folder)
    raw, w = _read(folder)
    cfg = read_saelens_config(raw, folder / SAELENS_CFG)
    site = saelens_site(cfg, folder)
    d = build_from_weights(_weights(cfg, w, str(folder / SAELENS_WEIGHTS)), site, cfg.model_name,
                           str(folder / SAELENS_WEIGHTS))
    return {site: d.to(device)}


def load_saelens(folder: str | Path, device: str = "cpu") -> SparseDictionary:
    """Load a SAELens SAE folder as one of our dictionaries (its site in ``cfg.site``)."""
    (d,) = load_saelens_sites(folder, device).values()
    return d


def _saelens_arch(d: SparseDictionary, site: Site | None) -> tuple[str, bool]:
    """SAELens architecture for ``d`` and whether it is written as a transcoder (or a refusal)."""
    arch = d.cfg.arch
    if d.cfg.out_layers > 1 or (site is not None and site.is_cross_layer):
        raise DictionaryError("a cross-layer transcoder layer has no SAELens form; export the set with "
                              "`circuitgraph dicts export --to circuit-tracer`")
    transcoder = d.cfg.out_width != d.cfg.d_in or d.W_skip is not None or (site is not None and site.is_transcoder)
    if not transcoder:
        return {"relu": "standard", "batchtopk": "jumprelu"}.get(arch, arch), False
    if site is not None and site.is_per_head:
        raise DictionaryError(f"{site.id} has a skip connection; SAELens transcoders do not reshape hook_z, so it "
                              "has no SAELens form")
    if arch in ("topk", "gated"):
        raise DictionaryError(f"SAELens has no {arch} transcoder (its transcoders are ReLU or JumpReLU, with or "
                              f"without a skip); this {arch} dictionary cannot be written for it")
    base = "transcoder" if arch == "relu" else "jumprelu_transcoder"
    return (base.replace("transcoder", "skip_transcoder") if d.W_skip is not None else base), True


@torch.no_grad()
def save_saelens(d: SparseDictionary, folder: str | Path, site: Site | None = None) -> Path:
    """Write ``d`` in SAELens's format (weights in model units, no input normalisation).

    ``site`` (default: the one in ``d.cfg.site``, if any) gives the hook names SAELens needs to
    splice it (``metadata.hook_name``, ``hook_name_out`` for transcoders). Returns ``folder``.
    """
    if site is None and d.cfg.site:
        site = Site.parse(d.cfg.site)
    arch, transcoder = _saelens_arch(d, site)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_in, n_out = float(d.norm_in), float(d.norm_out)
    w = {"W_enc": d.W_enc * n_in, "W_dec": d.W_dec / n_out, "b_enc": d.b_enc.clone(), "b_dec": d.b_dec / n_out}
    if d.cfg.arch == "gated":
        w["b_gate"] = w.pop("b_enc")
        w["r_mag"] = d.r_mag.clone()
        w["b_mag"] = d.b_mag.clone()
    elif d.cfg.arch == "jumprelu":
        w["threshold"] = d.threshold.detach().clone()
    elif d.cfg.arch == "batchtopk":
        w["threshold"] = torch.full((d.cfg.d_dict,), float(d.threshold))
    if d.W_skip is not None:
        w["W_skip"] = (d.W_skip * (n_in / n_out)).T  # SAELens: [d_out, d_in], applied as x @ W_skip.T
    save_file({k: v.contiguous().float().cpu() for k, v in w.items()}, str(folder / SAELENS_WEIGHTS))
    meta: dict = {"sae_lens_version": SAELENS_FORMAT_VERSION}
    if site is not None:
        meta["hook_name"] = site.input_hook
        if transcoder:
            meta["hook_name_out"] = site.output_hook
    if d.cfg.model_name:
        meta["model_name"] = d.cfg.model_name
    cfg = {
        "d_in": d.cfg.d_in, "d_sae": d.cfg.d_dict, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none",
        "reshape_activations": "hook_z" if site is not None and site.is_per_head else "none",
        "metadata": meta,
    }
    if arch == "topk":
        cfg.update(k=d.cfg.k, rescale_acts_by_decoder_norm=False)
    if transcoder:
        cfg["d_out"] = d.cfg.out_width
    cfg["architecture"] = arch
    (folder / SAELENS_CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def save_saelens_set(dicts: Mapping[Site, SparseDictionary], root: str | Path) -> Path:
    """Write each dictionary as a SAELens folder ``root/<site id>/`` (a folder of SAE folders, the way
    SAELens repositories hold one SAE per hook); ``load_dictionaries(root)`` reads it back. Returns ``root``."""
    for site, d in sorted(dicts.items()):  # every refusal before the first file is written
        try:
            _saelens_arch(d, site)
        except DictionaryError as err:
            raise DictionaryError(f"{site.id}: {err}") from err
    root = Path(root)
    for site, d in sorted(dicts.items()):
        save_saelens(d, root / site.id, site=site)
    return root
