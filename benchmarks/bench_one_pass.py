"""Training every dictionary of the embedded model from one activation stream vs one run per site.

Both arms train the same 16 dictionaries (4 layers x resid_post, mlp_out, attn_z, transcoder) on
the same tokens with the same settings, in this process with the same thread count; the
separate arm runs ``train_dictionaries`` once per site (a model forward per chunk per site, as a
one-site trainer such as SAELens must). Prints both times and their ratio.

    .venv/bin/python benchmarks/bench_one_pass.py --tokens 200k

Target (issue 3): ratio <= 0.5.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from circuitgraph.cli.config_flags import int_with_suffix  # noqa: E402
from circuitgraph.models import load_default  # noqa: E402
from circuitgraph.toylang.corpus import CorpusConfig, ToyCorpus  # noqa: E402
from dictionaries.site import expand_sites  # noqa: E402
from dictionaries.training import TrainConfig, train_dictionaries  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int_with_suffix, default=200_000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_default()
    sites = expand_sites("resid_post,mlp_out,attn_z,transcoder", "all", model.cfg.n_layers)
    cfg = TrainConfig.of(arch="topk", k=16, expansion=8, tokens=args.tokens, checkpoint_every=10**9)
    corpus = ToyCorpus(CorpusConfig(seed=1))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train_dictionaries(model, sites, corpus, cfg, f"{tmp}/joint")
        joint = time.perf_counter() - t0
        t0 = time.perf_counter()
        for site in sites:
            train_dictionaries(model, [site], corpus, cfg, f"{tmp}/{site.id}")
        separate = time.perf_counter() - t0
    print(json.dumps({"work": "the same sites, token stream, TrainConfig and threads on both sides: one joint run "
                              "(one model pass feeds every dictionary) vs one run per site",
                      "dictionaries": len(sites), "tokens": args.tokens, "threads": args.threads,
                      "one_pass_s": round(joint, 1), "separate_runs_s": round(separate, 1),
                      "ratio": round(joint / separate, 3)}, indent=2))


if __name__ == "__main__":
    main()
