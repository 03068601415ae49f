"""Check our circuit-tracer transcoder-set writer against circuit-tracer's own loader.

    make bench-ct-env && .venv-ct/bin/python benchmarks/check_circuit_tracer_transcoders.py

Builds one random-weight transcoder per layer of the embedded model (ReLU with a skip and
non-unit input/output scales, JumpReLU without a skip, BatchTopK with a skip, ReLU), writes them
with ``save_transcoders_circuit_tracer``, loads the folder with circuit-tracer's
``load_transcoders_from_cache`` (eager and lazy), and feeds both the model's real MLP inputs
(``blocks.L.ln2.hook_normalized`` on a few sentences). Prints the largest absolute differences of
features and reconstructions per layer; exits non-zero above 1e-5.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from circuit_tracer.utils.caching import load_transcoders_from_cache

from circuitgraph.models import load_default
from dictionaries.architectures.registry import build_dictionary
from dictionaries.circuit_tracer_transcoders import save_transcoders_circuit_tracer
from dictionaries.config import DictionaryConfig
from dictionaries.site import Site

ARCHS = ("relu", "jumprelu", "batchtopk", "relu")


def our_set(d_model: int, n_layers: int, d_dict: int, g: torch.Generator) -> dict:
    out = {}
    for layer in range(n_layers):
        arch = ARCHS[layer % len(ARCHS)]
        skip = arch != "jumprelu"
        t = build_dictionary(DictionaryConfig(arch=arch, d_in=d_model, d_dict=d_dict, k=8, skip=skip,
                                              site=f"L{layer}.transcoder", model_name="circuitgraph-toy"))
        with torch.no_grad():
            t.W_enc.copy_(torch.randn(d_model, d_dict, generator=g) / d_model**0.5)
            t.b_enc.copy_(torch.randn(d_dict, generator=g) * 0.1 - 0.3)
            t.W_dec.copy_(torch.randn(d_dict, d_model, generator=g) / d_dict**0.5)
            t.b_dec.copy_(torch.randn(d_model, generator=g) * 0.1)
            if skip:
                t.W_skip.copy_(torch.randn(d_model, d_model, generator=g) * 0.05)
            t.norm_in.fill_(1.3)
            t.norm_out.fill_(0.7)
            if arch == "jumprelu":
                t.log_threshold.copy_((torch.rand(d_dict, generator=g) * 0.4 + 0.05).log())
            if arch == "batchtopk":
                t.threshold.fill_(0.25)
        out[Site(layer, "transcoder")] = t.eval()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-dict", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_default()
    g = torch.Generator().manual_seed(0)
    ours = our_set(model.cfg.d_model, model.cfg.n_layers, args.d_dict, g)
    tokens = model.to_tokens(["the cat sat on the mat and the dog ran to the park", "once upon a time there was a girl"])
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("ln2.hook_normalized"))
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_transcoders_circuit_tracer(ours, Path(tmp) / "ours")
        for lazy in (False, True):
            tset, _ = load_transcoders_from_cache("ours", cache_dir=tmp, device=torch.device("cpu"), dtype=torch.float32,
                                                  lazy_encoder=lazy, lazy_decoder=lazy)
            assert tset.feature_input_hook == "ln2.hook_normalized" and tset.feature_output_hook == "hook_mlp_out"
            for site, d in ours.items():
                x = cache[f"blocks.{site.layer}.ln2.hook_normalized"].reshape(-1, model.cfg.d_model)
                with torch.no_grad():
                    mine = d(x)
                    feats = tset[site.layer].encode(x)
                    recon = tset[site.layer].decode(feats, x)
                df = (feats - mine.latents).abs().max().item()
                dr = (recon - mine.output).abs().max().item()
                worst = max(worst, df, dr)
                print(f"{'lazy ' if lazy else 'eager'} {site.id:14s} {d.cfg.arch:9s} skip={d.W_skip is not None!s:5s} "
                      f"L0={(mine.latents > 0).float().sum(-1).mean():6.1f}  max|feature diff|={df:.2e}  "
                      f"max|reconstruction diff|={dr:.2e}  (|recon| max {mine.output.abs().max():.2f})")
        print(f"written to {folder.name}/: {sorted(p.name for p in folder.iterdir())}")
    print(f"largest difference {worst:.2e}")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
