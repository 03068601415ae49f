"""Ceiling study: which dictionary levers make circuits explained by features, not error terms.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/study_ceiling.py --threads 2 \
        [--levers base,width8,...] [--tokens 1M] [--out runs/ceiling] [--n 64]

For every *lever* (a dictionary recipe: site mix, width, k, end-to-end KL, token mix, transcoder
skip, interaction penalty, cross-layer transcoders) the script trains one dictionary set on the
embedded model (or loads a committed one), then measures, on each of the four tasks:

* the features-only **ceiling**: every feature kept, every error node ablated (held-out prompts);
* the **smallest circuit** (top attribution scores; feature *and* error nodes counted) whose
  features-only faithfulness reaches ``--target`` on the selection prompts, and its held-out
  features-only faithfulness and faithfulness;

and per set: CE loss recovered (min and mean over sites), FVU, L0, dead fraction (the worst site,
over 2,000 held-out sequences) and training seconds. Patch ablation, ``--n`` selection prompts
and ``--n`` disjoint held-out prompts per task.

Each finished lever is appended to ``OUT/results.jsonl`` (a rerun skips it: nothing is lost if
the study is stopped); trained sets stay under ``OUT/<lever>/``. ``--table`` prints the markdown
table and writes ``OUT/ceiling.svg`` from the results so far, without training.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from circuitgraph.attribution.ablation import Ablator, evaluate_circuit  # noqa: E402
from circuitgraph.attribution.circuit import smallest_circuit  # noqa: E402
from circuitgraph.attribution.dataset import DatasetAttributionConfig, score_nodes  # noqa: E402
from circuitgraph.cli.config_flags import int_with_suffix  # noqa: E402
from circuitgraph.models.loading import (  # noqa: E402
    DEFAULT_DICTS_DIR,
    SPARSE_INTERACTION_DICTS_DIR,
    V1_DICTS_DIR,
    load_default,
)
from circuitgraph.replacement import ReplacementModel  # noqa: E402
from circuitgraph.tasks.registry import make_dataset, make_disjoint_dataset  # noqa: E402
from circuitgraph.toylang.corpus import TASK_RICH, CorpusConfig, ToyCorpus  # noqa: E402
from circuitgraph.viewer.study_plot import TASKS, ceiling_svg, study_markdown  # noqa: E402
from dictionaries.atomic import atomic_write_text  # noqa: E402
from dictionaries.metrics import evaluate_dictionaries  # noqa: E402
from dictionaries.persistence import load_dictionaries  # noqa: E402
from dictionaries.site import expand_sites  # noqa: E402
from dictionaries.training import TrainConfig, train_dictionaries  # noqa: E402

BASE = TrainConfig.of(expansion=4, k=16, grad_clip=0.0, checkpoint_every=50)

# name -> (description, site kinds, TrainConfig overrides, corpus, committed folder or None)
LEVERS: dict[str, tuple[str, str, dict, str, Path | None]] = {
    "default": ("the default set chosen by this study: attn_z + transcoder with a linear skip, x16, k 32, 4M tokens",
                "attn_z,transcoder", {}, "default", DEFAULT_DICTS_DIR),
    "default_unpruned": ("the same set before `dicts prune` removed the latents that never fired in training",
                         "attn_z,transcoder", {}, "default", Path("runs/default_unpruned")),
    "v1": ("first committed set (attn_z + transcoder, x4, k 16, 2M tokens)", "attn_z,transcoder", {}, "default",
           V1_DICTS_DIR),
    "v1_resid": ("first committed set, residual stream only (x4, k 16, 2M tokens)", "resid_post", {}, "default",
                 V1_DICTS_DIR),
    "v1_mlp": ("first committed set, attn_z + mlp_out (x4, k 16, 2M tokens)", "attn_z,mlp_out", {}, "default",
               V1_DICTS_DIR),
    "interaction": ("committed sparse-interaction set (attn_z + transcoder, x4, k 16, interaction penalty)",
                    "attn_z,transcoder", {}, "default", SPARSE_INTERACTION_DICTS_DIR),
    "base": ("attn_z + transcoder, x4, k 16", "attn_z,transcoder", {}, "default", None),
    "base_seed1": ("base recipe, another seed (the noise between two trainings)", "attn_z,transcoder", {"seed": 1},
                   "default", None),
    "base_2M": ("base recipe, 2M tokens", "attn_z,transcoder", {"tokens": 2_000_000}, "default", None),
    "width8": ("width x8", "attn_z,transcoder", {"expansion": 8}, "default", None),
    "width16": ("width x16", "attn_z,transcoder", {"expansion": 16}, "default", None),
    "width32": ("width x32", "attn_z,transcoder", {"expansion": 32}, "default", None),
    "k8": ("k 8 (x4)", "attn_z,transcoder", {"k": 8}, "default", None),
    "k32": ("k 32 (x4)", "attn_z,transcoder", {"k": 32}, "default", None),
    "k32_width16": ("k 32, x16", "attn_z,transcoder", {"k": 32, "expansion": 16}, "default", None),
    "k64_width16": ("k 64, x16", "attn_z,transcoder", {"k": 64, "expansion": 16}, "default", None),
    "skip_k32_width16": ("linear skip, k 32, x16", "attn_z,transcoder", {"transcoder_skip": True, "k": 32, "expansion": 16},
                         "default", None),
    "skip_k64_width8": ("linear skip, k 64, x8", "attn_z,transcoder", {"transcoder_skip": True, "k": 64, "expansion": 8},
                        "default", None),
    "mlp_out_width16": ("attn_z + mlp_out SAEs, x16", "attn_z,mlp_out", {"expansion": 16}, "default", None),
    "e2e": ("end-to-end KL term 10 (x4)", "attn_z,transcoder", {"e2e_kl_coeff": 10.0}, "default", None),
    "taskmix": ("task-rich token mix (x4)", "attn_z,transcoder", {}, "task-rich", None),
    "skip": ("transcoders with a linear skip (x4)", "attn_z,transcoder", {"transcoder_skip": True}, "default", None),
    "skip_width16": ("linear skip, x16", "attn_z,transcoder", {"transcoder_skip": True, "expansion": 16}, "default",
                     None),
    "clt": ("cross-layer transcoder + attn_z (x4)", "attn_z,clt", {}, "default", None),
    "clt_width16": ("cross-layer transcoder + attn_z, x16", "attn_z,clt", {"expansion": 16}, "default", None),
}


def corpus(kind: str) -> ToyCorpus:
    return ToyCorpus(TASK_RICH if kind == "task-rich" else CorpusConfig(seed=1))


def dictionary_set(model, name: str, tokens: int, out: Path, threads: int) -> tuple[dict, float | None, dict]:
    desc, kinds, over, mix, committed = LEVERS[name]
    wanted = set(kinds.split(","))
    if committed is not None:
        dicts = {s: d for s, d in load_dictionaries(committed).items() if s.kind in wanted}
        return dicts, None, {"tokens": None}
    cfg = BASE.replace(**{"tokens": tokens, **over})
    folder = out / name
    seconds = None
    if not (folder / "train_config.json").is_file():
        sites = expand_sites(kinds, "all", model.cfg.n_layers)
        seconds = train_dictionaries(model, sites, corpus(mix), cfg, folder).seconds
        (folder / "train_seconds.json").write_text(json.dumps({"seconds": seconds, "threads": threads}) + "\n")
    elif (folder / "train_seconds.json").is_file():
        seconds = json.loads((folder / "train_seconds.json").read_text())["seconds"]
    return load_dictionaries(folder), seconds, {"tokens": cfg.tokens, "expansion": cfg.coder.expansion, "k": cfg.coder.k}


def error_share(rm: ReplacementModel, ds) -> dict[str, float]:
    """Per site: how much of the full metric is lost when only that site's error term is patched to
    its corrupted value (every feature and every other error kept), as a fraction of the
    full-vs-empty gap. Where the ceiling's missing part lives."""
    from circuitgraph.attribution.ablation import faithfulness_ratio
    from circuitgraph.attribution.nodeset import KeptNodes

    ab = Ablator(rm, ds)
    full, empty = ab.full(), ab.empty()
    d = ab.d_dicts
    out = {}
    for s in rm.sites:
        kept = KeptNodes.every(d)
        kept.errors[s][:] = False
        out[s.id] = 1.0 - faithfulness_ratio(ab.metric(kept), full, empty)
    return out


