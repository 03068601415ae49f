"""Throughput of our TopK dictionary training against SAELens's TopK on identical activations.

Both train on the same activations of the embedded model (one site), with the same d_in, width,
k, batch size, optimizer (Adam) and number of steps, at each of several learning rates, in this
one process and with the same thread count, and the same decoder-bias initialisation
(``--b-dec-init``: ``mean``, both start ``b_dec`` at the mean of the first batch; ``zero``, both at
zero, SAELens's own default; ``both`` runs each). Inputs are normalised once for both (mean squared
norm = d_in) and our input/output scales are fixed at 1, so neither side rescales. Weight matrices
start from each library's own initialisation. Prints tokens/s of each, their ratio, and each FVU on
held-out activations (the headline compares each tool's best FVU over the learning rates).

SAELens lives only in the benchmark environment, never as a runtime dependency:

    make bench-env          # .venv-bench with sae-lens next to this package
    .venv-bench/bin/python benchmarks/bench_topk_vs_saelens.py

Target (issue 3): ratio >= 2 at equal or better FVU.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


def collect(site_id: str, n_tokens: int, seed: int):
    from circuitgraph.models import load_default
    from circuitgraph.toylang.corpus import CorpusConfig, ToyCorpus
    from dictionaries.activations import ActivationStore
    from dictionaries.site import Site

    model = load_default()
    site = Site.parse(site_id)
    corpus = ToyCorpus(CorpusConfig(seed=seed))
    store = ActivationStore(model, [site.input_hook], corpus)
    n_seq = n_tokens // (corpus.seq_len - 1) + 1
    acts = torch.cat([store.activations(corpus.sequences(i, 64))[site.input_hook] for i in range(0, n_seq, 64)])
    return acts[:n_tokens]


def fvu(recon: torch.Tensor, x: torch.Tensor) -> float:
    return ((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


def schedule(step: int, steps: int, decay_frac: float) -> float:
    """Learning-rate multiplier: constant, then linear decay to 0 over the last ``decay_frac``."""
    start = int(steps * (1 - decay_frac))
    return 1.0 if step < start or decay_frac == 0 else (steps - step) / (steps - start)


def b_dec_start(train: torch.Tensor, batch: int, init: str) -> torch.Tensor:
    """The decoder bias both sides start from: the first batch's mean, or zero."""
    return train[:batch].mean(0) if init == "mean" else torch.zeros(train.shape[1])


def run_ours(train: torch.Tensor, test: torch.Tensor, width: int, k: int, batch: int, lr: float,
             decay_frac: float, grad_clip: float, init: str) -> tuple[float, float]:
    from dictionaries.architectures.registry import build_dictionary
    from dictionaries.config import DictionaryConfig
    from dictionaries.training import DictionaryStepper

    d = build_dictionary(DictionaryConfig(arch="topk", d_in=train.shape[1], d_dict=width, k=k), seed=0)
    with torch.no_grad():  # inputs are normalised already: no rescaling; b_dec as on the SAELens side
        d.norm_in.fill_(1.0)
        d.norm_out.fill_(1.0)
        d.b_dec.copy_(b_dec_start(train, batch, init))
    stepper = DictionaryStepper(d, lr=lr, grad_clip=grad_clip)
    steps = train.shape[0] // batch
    t0 = time.perf_counter()
    for s in range(steps):
        x = train[s * batch : (s + 1) * batch]
        stepper.step(x, x, lr=lr * schedule(s, steps, decay_frac), step=s)
    seconds = time.perf_counter() - t0
    d.eval()
    with torch.no_grad():
        return steps * batch / seconds, fvu(d(test).output, test)


