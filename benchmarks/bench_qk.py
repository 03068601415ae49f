"""What QK attribution costs next to a prompt graph of the same prompt.

For the embedded model (committed attention-z + transcoder dictionaries) and stories260K (random
attention-z + transcoder dictionaries: timing depends on sizes, not on training), on one prompt:

* ``graph_s``: ``attribute_prompt`` with its default settings (the prompt graph);
* ``record_s``: the one recorded forward pass QK attribution needs (``QKContext``);
* ``all_keys_s``: every head's score from the last position to every key, split into terms
  (what ``trace --qk`` would attach for the strongest attention edges is a subset of this);
* per-pair cost and the largest |sum of terms - score| / max(1, |score|) seen;
* ``dataset_s``: ``aggregate_qk`` over 32 induction prompts for one head, with and without the
  contrast against the other keys (embedded model only);
* ``trace_qk``: what ``trace --qk`` adds: the prompt graph and its pruning, with and without
  ``attach_qk`` (head loadings of every pruned edge into an attention feature, QK pairs of the 10
  strongest cross-position ones), alternated in this process, fastest of ``--repeats`` each;
  ``ratio`` = with / without (target: <= 2).

    .venv/bin/python benchmarks/bench_qk.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from circuitgraph.attribution.linear import LinearAttributionConfig, attribute_prompt  # noqa: E402
from circuitgraph.attribution.qk import QKContext  # noqa: E402
from circuitgraph.attribution.qk_dataset import aggregate_qk  # noqa: E402
from circuitgraph.models import load_default  # noqa: E402
from circuitgraph.models.loading import DEFAULT_DICTS_DIR, resolve_model  # noqa: E402
from circuitgraph.replacement import ReplacementModel  # noqa: E402
from circuitgraph.tasks.registry import make_dataset  # noqa: E402
from dictionaries.architectures.registry import build_dictionary  # noqa: E402
from dictionaries.config import DictionaryConfig  # noqa: E402
from dictionaries.persistence import load_dictionaries  # noqa: E402
from dictionaries.site import Site  # noqa: E402

STORIES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "stories260K" / "stories260K.bin"


def measure(rm: ReplacementModel, tokens: torch.Tensor) -> dict:
    start = time.perf_counter()
    graph = attribute_prompt(rm, tokens, LinearAttributionConfig(progress=False))
    graph_s = time.perf_counter() - start
    start = time.perf_counter()
    ctx = QKContext(rm, tokens)
    record_s = time.perf_counter() - start
    start = time.perf_counter()
    worst, pairs, terms = 0.0, 0, 0
    for layer in range(rm.model.cfg.n_layers):
        for head in range(rm.model.cfg.n_heads):
            for a in ctx.attribute_keys(layer, head, -1):
                worst = max(worst, abs(a.total() - a.score) / max(1.0, abs(a.score)))
                pairs += 1
                terms += a.values.numel()
    all_keys_s = time.perf_counter() - start
    return {"positions": tokens.shape[1], "graph_nodes": graph.n_nodes, "graph_edges": graph.n_edges,
            "graph_s": round(graph_s, 3), "record_s": round(record_s, 3), "all_keys_s": round(all_keys_s, 3),
            "pairs": pairs, "mean_terms_per_pair": terms // pairs, "ms_per_pair": round(1000 * all_keys_s / pairs, 2),
            "max_relative_gap": worst}


def measure_attach(rm: ReplacementModel, tokens: torch.Tensor, repeats: int) -> dict:
    """The prompt graph + pruning with and without attach_qk, alternated; fastest of each."""
    from circuitgraph.attribution.prompt.qk_attach import QKAttachConfig, attach_qk
    from circuitgraph.graph.pruning import prune_graph

    cfg = LinearAttributionConfig(progress=False)
    times: dict[str, list[float]] = {"without": [], "with": []}
    info: dict = {}
    for _ in range(repeats):
        for mode in ("without", "with"):
            start = time.perf_counter()
            full = attribute_prompt(rm, tokens, cfg)
            pruned = prune_graph(full)
            if mode == "with":
                info = attach_qk(pruned, rm, tokens, QKAttachConfig(), also=full)
            times[mode].append(time.perf_counter() - start)
    without, with_qk = min(times["without"]), min(times["with"])
    return {"without_s": round(without, 3), "with_s": round(with_qk, 3), "ratio": round(with_qk / without, 3),
            "pruned_edges": pruned.n_edges, "edges_with_loadings": len(info["loadings"]), "pairs": len(info["pairs"]),
            "loadings_sum_max_rel_diff": info["loadings_sum_max_rel_diff"], "repeats": repeats}


def random_dicts(model) -> dict:
    out = {}
    for i, site in enumerate(Site(layer, kind) for layer in range(model.cfg.n_layers) for kind in ("attn_z", "transcoder")):
        d_in, _ = site.widths(model.cfg)
        out[site] = build_dictionary(DictionaryConfig("topk", d_in, 8 * d_in, k=16, site=site.id), seed=i)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="trace_qk: builds with and without, alternated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_default()
    rm = ReplacementModel(model, load_dictionaries(DEFAULT_DICTS_DIR))
    ioi = model.to_tokens("When Mary and John went to the park, John gave a book to")
    results = {"embedded": measure(rm, ioi)}
    stories = resolve_model(str(STORIES))
    stories_rm = ReplacementModel(stories, random_dicts(stories))
    story = stories.to_tokens("Lily and Tim went to the park. Lily said hello to her friend.")
    results["stories260K"] = measure(stories_rm, story)
    results["embedded"]["trace_qk"] = measure_attach(rm, ioi, args.repeats)
    results["stories260K"]["trace_qk"] = measure_attach(stories_rm, story, args.repeats)
    ds = make_dataset("induction", model, n=32, seed=0)
    for contrast in (False, True):
        start = time.perf_counter()
        aggregate_qk(rm, ds, [(2, 3)], key=-10, contrast=contrast)
        results["embedded"][f"dataset_32_prompts_{'contrast' if contrast else 'plain'}_s"] = round(
            time.perf_counter() - start, 3)
    print(json.dumps({"threads": args.threads, **results}, indent=1))


if __name__ == "__main__":
    main()
