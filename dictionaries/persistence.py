"""Save and load dictionaries: one folder per site with ``cfg.json`` + ``weights.safetensors``.

``save_dictionaries(dicts, root)`` writes ``root/<site id>/``; ``load_dictionaries(root)`` returns
``{Site: dictionary}``. Never pickle. SAELens's on-disk format lives in :mod:`dictionaries.saelens_format`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dictionaries.architectures.base import SparseDictionary
from dictionaries.architectures.registry import build_dictionary
from dictionaries.atomic import atomic_save_file, atomic_write_text
from dictionaries.config import DictionaryConfig
from dictionaries.errors import DictionaryError
from dictionaries.site import Site

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "weights.safetensors"


def save_dictionary(d: SparseDictionary, folder: str | Path) -> Path:
    """Write one dictionary to ``folder`` (created); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in d.state_dict().items()}
    atomic_save_file(state, folder / WEIGHTS_FILE)
    atomic_write_text(folder / CFG_FILE, d.cfg.to_json())
    return folder


def load_dictionary(folder: str | Path, device: str = "cpu") -> SparseDictionary:
    """Load a dictionary written by :func:`save_dictionary`.

    Raises:
        DictionaryError: missing, corrupt or inconsistent files.
    """
    folder = Path(folder)
    cfg_path, w_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise DictionaryError(f"{folder} is not a dictionary folder: it needs {CFG_FILE} and {WEIGHTS_FILE}")
    try:
        cfg = DictionaryConfig.from_dict(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise DictionaryError(f"{cfg_path} is not a valid dictionary config ({err})") from err
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError) as err:
        raise DictionaryError(f"{w_path} is corrupt or truncated ({err}); retrain or re-download it") from err
    d = build_dictionary(cfg)
    expected = d.state_dict()
    bad = [k for k, v in expected.items() if k not in state or tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        got = {k: tuple(state[k].shape) for k in bad if k in state}
        raise DictionaryError(
            f"{w_path} does not match {cfg_path} (d_in={cfg.d_in}, d_dict={cfg.d_dict}): "
            f"missing or mis-shaped {bad[:4]} {got}; the files come from different dictionaries"
        )
    bad_values = [k for k in expected if state[k].is_floating_point() and not bool(torch.isfinite(state[k]).all())]
    if bad_values:
        raise DictionaryError(f"{w_path} holds NaN or infinite values in {bad_values}; the dictionary is corrupt, "
                              "retrain it or load another checkpoint")
    d.load_state_dict({k: state[k] for k in expected})
    d.eval()
    return d.to(device)


def save_dictionaries(dicts: Mapping[Site, SparseDictionary], root: str | Path) -> Path:
    """Write each dictionary to ``root/<site id>/``; returns ``root``."""
    root = Path(root)
    for site, d in dicts.items():
        save_dictionary(d, root / site.id)
    return root


def load_dictionaries(root: str | Path, device: str = "cpu") -> dict[Site, SparseDictionary]:
    """``{Site: dictionary}`` for every ``root/<site id>/`` folder. ``root`` (or any sub-folder of it)
    may instead hold a format registered in :mod:`dictionaries.formats` (a circuit-tracer cross-layer
    transcoder, ...); the sites of every part are merged and a site given twice is refused. A string
    ``hf:ORG/REPO[/PATH]`` is fetched from (or found in the cache of) the Hugging Face Hub first
    (:mod:`dictionaries.hub`)."""
    from dictionaries.formats import detect_format
    from dictionaries.hub import is_hub_reference, resolve_hub_reference

    if is_hub_reference(root):
        root = resolve_hub_reference(str(root))
    root = Path(root)
    if not root.exists():
        raise DictionaryError(f"dictionary folder {root} does not exist")
    fmt = detect_format(root)
    if fmt is not None:
        return fmt.load(root, device)
    if not root.is_dir():
        raise DictionaryError(f"{root} is a file in no dictionary format this package reads; give a dictionary folder")
    out: dict[Site, SparseDictionary] = {}

    def add(part: Path, dicts: Mapping[Site, SparseDictionary]) -> None:
        clash = sorted(s.id for s in dicts if s in out)
        if clash:
            raise DictionaryError(f"{root} holds {', '.join(clash)} twice ({part.name} and another part); keep one")
        out.update(dicts)

    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        fmt = detect_format(sub)
        if fmt is not None:
            add(sub, fmt.load(sub, device))
            continue
        try:
            site = Site.parse(sub.name)
        except ValueError:
            continue
        d = load_dictionary(sub, device=device)
        if d.cfg.site and d.cfg.site != site.id:
            raise DictionaryError(f"{sub}/{CFG_FILE} says this dictionary was trained for {d.cfg.site}, not {site.id}; "
                                  f"move it to {root / d.cfg.site} or retrain it")
        add(sub, {site: d})
    if not out:
        raise DictionaryError(f"{root} holds no dictionary folders named like L0.resid_post/ and no dictionaries "
                              "in a format this package reads (see docs/dictionaries.md)")
    return out


def check_against_model(dicts: Mapping[Site, SparseDictionary], model_cfg) -> None:
    """Raise :class:`DictionaryError` when a dictionary does not fit the model's sites and widths
    (or a cross-layer transcoder's layers leave a gap: every later MLP output needs its writers)."""
    from dictionaries.cross_layer import check_clt_sites
    from dictionaries.model_identity import same_model

    try:
        check_clt_sites(list(dicts), model_cfg.n_layers)
    except ValueError as err:
        raise DictionaryError(str(err)) from err
    model_name = getattr(model_cfg, "model_name", "")
    for site, d in dicts.items():
        try:
            site.check_model(model_cfg)
        except ValueError as err:
            raise DictionaryError(str(err)) from err
        d_in, d_out = site.widths(model_cfg)
        if (d.cfg.d_in, d.cfg.out_width) != (d_in, d_out):
            raise DictionaryError(
                f"dictionary {site.id} has widths ({d.cfg.d_in} -> {d.cfg.out_width}) but the model's site has "
                f"({d_in} -> {d_out}); it was trained on another model"
            )
        if d.cfg.model_name and model_name and not same_model(d.cfg.model_name, model_name):  # widths fit, model differs
            raise DictionaryError(f"dictionary {site.id} was trained on model {d.cfg.model_name!r}, not {model_name!r}; "
                                  "load dictionaries trained on this model")


def dictionary_state_equal(a: SparseDictionary, b: SparseDictionary) -> bool:
    """Whether two dictionaries have identical weights and buffers."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