def run_saelens(train: torch.Tensor, test: torch.Tensor, width: int, k: int, batch: int, lr: float,
                decay_frac: float, sparse: bool, init: str) -> tuple[float, float]:
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    cfg = TopKTrainingSAEConfig(d_in=train.shape[1], d_sae=width, k=k, use_sparse_activations=sparse)
    sae = TopKTrainingSAE(cfg)
    with torch.no_grad():
        sae.b_dec.copy_(b_dec_start(train, batch, init))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    dead = torch.zeros(width, dtype=torch.long)
    steps = train.shape[0] // batch
    t0 = time.perf_counter()
    for s in range(steps):
        x = train[s * batch : (s + 1) * batch]
        sae.train()
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead > 200_000 // batch,
                                                       n_training_steps=s, is_logging_step=False))
        with torch.no_grad():
            fired = out.feature_acts.bool()
            fired = (fired.to_dense() if fired.is_sparse else fired).any(0)
            dead += 1
            dead[fired] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr * schedule(s, steps, decay_frac)
        opt.step()
        opt.zero_grad()
    seconds = time.perf_counter() - t0
    sae.eval()
    with torch.no_grad():
        return steps * batch / seconds, fvu(sae(test), test)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--site", default="L2.resid_post")
    p.add_argument("--tokens", type=int, default=400_000)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--lrs", type=float, nargs="+", default=[4e-3, 8e-3, 1.2e-2, 1.6e-2],
                   help="learning rates tried for both (each tool's best FVU is compared)")
    p.add_argument("--decay-frac", type=float, default=0.2,
                   help="both: constant learning rate, then linear decay to 0 over this last fraction of steps "
                        "(our trainer's default; SAELens's trainer offers the same with lr_decay_steps)")
    p.add_argument("--grad-clip", type=float, default=None,
                   help="our gradient clipping norm (default: our trainer's default, TrainConfig.grad_clip; 0: none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--b-dec-init", default="both", choices=["mean", "zero", "both"],
                   help="decoder-bias start, the same on both sides (both: run each variant)")
    args = p.parse_args()
    if args.grad_clip is None:
        from dictionaries.training import TrainConfig

        args.grad_clip = TrainConfig().grad_clip
    torch.set_num_threads(args.threads)
    acts = collect(args.site, args.tokens + 20_000, seed=1)
    train, test = acts[: args.tokens], acts[args.tokens :]
    # normalise once for both (SAELens would otherwise see raw scale): mean squared norm = d_in
    scale = (train.shape[1] ** 0.5) / train.norm(dim=1).mean()
    train, test = train * scale, test * scale
    inits = ["mean", "zero"] if args.b_dec_init == "both" else [args.b_dec_init]
    for init in inits:
        _compare(args, train, test, init)


def _compare(args, train: torch.Tensor, test: torch.Tensor, init: str) -> None:
    print(f"# b_dec init {init} on both sides; width {args.width}, k {args.k}, batch {args.batch}, "
          f"{train.shape[0] // args.batch} steps, Adam, threads {args.threads}, lr decay over the last "
          f"{args.decay_frac:.0%}; gradient clipping: ours {args.grad_clip}, SAELens 1.0", flush=True)
    runs = []
    for lr in args.lrs:
        ours_tps, ours_fvu = run_ours(train, test, args.width, args.k, args.batch, lr, args.decay_frac, args.grad_clip,
                                      init)
        sl_tps, sl_fvu = run_saelens(train, test, args.width, args.k, args.batch, lr, args.decay_frac, False, init)
        runs.append({"b_dec_init": init, "lr": lr, "ours_tokens_per_s": round(ours_tps), "ours_fvu": round(ours_fvu, 4),
                     "saelens_tokens_per_s": round(sl_tps), "saelens_fvu": round(sl_fvu, 4),
                     "ratio": round(ours_tps / sl_tps, 2)})
        print(json.dumps(runs[-1]), flush=True)
    try:  # SAELens's sparse-activation mode; its backward fails on some CPU builds of torch
        sls_tps, sls_fvu = run_saelens(train, test, args.width, args.k, args.batch, args.lrs[0], args.decay_frac,
                                       True, init)
        sparse_result = {"tokens_per_s": round(sls_tps), "fvu": round(sls_fvu, 4)}
    except (NotImplementedError, RuntimeError) as err:
        sparse_result = {"failed": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"}
    best_ours = min(runs, key=lambda r: r["ours_fvu"])
    best_sl = min(runs, key=lambda r: r["saelens_fvu"])
    tps_ours = sum(r["ours_tokens_per_s"] for r in runs) / len(runs)
    tps_sl = sum(r["saelens_tokens_per_s"] for r in runs) / len(runs)
    result = {
        "b_dec_init": init, "site": args.site, "tokens": args.tokens, "width": args.width, "k": args.k,
        "batch": args.batch, "threads": args.threads, "decay_frac": args.decay_frac, "grad_clip": args.grad_clip,
        "throughput_ratio": round(tps_ours / tps_sl, 2),
        "best_fvu": {"ours": best_ours["ours_fvu"], "ours_lr": best_ours["lr"],
                     "saelens": best_sl["saelens_fvu"], "saelens_lr": best_sl["lr"]},
        "saelens_use_sparse_activations": sparse_result,
    }
    print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    main()