def measure(model, dicts: dict, n: int, target: float) -> dict:
    held_text = ToyCorpus(CorpusConfig(seed=12345))
    metrics = evaluate_dictionaries(model, dicts, held_text.sequences(0, 64), density_tokens=held_text.sequences(64, 2000))
    row: dict = {
        "ce_recovered_min": min(m.ce_recovered for m in metrics.values()),
        "ce_recovered_mean": sum(m.ce_recovered for m in metrics.values()) / len(metrics),
        "fvu_mean": sum(m.fvu for m in metrics.values()) / len(metrics),
        "fvu_max": max(m.fvu for m in metrics.values()),
        "l0_mean": sum(m.l0 for m in metrics.values()) / len(metrics),
        "dead_max": max(m.dead_frac for m in metrics.values()),
        "latents": sum(d.cfg.d_dict for d in dicts.values()),
        "sites": sorted(s.id for s in dicts),
        "tasks": {},
    }
    rm = ReplacementModel(model, dicts)
    for task in TASKS:
        ds = make_dataset(task, model, n=n, seed=0)
        held = make_disjoint_dataset(task, model, n, ds)
        scores = score_nodes(rm, ds, DatasetAttributionConfig(progress=False))
        found = smallest_circuit(Ablator(rm, scores.runs), scores, target, kind="faithfulness_features_only")
        ev = evaluate_circuit(Ablator(rm, held), found.circuit)
        row["tasks"][task] = {"error_share": error_share(rm, held),
            "ceiling": ev.ceiling, "nodes": ev.n_nodes, "feature_nodes": ev.n_feature_nodes, "error_nodes": ev.n_error_nodes,
            "reached_on_selection": found.reached, "features_only": ev.faithfulness_features_only,
            "faithfulness": ev.faithfulness, "selection_features_only": found.value,
        }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levers", default=",".join(LEVERS))
    ap.add_argument("--tokens", type=int_with_suffix, default=1_000_000, help="training tokens per dictionary")
    ap.add_argument("--out", default="runs/ceiling")
    ap.add_argument("--n", type=int, default=64, help="selection prompts and held-out prompts per task")
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--table", action="store_true", help="only print the table and write the plot")
    ap.add_argument("--diagnose", action="store_true",
                    help="add the per-site error shares to finished rows that lack them (no training)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {json.loads(line)["lever"]: json.loads(line) for line in results.read_text().splitlines()} if results.is_file() else {}
    if args.diagnose:
        model = load_default()
        for name, row in done.items():
            if "error_share" in row["tasks"]["ioi"]:
                continue
            dicts, _, _ = dictionary_set(model, name, args.tokens, out, args.threads)
            rm = ReplacementModel(model, dicts)
            for task in TASKS:
                ds = make_dataset(task, model, n=args.n, seed=0)
                row["tasks"][task]["error_share"] = error_share(rm, make_disjoint_dataset(task, model, args.n, ds))
            print(json.dumps({"lever": name, "ioi_error_share": {k: round(v, 3) for k, v in
                                                                 row["tasks"]["ioi"]["error_share"].items()}}), flush=True)
        atomic_write_text(results, "".join(json.dumps(r) + "\n" for r in done.values()))
    if not args.table and not args.diagnose:
        model = load_default()
        for name in args.levers.split(","):
            if name not in LEVERS:
                raise SystemExit(f"unknown lever {name!r}; choose from {', '.join(LEVERS)}")
            if name in done:
                continue
            t0 = time.perf_counter()
            dicts, seconds, recipe = dictionary_set(model, name, args.tokens, out, args.threads)
            row = {"lever": name, "description": LEVERS[name][0], "train_s": seconds, "threads": args.threads,
                   **recipe, **measure(model, dicts, args.n, args.target)}
            row["study_s"] = time.perf_counter() - t0
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done[name] = row
            print(json.dumps({"lever": name, **{t: round(row["tasks"][t]["ceiling"], 3) for t in TASKS}}), flush=True)
    rows = [done[n] for n in LEVERS if n in done]
    print(study_markdown(rows, TASKS))
    (out / "ceiling.svg").write_text(ceiling_svg(rows, TASKS))


if __name__ == "__main__":
    main()
