"""Architecture name -> class. Registering a name twice is an error."""

from __future__ import annotations

import torch

from dictionaries.architectures.base import SparseDictionary
from dictionaries.architectures.gated import GatedDictionary
from dictionaries.architectures.jumprelu import JumpReluDictionary
from dictionaries.architectures.relu import ReluDictionary
from dictionaries.architectures.topk import BatchTopKDictionary, TopKDictionary
from dictionaries.config import ARCHITECTURES, DictionaryConfig

REGISTRY: dict[str, type[SparseDictionary]] = {}


def register(name: str, cls: type[SparseDictionary]) -> None:
    """Add an architecture under ``name``."""
    if name in REGISTRY:
        raise ValueError(f"architecture {name!r} is already registered (by {REGISTRY[name].__name__})")
    REGISTRY[name] = cls


for _name, _cls in (("relu", ReluDictionary), ("gated", GatedDictionary), ("topk", TopKDictionary),
                    ("batchtopk", BatchTopKDictionary), ("jumprelu", JumpReluDictionary)):
    register(_name, _cls)
assert set(REGISTRY) == set(ARCHITECTURES)


def build_dictionary(cfg: DictionaryConfig, seed: int = 0) -> SparseDictionary:
    """A freshly initialised dictionary of ``cfg.arch``; same seed, same weights."""
    if cfg.arch not in REGISTRY:
        raise ValueError(f"unknown architecture {cfg.arch!r}; choose one of {', '.join(REGISTRY)}")
    gen = torch.Generator().manual_seed(seed)
    return REGISTRY[cfg.arch](cfg, generator=gen)


def rebuild_as(d: SparseDictionary, arch: str) -> SparseDictionary:
    """The same weights read by another architecture's activation (e.g. a TopK dictionary's weights
    with a ReLU encoder: a continuous dictionary); parameters the other architecture lacks are dropped."""
    import dataclasses

    out = build_dictionary(dataclasses.replace(d.cfg, arch=arch))
    out.load_state_dict(d.state_dict(), strict=False)
    return out
