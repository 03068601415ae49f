"""Interaction sparsity: dictionaries trained with and without the interaction penalty, compared.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_interaction_sparsity.py --threads 2 \
        [--baseline DIR] [--sparse DIR] [--tasks ioi,agreement,greater_than,induction]

Both sets hold attention-z and transcoder dictionaries at every layer of the embedded model
(defaults: the committed plain set and the committed sparse-interaction set). Prints

1. training overhead: seconds per step of joint training with the penalty against plain training
   (same sites, same cached activations, same process);
2. per-site FVU and CE loss recovered of both sets (held-out toy-corpus text) and the worst gap;
3. edges per feature: over the direct linear attribution graphs of ``--prompts`` prompts per task
   (every active feature a target), the mean number of incoming edges (strongest first) a feature
   needs to reach 90% of its total |attribution|, by site kind, and the ratio plain / sparse;
4. per task, the smallest top-attribution circuit whose faithfulness (patch ablation, 64 prompts)
   reaches 0.8, in nodes (features + error nodes).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from circuitgraph.attribution.ablation import Ablator, evaluate_circuit  # noqa: E402
from circuitgraph.attribution.circuit import smallest_circuit  # noqa: E402
from circuitgraph.attribution.dataset import DatasetAttributionConfig, score_nodes  # noqa: E402
from circuitgraph.attribution.linear import LinearAttributionConfig, attribute_prompt  # noqa: E402
from circuitgraph.graph.sparsity import edges_to_fraction  # noqa: E402
from circuitgraph.models.loading import SPARSE_INTERACTION_DICTS_DIR, V1_DICTS_DIR, load_default  # noqa: E402
from circuitgraph.replacement import ReplacementModel  # noqa: E402
from circuitgraph.tasks.registry import make_dataset, make_disjoint_dataset  # noqa: E402
from circuitgraph.toylang.corpus import CorpusConfig, ToyCorpus  # noqa: E402
from dictionaries.metrics import evaluate_dictionaries  # noqa: E402
from dictionaries.persistence import load_dictionaries  # noqa: E402
from dictionaries.site import expand_sites  # noqa: E402
from dictionaries.training import TrainConfig, train_dictionaries  # noqa: E402

KINDS = ("attn_z", "transcoder")


def load_set(folder) -> dict:
    return {s: d for s, d in load_dictionaries(folder).items() if s.kind in KINDS}


def overhead(model, penalty: float, pairs: str, steps: int) -> tuple[float, float]:
    """Seconds per step of plain and penalised training of the 8 dictionaries on cached activations."""
    sites = expand_sites(",".join(KINDS), "all", model.cfg.n_layers)
    source = ToyCorpus(CorpusConfig(seed=1))
    with tempfile.TemporaryDirectory() as tmp:
        base = dict(tokens=steps * 4096, activation_cache=f"{tmp}/cache", checkpoint_every=10**9)
        train_dictionaries(model, sites, source, TrainConfig.of(**base), f"{tmp}/warm")  # fills the cache
        plain = train_dictionaries(model, sites, source, TrainConfig.of(**base), f"{tmp}/plain").seconds
        pen = train_dictionaries(model, sites, source, TrainConfig.of(**base, interaction_penalty=penalty, interaction_pairs=pairs), f"{tmp}/pen").seconds
    return plain / steps, pen / steps


def edges_per_feature(rm: ReplacementModel, tasks: list[str], n_prompts: int) -> dict[str, float]:
    """Mean edges to 90% of incoming |attribution|, over every feature target of the prompt graphs."""
    counts: dict[str, list[torch.Tensor]] = {k: [] for k in KINDS}
    cfg = LinearAttributionConfig(max_feature_nodes=100_000, progress=False)
    for task in tasks:
        ds = make_dataset(task, rm.model, n=n_prompts, seed=1)
        for i in range(n_prompts):
            g = attribute_prompt(rm, ds.clean_tokens[i], cfg)
            c = edges_to_fraction(g.targets, g.weights, g.n_nodes, 0.9)
            for j, node in enumerate(g.nodes):
                if node.kind == "feature" and c[j] > 0:
                    counts[node.site.split(".")[1]].append(c[j])
    out = {k: float(torch.stack(v).double().mean()) for k, v in counts.items() if v}
    out["all"] = float(torch.stack([x for v in counts.values() for x in v]).double().mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline", default=str(V1_DICTS_DIR))
    ap.add_argument("--sparse", default=str(SPARSE_INTERACTION_DICTS_DIR))
    ap.add_argument("--tasks", default="ioi,agreement,greater_than,induction")
    ap.add_argument("--prompts", type=int, default=8, help="prompt graphs per task for edges per feature")
    ap.add_argument("--n", type=int, default=64, help="prompts per task for circuit faithfulness")
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--circuits", action=argparse.BooleanOptionalAction, default=True,
                    help="also search the smallest faithful circuit per task (the slow part)")
    ap.add_argument("--overhead-steps", type=int, default=30)
    ap.add_argument("--penalty", type=float, default=1.0, help="interaction penalty for the overhead run")
    ap.add_argument("--pairs", default="all", help="interaction pairs for the overhead run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_default()
    tasks = args.tasks.split(",")
    sets = {"plain": load_set(args.baseline), "sparse": load_set(args.sparse)}

    if args.overhead_steps > 0:
        plain_s, pen_s = overhead(model, args.penalty, args.pairs, args.overhead_steps)
        print(f"training step (8 dictionaries, 4096 tokens): plain {plain_s:.3f} s, with penalty {pen_s:.3f} s, "
              f"overhead x{pen_s / plain_s:.2f}")

    corpus = ToyCorpus(CorpusConfig(seed=12345))
    metrics = {name: evaluate_dictionaries(model, d, corpus.sequences(0, 64)) for name, d in sets.items()}
    print(f"\n{'site':16s} {'FVU plain':>9s} {'FVU sparse':>10s} {'CE plain':>8s} {'CE sparse':>9s}")
    for site in sorted(sets["plain"]):
        a, b = metrics["plain"][site], metrics["sparse"][site]
        print(f"{site.id:16s} {a.fvu:9.3f} {b.fvu:10.3f} {a.ce_recovered:8.3f} {b.ce_recovered:9.3f}")
    sites = sorted(sets["plain"])
    gap_fvu = max(metrics["sparse"][s].fvu - metrics["plain"][s].fvu for s in sites)
    gap_ce = max(metrics["plain"][s].ce_recovered - metrics["sparse"][s].ce_recovered for s in sites)
    mean = {n: (sum(m[s].fvu for s in sites) / len(sites), sum(m[s].ce_recovered for s in sites) / len(sites))
            for n, m in metrics.items()}
    print(f"mean FVU plain {mean['plain'][0]:.3f} sparse {mean['sparse'][0]:.3f}; mean CE recovered plain "
          f"{mean['plain'][1]:.3f} sparse {mean['sparse'][1]:.3f}; worst site: FVU {gap_fvu:+.3f}, CE recovered {-gap_ce:+.3f}")

    rms = {n: ReplacementModel(model, d) for n, d in sets.items()}
    t0 = time.perf_counter()
    epf = {n: edges_per_feature(rm, tasks, args.prompts) for n, rm in rms.items()}
    print(f"\nedges per feature to 90% of its attribution ({args.prompts} prompts x {len(tasks)} tasks, "
          f"{time.perf_counter() - t0:.0f} s)")
    for k in (*KINDS, "all"):
        print(f"  {k:11s} plain {epf['plain'][k]:7.2f}  sparse {epf['sparse'][k]:7.2f}  ratio {epf['plain'][k] / epf['sparse'][k]:.2f}")

    if not args.circuits:
        return
    print(f"\ncircuits ({args.n} selection prompts, {args.n} disjoint held-out prompts; attribution scores, patch "
          f"ablation; nodes = feature + error nodes). Held-out: ceiling (every feature, no error), errors only; "
          f"smallest circuit reaching faithfulness >= {args.target} on the selection prompts, with its held-out "
          "faithfulness and features-only faithfulness; smallest reaching features-only >= the target")
    print(f"{'task':13s} {'dicts':6s} {'ceiling':>7s} {'err-only':>8s} {'nodes':>6s} {'faithful':>8s} {'feat-only':>9s} "
          f"{'nodes(feat-only)':>16s}")
    for task in tasks:
        ds = make_dataset(task, model, n=args.n, seed=0)
        held = make_disjoint_dataset(task, model, args.n, ds)
        for n, rm in rms.items():
            scores = score_nodes(rm, ds, DatasetAttributionConfig(progress=False))
            sel = Ablator(rm, scores.runs)
            found = smallest_circuit(sel, scores, args.target)
            ev = evaluate_circuit(Ablator(rm, held), found.circuit)
            fo = smallest_circuit(sel, scores, args.target, kind="faithfulness_features_only")
            fo_txt = f"{fo.circuit.n_nodes()}" if fo.reached else "unreached"
            print(f"{task:13s} {n:6s} {ev.ceiling:7.3f} {ev.faithfulness_errors_only:8.3f} "
                  f"{found.circuit.n_nodes():5d}{'' if found.reached else '*'} {ev.faithfulness:8.3f} "
                  f"{ev.faithfulness_features_only:9.3f} {fo_txt:>16s}")
    print("(* = the target was not reached within 4096 nodes)")


if __name__ == "__main__":
    main()
