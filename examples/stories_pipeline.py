"""The whole pipeline on real pretrained weights: stories260K (llama2.c, MIT, committed as test data).

    .venv/bin/python examples/stories_pipeline.py [--tokens 400k] [--out runs/stories_example]

A llama-style model (RMSNorm, rotary positions, gated SiLU MLPs, a 512-piece tokenizer) loaded
from its llama2.c checkpoint; attention-z and transcoder dictionaries trained at every layer on text
sampled from the model itself (it comes without a corpus); then the circuit of ``story_names``
(recall a character's name: " Lily" against " Tim") selected on some stories and measured on
others, and its HTML view. Small budgets keep it to a few minutes; the numbers grow with --tokens.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

import circuitgraph as cg
from dictionaries.site import expand_sites
from dictionaries.token_sources import ModelSampledTokens
from dictionaries.training import TrainConfig, train_dictionaries

log = logging.getLogger("stories_pipeline")

MODEL = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "stories260K" / "stories260K.bin"


def main(out: str | Path = "runs/stories_example", tokens: int = 400_000, n: int = 32, n_eval: int = 32,
         max_nodes: int = 100) -> dict:
    """Train, trace, view; returns the circuit's held-out numbers and the dictionaries' folder."""
    out = Path(out)
    model = cg.load_model(str(MODEL))
    sites = expand_sites("attn_z,transcoder", "all", model.cfg.n_layers)
    cfg = TrainConfig.of(arch="topk", k=8, expansion=2, tokens=tokens, batch_tokens=1024)
    text = ModelSampledTokens(model, seq_len=64, seed=1)
    dicts = train_dictionaries(model, sites, text, cfg, out / "dicts").dictionaries
    data = cg.PromptDataset.from_task("story_names", model, n=n + n_eval, seed=0)
    select, held_out = data.split(n_eval=n_eval, seed=1)
    graph = cg.trace(model, dicts, select, eval_data=held_out, max_nodes=max_nodes, progress=False)
    m = graph.metadata
    log.info("story_names circuit, %d nodes (%d features + %d errors), on %d held-out stories: faithfulness %.3f, "
             "features only %.3f (ceiling %.3f)", m["n_nodes"], m["n_feature_nodes"], m["n_error_nodes"],
             len(held_out), m["faithfulness"], m["faithfulness_features_only"], m["ceiling"])
    for r in graph.upstream("metric:logit_diff", top_k=5):
        log.info("  %-22s edge %+.3f", r.node, r.weight)
    graph.save(out / "graph")
    cg.view(graph, out / "circuit.html")
    return {**{k: m[k] for k in ("faithfulness", "faithfulness_features_only", "ceiling", "n_nodes", "held_out")},
            "dicts": str(out / "dicts")}


if __name__ == "__main__":
    from circuitgraph.cli.config_flags import int_with_suffix

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/stories_example")
    parser.add_argument("--tokens", type=int_with_suffix, default=400_000)
    args = parser.parse_args()
    torch.set_num_threads(2)
    main(args.out, args.tokens)
