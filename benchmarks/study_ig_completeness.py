"""How far node scores are from the exact effect they estimate, site by site.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/study_ig_completeness.py --threads 2 [--task ioi --n 8]

For each spliced site, the exact effect of patching every one of its nodes (features and error)
to the corrupted values, other sites clean and downstream latents re-encoded (one ablation run),
against the sum of that site's integrated-gradient scores (32 steps) and attribution-patching
scores. Two dictionary sets with the same weights: the committed TopK dictionaries, and ReLU
copies (continuous: no latent jumps in or out of the top k). IG is exact up to its quadrature on
a continuous path; with TopK dictionaries downstream the path jumps, and no gradient sees it.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from circuitgraph.attribution.ablation import Ablator  # noqa: E402
from circuitgraph.attribution.dataset import DatasetAttributionConfig, score_nodes  # noqa: E402
from circuitgraph.attribution.nodeset import AblatedNodes  # noqa: E402
from circuitgraph.models.loading import V1_DICTS_DIR, load_default  # noqa: E402
from circuitgraph.replacement import ReplacementModel  # noqa: E402
from circuitgraph.tasks.registry import make_dataset  # noqa: E402
from dictionaries.architectures.registry import rebuild_as  # noqa: E402
from dictionaries.persistence import load_dictionaries  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--task", default="ioi")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--ig-steps", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_default()
    dicts = {s: d for s, d in load_dictionaries(V1_DICTS_DIR).items() if s.kind in ("attn_z", "transcoder")}
    ds = make_dataset(args.task, model, n=args.n, seed=1)
    print(f"# {args.task}, {args.n} prompts, patch baseline, IG {args.ig_steps} steps; effect = m(clean) - m(site patched)")
    print(f"{'dictionaries':12s} {'site':15s} {'exact':>8s} {'IG sum':>8s} {'AP sum':>8s} {'IG rel err':>10s} {'AP rel err':>10s}")
    for name, ds_dicts in (("topk", dicts), ("relu copies", {s: rebuild_as(d, "relu") for s, d in dicts.items()})):
        rm = ReplacementModel(model, ds_dicts)
        ig = score_nodes(rm, ds, DatasetAttributionConfig("ig", ig_steps=args.ig_steps, progress=False))
        ap_ = score_nodes(rm, ig.runs, DatasetAttributionConfig("attribution", progress=False))
        ab = Ablator(rm, ig.runs, "patch")
        full = ab.full()
        widths = {s: rm.dicts[s].cfg.d_dict for s in rm.sites}
        for s in rm.sites:
            exact = full - ab.metric(AblatedNodes.whole_sites(widths, [s]))
            tot_ig = float(ig.features[s].sum() + ig.errors[s].sum())
            tot_ap = float(ap_.features[s].sum() + ap_.errors[s].sum())
            print(f"{name:12s} {s.id:15s} {exact:8.3f} {tot_ig:8.3f} {tot_ap:8.3f} {abs(tot_ig - exact) / abs(exact):10.3f} "
                  f"{abs(tot_ap - exact) / abs(exact):10.3f}", flush=True)


if __name__ == "__main__":
    main()
