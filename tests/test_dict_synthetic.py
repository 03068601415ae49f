"""Ground truth: sparse features in superposition are recovered by the dictionaries."""

from __future__ import annotations

import pytest
import torch

from dictionaries.architectures.registry import build_dictionary
from dictionaries.config import DictionaryConfig
from dictionaries.metrics import mmcs
from dictionaries.training import DictionaryStepper, initialise_from_data

D_IN, N_TRUE, D_DICT = 32, 64, 128


def synthetic(gen: torch.Generator):
    features = torch.nn.functional.normalize(torch.randn(N_TRUE, D_IN, generator=gen), dim=1)

    def sample(n: int) -> torch.Tensor:
        active = torch.rand(n, N_TRUE, generator=gen) < 3 / N_TRUE
        return (active * (torch.rand(n, N_TRUE, generator=gen) + 0.5)) @ features

    return features, sample


def fit(arch: str, steps: int, **kw):
    gen = torch.Generator().manual_seed(0)
    features, sample = synthetic(gen)
    d = build_dictionary(DictionaryConfig(arch=arch, d_in=D_IN, d_dict=D_DICT, dead_after_tokens=20_000, **kw), seed=0)
    x0 = sample(4096)
    initialise_from_data(d, x0, x0)
    stepper = DictionaryStepper(d, lr=3e-3)
    for step in range(steps):
        x = sample(1024)
        stepper.step(x, x, lr=3e-3 * min(1.0, (steps - step) / (0.2 * steps)), sparsity_scale=min(1.0, step / 100), step=step)
    d.eval()
    return d, features, sample


def test_topk_recovers_true_features() -> None:
    d, features, _ = fit("topk", 1000, k=4)
    assert mmcs(features, d.W_dec.detach()) >= 0.95


@pytest.mark.parametrize("arch,kw", [("batchtopk", {"k": 4}), ("relu", {"l1_coeff": 1.0}), ("gated", {"l1_coeff": 1.0}),
                                     ("jumprelu", {"l0_coeff": 0.2})])
def test_every_architecture_learns_a_sparse_faithful_code(arch: str, kw: dict) -> None:
    d, features, sample = fit(arch, 600, **kw)
    x = sample(4096)
    out = d(x)
    fvu = (out.output - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    l0 = (out.latents > 0).float().sum(-1).mean()
    assert fvu < 0.25
    assert l0 < 24  # far sparser than the 128 latents
    assert mmcs(features, d.W_dec.detach()) > 0.8


def test_fista_codes_are_sparse_and_close_to_the_optimum() -> None:
    from dictionaries.fista import fista_encode

    d, features, sample = fit("topk", 300, k=4)
    x = sample(512)
    res = fista_encode(d, x, l1=0.05, iters=300)
    assert (res.latents >= 0).all()
    fvu = ((res.output - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert fvu < 0.05
    # objective at the FISTA solution is no worse than at the encoder's codes
    def objective(z):
        r = x * d.norm_out - (z @ d.W_dec + d.b_dec)
        return (0.5 * r.pow(2).sum(-1) + 0.05 * z.sum(-1)).mean().item()

    with torch.no_grad():
        assert objective(res.latents) <= objective(d.encode(x)) + 1e-6
