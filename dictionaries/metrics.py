"""Dictionary quality metrics on held-out tokens.

Per dictionary: L0 (mean active latents per token), MSE, FVU (fraction of variance unexplained,
``sum ||y - y_hat||^2 / sum ||y - mean(y)||^2``), dead fraction (latents that never fire on the
evaluation tokens), dense fraction (latents firing on more than 10% of tokens), the firing
density of every latent, and the cross-entropy loss with the dictionary spliced in against the
clean model and against zero-ablating the site: ``ce_recovered = (CE_zero - CE_spliced) /
(CE_zero - CE_clean)``; ``kl`` is the mean per-token KL(clean || spliced).
Also the mean max cosine similarity (MMCS) between the decoders of two dictionaries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer

from dictionaries.activations import ActivationStore
from dictionaries.architectures.base import SparseDictionary
from dictionaries.cross_layer import reconstruct
from dictionaries.site import Site
from dictionaries.splice import splice_hooks
from dictionaries.token_sources import TensorTokens

DENSE_THRESHOLD = 0.1


@dataclass
class DictionaryMetrics:
    """Quality numbers of one dictionary (see the module docstring)."""

    l0: float
    mse: float
    fvu: float
    dead_frac: float
    dense_frac: float
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    ce_recovered: float
    kl: float
    density: torch.Tensor
    """``[d_dict]`` fraction of evaluation tokens on which each latent fires."""

    def summary(self) -> dict[str, float]:
        """The scalar metrics as a JSON-ready dict."""
        return {k: round(float(v), 6) for k, v in self.__dict__.items() if k != "density"}


@torch.no_grad()
def reconstruction_stats(d: SparseDictionary, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> dict[str, torch.Tensor]:
    """L0, MSE, FVU and per-latent density of ``d`` on ``x -> y`` (``[N, d_in]``, ``[N, d_out]``)."""
    fired = torch.zeros(d.cfg.d_dict)
    sq_err, l0_sum = 0.0, 0.0
    for i in range(0, x.shape[0], chunk):
        out = d(x[i : i + chunk])
        sq_err += (out.output - y[i : i + chunk]).pow(2).sum().item()
        active = out.latents > 0
        l0_sum += active.sum().item()
        fired += active.sum(0).float().cpu()
    n = x.shape[0]
    var = (y - y.mean(0)).pow(2).sum().item()
    return {"l0": torch.tensor(l0_sum / n), "mse": torch.tensor(sq_err / (n * y.shape[1])),
            "fvu": torch.tensor(sq_err / max(var, 1e-12)), "density": fired / n}


def clt_reconstruction_stats(dicts: Mapping[Site, SparseDictionary], site: Site, acts: Mapping[str, torch.Tensor]
                             ) -> dict[str, torch.Tensor]:
    """:func:`reconstruction_stats` of a cross-layer transcoder layer: MSE and FVU of its layer's MLP
    output as reconstructed by every ``clt`` source at or before it; L0 and density of its own latents."""
    d = dicts[site]
    x = acts[site.input_hook]
    y = acts[site.output_hook]
    inputs = {s.layer: acts[s.input_hook] for s in dicts if s.is_cross_layer and s.layer <= site.layer}
    recon = reconstruct(dicts, inputs, site.layer)
    latents = d.encode(x)
    active = latents > 0
    n = x.shape[0]
    sq_err = (recon - y).pow(2).sum().item()
    var = (y - y.mean(0)).pow(2).sum().item()
    return {"l0": active.sum(-1).float().mean(), "mse": torch.tensor(sq_err / (n * y.shape[1])),
            "fvu": torch.tensor(sq_err / max(var, 1e-12)), "density": active.sum(0).float().cpu() / n}


@torch.no_grad()
def _ce_and_logprobs(model: HookedTransformer, tokens: torch.Tensor, hooks) -> tuple[float, torch.Tensor]:
    with model.hooks(fwd_hooks=hooks):
        logits = model(tokens.to(model.cfg.device))
    logp = F.log_softmax(logits.float(), -1)
    ce = -logp[:, :-1].gather(-1, tokens[:, 1:, None].to(logp.device)).mean().item()
    return ce, logp


@torch.no_grad()
def firing_density(
    model: HookedTransformer, dicts: Mapping[Site, SparseDictionary], tokens: torch.Tensor, batch: int = 64
) -> dict[Site, torch.Tensor]:
    """``{site: [d_dict]}`` fraction of tokens on which each latent fires, streamed over ``tokens``
    (one model pass per batch serves every dictionary; nothing is held but the counts)."""
    hooks = sorted({s.input_hook for s in dicts})
    store = ActivationStore(model, hooks, TensorTokens(tokens))
    counts = {s: torch.zeros(d.cfg.d_dict) for s, d in dicts.items()}
    n = 0
    for i in range(0, tokens.shape[0], batch):
        acts = store.activations(tokens[i : i + batch])
        for s, d in dicts.items():
            counts[s] += (d.encode(acts[s.input_hook]) > 0).sum(0).float().cpu()
        n += next(iter(acts.values())).shape[0]
    return {s: c / max(n, 1) for s, c in counts.items()}


@torch.no_grad()
def evaluate_dictionaries(
    model: HookedTransformer, dicts: Mapping[Site, SparseDictionary], tokens: torch.Tensor, batch: int = 32,
    density_tokens: torch.Tensor | None = None,
) -> dict[Site, DictionaryMetrics]:
    """Metrics of every dictionary on ``[n_seq, seq_len]`` evaluation tokens (BOS first).

    Dead and dense fractions come from ``density_tokens`` when given (use many more tokens than
    for the CE metrics: a latent firing once in 50k tokens is rare, not dead), else from ``tokens``.
    """
    hooks = sorted({h for s in dicts for h in (s.input_hook, s.output_hook)})
    store = ActivationStore(model, hooks, TensorTokens(tokens))
    densities = firing_density(model, dicts, density_tokens) if density_tokens is not None else {}
    acts: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    for i in range(0, tokens.shape[0], batch):
        for h, a in store.activations(tokens[i : i + batch]).items():
            acts[h].append(a)
    cat = {h: torch.cat(v) for h, v in acts.items()}
    # one clean pass per batch and one zero-ablation per output hook, shared by every dictionary
    sums = {site: {"spliced": 0.0, "kl": 0.0} for site in dicts}
    zero_sites = {s.output_hook: s for s in dicts}  # zero-ablating a site touches only its output hook
    ce_clean, ce_zero = 0.0, {hook: 0.0 for hook in zero_sites}
    n_batches = 0
    for i in range(0, tokens.shape[0], batch):
        tb = tokens[i : i + batch]
        c, lp_clean = _ce_and_logprobs(model, tb, [])
        ce_clean += c
        for hook, zsite in zero_sites.items():
            ce_zero[hook] += _ce_and_logprobs(model, tb, splice_hooks(zsite, None, "zero"))[0]
        for site, d in dicts.items():
            s_ce, lp_spliced = _ce_and_logprobs(model, tb, splice_hooks(site, d, "reconstruct", group=dicts))
            sums[site]["spliced"] += s_ce
            sums[site]["kl"] += (lp_clean.exp() * (lp_clean - lp_spliced)).sum(-1).mean().item()
        n_batches += 1
    results: dict[Site, DictionaryMetrics] = {}
    for site, d in dicts.items():
        if site.is_cross_layer:  # the layer's MLP output as the whole CLT reconstructs it
            stats = clt_reconstruction_stats(dicts, site, cat)
        else:
            stats = reconstruction_stats(d, cat[site.input_hook], cat[site.output_hook])
        ce_c, ce_s = ce_clean / n_batches, sums[site]["spliced"] / n_batches
        ce_z, kl = ce_zero[site.output_hook] / n_batches, sums[site]["kl"] / n_batches
        density = densities.get(site, stats["density"])
        results[site] = DictionaryMetrics(
            l0=float(stats["l0"]), mse=float(stats["mse"]), fvu=float(stats["fvu"]),
            dead_frac=float((density == 0).float().mean()), dense_frac=float((density > DENSE_THRESHOLD).float().mean()),
            ce_clean=ce_c, ce_spliced=ce_s, ce_zero=ce_z,
            ce_recovered=(ce_z - ce_s) / (ce_z - ce_c) if ce_z != ce_c else float("nan"), kl=kl, density=density,
        )
    return results


def mmcs(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of ``a`` of the max cosine similarity to any row of ``b`` (``[n, d]``, ``[m, d]``)."""
    an = F.normalize(a.float(), dim=1)
    bn = F.normalize(b.float(), dim=1)
    return (an @ bn.T).max(1).values.mean().item()


def density_histogram(density: torch.Tensor, bins: int = 20, lo: float = -6.0) -> tuple[list[float], list[int]]:
    """Histogram of log10 firing densities (dead latents counted in the lowest bin)."""
    logd = density.clamp(min=10**lo).log10()
    counts = torch.histc(logd, bins=bins, min=lo, max=0.0)
    edges = torch.linspace(lo, 0.0, bins + 1)
    return edges.tolist(), [int(c) for c in counts]
