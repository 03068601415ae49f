"""Atomic training checkpoints in one safetensors file (tensors + JSON metadata), never pickle.

A checkpoint is written to a temporary file beside the target and moved into place with
``os.replace``, so a run killed at any moment leaves either the previous checkpoint or the new
one, never a torn file. Optimizer state is flattened into named tensors plus JSON scalars.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from dictionaries.atomic import atomic_save_file

_META_KEY = "circuitgraph_meta"


class Checkpoint(NamedTuple):
    """What :func:`load_checkpoint` returns."""

    tensors: dict[str, torch.Tensor]
    """Every stored tensor by name."""
    meta: dict[str, Any]
    """JSON metadata (step counters, configs, optimizer hyper-parameters)."""


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Atomically write ``tensors`` and ``meta`` to ``path``."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_save_file(flat, path, metadata={_META_KEY: json.dumps(meta)})


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        ValueError: the file is missing its metadata, truncated or not safetensors.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({err}); delete it to restart") from err
    if raw_meta is None:
        raise ValueError(f"{path} is a safetensors file but not a circuitgraph checkpoint (no metadata)")
    return Checkpoint(tensors, json.loads(raw_meta))


def optimizer_to_flat(opt: torch.optim.Optimizer, prefix: str = "optim.") -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state dict into named tensors and a JSON-serialisable remainder."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], extra: dict, prefix: str = "optim."
) -> None:
    """Restore an optimizer saved with :func:`optimizer_to_flat`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith(prefix):
            continue
        idx, key = name[len(prefix):].split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in extra.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    opt.load_state_dict({"state": state, "param_groups": extra["param_groups"]})


def save_training_state(path: str | Path, modules: dict[str, torch.nn.Module], opts: dict[str, torch.optim.Optimizer],
                        run: dict[str, Any], step: int) -> None:
    """Checkpoint a multi-dictionary run: every module's state and optimizer under its name, with
    ``run`` (the settings a resume must match) and ``step`` in the metadata."""
    tensors: dict[str, torch.Tensor] = {}
    optim_meta = {}
    for name, module in modules.items():
        tensors.update({f"{name}/dict.{k}": v for k, v in module.state_dict().items()})
        flat, extra = optimizer_to_flat(opts[name], prefix=f"{name}/optim.")
        tensors.update(flat)
        optim_meta[name] = extra
    save_checkpoint(path, tensors, {"step": step, **run, "optim": optim_meta})


def restore_training_state(path: str | Path, modules: dict[str, torch.nn.Module], opts: dict[str, torch.optim.Optimizer],
                           run: dict[str, Any]) -> int:
    """Load a checkpoint of :func:`save_training_state` into ``modules`` and ``opts``; returns its step.

    Raises:
        ValueError: the file is corrupt, or was written by a run whose ``run`` settings differ.
    """
    ck = load_checkpoint(path)
    if any(ck.meta.get(key, "") != value for key, value in run.items()):
        raise ValueError(f"{path} was written by a run with other settings or sites; delete it or rerun "
                         "with the same flags and data")
    for name, module in modules.items():
        prefix = f"{name}/dict."
        module.load_state_dict({k[len(prefix):]: v for k, v in ck.tensors.items() if k.startswith(prefix)})
        optimizer_from_flat(opts[name], ck.tensors, ck.meta["optim"][name], prefix=f"{name}/optim.")
    return int(ck.meta["step"])
