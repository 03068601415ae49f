"""Read Gemma-Scope-style ``params.npz`` JumpReLU SAEs and transcoders.

Gemma Scope (Lieberum et al. 2024) publishes each dictionary as one ``params.npz`` with

* ``W_enc`` ``[d_in, d_sae]``, ``b_enc`` ``[d_sae]``, ``threshold`` ``[d_sae]``;
* ``W_dec`` ``[d_sae, d_out]``, ``b_dec`` ``[d_out]``;

and ``latents = relu(pre) * (pre > threshold)`` with ``pre = x @ W_enc + b_enc`` (no input
centring), output ``latents @ W_dec + b_dec``: our ``jumprelu`` exactly. Keys spelt ``w_enc`` /
``w_dec`` are accepted, as SAELens's loader does; a ``scaling_factor`` other than all ones is refused.

The file names no hook, so the site comes from, in order: the ``site`` argument; the folder
holding ``params.npz`` when it is named like a site id (``L20.resid_post/params.npz``); the
Gemma Scope path, e.g. ``gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71/params.npz``
(also inside a Hugging Face cache folder ``models--google--gemma-scope-2b-pt-res``): the repository
name's last part gives the kind (``res`` -> ``resid_post``, ``mlp`` -> ``mlp_out``, ``att`` ->
``attn_z``, ``transcoders`` -> ``transcoder``) and ``layer_N`` the layer, as SAELens's Gemma Scope
loaders read them.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from dictionaries.architectures.base import SparseDictionary
from dictionaries.errors import DictionaryError
from dictionaries.foreign_weights import ForeignWeights, build_from_weights
from dictionaries.site import Site

PARAMS_FILE = "params.npz"
_KINDS = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z", "transcoders": "transcoder"}
"""Last part of a Gemma Scope repository name -> our site kind."""
_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
_LAYER = re.compile(r"^layer_(\d+)$")


def _params_file(path: Path) -> Path:
    return path / PARAMS_FILE if path.is_dir() else path


def is_gemma_scope(path: str | Path) -> bool:
    """Whether ``path`` is a ``params.npz`` file or a folder holding one."""
    path = Path(path)
    return path.name == PARAMS_FILE and path.is_file() or (path / PARAMS_FILE).is_file()


def gemma_scope_site(params: str | Path) -> Site:
    """The site of a ``params.npz`` from its path (see the module docstring), or a refusal saying how to give it."""
    params = Path(params)
    try:
        return Site.parse(params.parent.name)
    except ValueError:
        pass
    layer = next((int(m.group(1)) for part in params.parts if (m := _LAYER.match(part))), None)
    repo = next((part for part in reversed(params.parts) if part.rsplit("-", 1)[-1] in (*_KINDS, "embeddings")
                 and "-" in part), None)
    if repo is not None and repo.endswith("-embeddings"):
        raise DictionaryError(f"{params} is a Gemma Scope embedding SAE (hook_embed), which is not a site here")
    if layer is None or repo is None:
        raise DictionaryError(
            f"cannot tell which site {params} belongs to: its path has no Gemma Scope repository folder "
            f"(a name ending in -{', -'.join(_KINDS)}) with a layer_N folder below it. Put it in a folder named after "
            "its site (e.g. L20.resid_post/params.npz) or pass the site: load_gemma_scope(path, site=Site(20, 'resid_post'))"
        )
    return Site(layer, _KINDS[repo.rsplit("-", 1)[-1]])  # type: ignore[arg-type]


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as data:
            raw = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DictionaryError(f"cannot read {path}: {err}; the file is missing or corrupt") from err
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        name = "W_" + key[2:] if key.startswith("w_") else key
        if value.dtype.kind != "f":
            raise DictionaryError(f"{path}: {key} has dtype {value.dtype}, not floating point; the file is not a Gemma Scope SAE")
        out[name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    return out


@torch.no_grad()
def load_gemma_scope(path: str | Path, site: Site | None = None, device: str = "cpu") -> dict[Site, SparseDictionary]:
    """``{site: jumprelu dictionary}`` for a Gemma-Scope-style ``params.npz`` (or a folder holding one).

    ``site`` defaults to the one the path names (see :func:`gemma_scope_site`)."""
    params = _params_file(Path(path))
    if not params.is_file():
        raise DictionaryError(f"{params} does not exist; give a params.npz file or the folder holding it")
    w = _read_npz(params)
    scale = w.pop("scaling_factor", None)
    if scale is not None and not torch.allclose(scale, torch.ones_like(scale)):
        raise DictionaryError(f"{params}: scaling_factor is not all ones; fold it into W_dec and b_dec first")
    missing, extra = [k for k in _KEYS if k not in w], sorted(set(w) - set(_KEYS))
    if missing or extra:
        raise DictionaryError(f"{params}: a Gemma Scope params.npz holds exactly {', '.join(_KEYS)}; "
                              + (f"missing {', '.join(missing)}" if missing else f"unexpected {', '.join(extra)}"))
    site = site or gemma_scope_site(params)
    d = build_from_weights(ForeignWeights(arch="jumprelu", **w), site, "", str(params))
    return {site: d.to(device)}
