"""Which model a dictionary was trained on: the model's name, plus a fingerprint of its weights.

A model loaded from a folder or a file is named after it. Renaming the folder must not orphan the
dictionaries trained on it, and another model saved under the same folder name must not adopt
them, so such models are named ``NAME#FINGERPRINT``: the fingerprint hashes a fixed sample of
every parameter of the loaded model (so it names the weights, not the path). Two names match
(:func:`same_model`) when they are equal; when both carry a fingerprint, when the fingerprints
agree (the names may differ: a renamed folder); when only one does (dictionaries saved before
fingerprints), when the names agree.
"""

from __future__ import annotations

import hashlib

import torch

SAMPLE = 4096
"""Values hashed per parameter (evenly spaced; every value of a smaller one)."""


def weights_fingerprint(module: torch.nn.Module) -> str:
    """12 hex digits hashing each parameter's name, shape and a sample of its float32 values."""
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLE)
        sample = flat[::step][:SAMPLE].to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:12]


def with_fingerprint(name: str, module: torch.nn.Module) -> str:
    """``NAME#FINGERPRINT`` for a model named after its folder or file."""
    return f"{name.split('#', 1)[0]}#{weights_fingerprint(module)}"


def same_model(a: str, b: str) -> bool:
    """Whether model names ``a`` and ``b`` name the same model (see the module docstring)."""
    if a == b:
        return True
    name_a, _, fp_a = a.partition("#")
    name_b, _, fp_b = b.partition("#")
    if fp_a and fp_b:
        return fp_a == fp_b
    return name_a == name_b
