"""Suite-wide settings: offline hubs, seeded RNGs, few threads, shared fixtures."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # any hub access fails fast instead of hanging
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

STORIES_DIR = Path(__file__).resolve().parent / "fixtures" / "stories260K"
"""stories260K (llama2.c tinyllamas, MIT; see its LICENSE), committed as test data so no test skips."""


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def default_model():
    from circuitgraph.models import load_default

    return load_default()


@pytest.fixture(scope="session")
def v1_dicts():
    """The first committed set (16 TopK dictionaries: resid_post, mlp_out, attn_z, transcoder at every
    layer): every site kind the engine supports, which is what most tests need."""
    from circuitgraph.models.loading import V1_DICTS_DIR
    from dictionaries.persistence import load_dictionaries

    return load_dictionaries(V1_DICTS_DIR)


@pytest.fixture(scope="session")
def default_dicts():
    """The current default set (``make demo``, ``trace`` without ``--dicts``)."""
    from circuitgraph.models.loading import DEFAULT_DICTS_DIR
    from dictionaries.persistence import load_dictionaries

    return load_dictionaries(DEFAULT_DICTS_DIR)


@pytest.fixture(scope="session")
def model64(default_model):
    """The embedded model in float64 (exactness checks without float32 rounding)."""
    import copy

    return copy.deepcopy(default_model).to(torch.float64)


@pytest.fixture(scope="session")
def dicts64(v1_dicts):
    import copy

    return {s: copy.deepcopy(d).double() for s, d in v1_dicts.items()}
