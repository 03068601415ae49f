"""Prompt-graph build time and memory against circuit-tracer at growing model and prompt sizes.

Run in the circuit-tracer environment (``make bench-ct-env``):

    OMP_WAIT_POLICY=PASSIVE .venv-ct/bin/python benchmarks/bench_scaling.py --cells S,S128,M,M128,L,L128 --json

Cells (layers x d_model x d_mlp x transcoder latents, prompt tokens): S = 4 x 256 x 1024 x 4096 at
32, S128 the same at 128, M = 6 x 512 x 2048 x 8192 at 32, M128, L = 12 x 768 x 3072 x 12288 at 32
(GPT-2-small shape), L128. Random weights made here from fixed seeds (TransformerLens init, folded
LayerNorm ``LNPre``, GELU, 64-wide heads; TopK transcoders, k = 32, ln2 output -> MLP output), the
same weights given to both libraries, the same prompt, up to 10 logits.

Every build runs in a fresh subprocess (``--worker``), after a short warm-up build in that process;
the two libraries alternate, each repeated the same number of times (``--repeats``, or once when a
first build took over ``--repeat-under`` seconds); the time is each side's fastest build, peak
RSS its process's peak just after the build (``RssAnon`` sampled apart: without file pages).
Two modes per cell:

* ``equal``: the same work. Both visit every active feature (the same feature set, checked) at the
  same batch size (``--batch``); ours with ``--bos detach`` (circuit-tracer's convention) so every
  edge is comparable;
* ``defaults``: each library's defaults (NOT equal work): ours its default feature budget, batch
  sizing and BOS convention; circuit-tracer every active feature at batch 512.

Edges: both graphs' incoming edges of ~200 sampled feature targets and every logit target are
compared by node id; ``edges_max_rel_diff`` = max |ours - theirs| / max |theirs| over them (tok@0
excluded when our BOS convention is ``keep``, reported apart as ``bos_edges_max_rel_diff``).
circuit-tracer is skipped where its estimated memory (three dense N x N matrices at its peak, plus
the forward pass of its batch of prompt copies) exceeds ``--ct-max-gb``. ``--check-device cuda`` instead builds ours on CPU and on that device
and compares their edges (``benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

CELLS = {  # layers, d_model, d_mlp, latents, prompt tokens
    "S": (4, 256, 1024, 4096, 32), "S128": (4, 256, 1024, 4096, 128),
    "M": (6, 512, 2048, 8192, 32), "M128": (6, 512, 2048, 8192, 128),
    "L": (12, 768, 3072, 12288, 32), "L128": (12, 768, 3072, 12288, 128),
}
K, N_SAMPLE = 32, 200


def build(cell: str):
    """TransformerLens config (its seed fixes the model weights) and transcoder weights of a cell."""
    from transformer_lens import HookedTransformerConfig

    n_layers, d, d_mlp, f, _ = CELLS[cell]
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d, d_mlp=d_mlp, d_head=64, n_heads=d // 64, n_ctx=256,
                                  d_vocab=886, act_fn="gelu", normalization_type="LNPre", seed=0, device="cpu")
    g = torch.Generator().manual_seed(1)
    tc = [(torch.randn(d, f, generator=g) / d**0.5, torch.randn(f, d, generator=g) / (4 * K**0.5),
           torch.zeros(f), torch.randn(d, generator=g) * 0.01) for _ in range(n_layers)]
    return cfg, tc


def prompt(cell: str) -> torch.Tensor:
    tokens = torch.randint(1, 886, (1, CELLS[cell][4]), generator=torch.Generator().manual_seed(2))
    tokens[0, 0] = 0  # BOS of the toy tokenizer
    return tokens


def _tokenizer():
    from circuitgraph.models import load_default

    return load_default().tokenizer  # 886 tokens, BOS 0; circuit-tracer needs a tokenizer


def _sampled(ids: list[str], n_active: int) -> list[str]:
    return [i for i in ids if i.startswith("logit") or zlib.crc32(i.encode()) % max(n_active, 1) < N_SAMPLE]


def run_ours(cell: str, mode: str, args) -> tuple[float, dict, dict]:
    from transformer_lens import HookedTransformer

    from circuitgraph.attribution.linear import LinearAttributionConfig, attribute_prompt
    from circuitgraph.replacement import ReplacementModel
    from dictionaries.architectures.registry import build_dictionary
    from dictionaries.config import DictionaryConfig
    from dictionaries.site import Site

    cfg, tc = build(cell)
    model = HookedTransformer(cfg, tokenizer=_tokenizer())
    dicts = {}
    for layer, (w_enc, w_dec, b_enc, b_dec) in enumerate(tc):
        d = build_dictionary(DictionaryConfig("topk", cfg.d_model, w_enc.shape[1], k=K, site=f"L{layer}.transcoder"))
        with torch.no_grad():
            for name, w in (("W_enc", w_enc), ("W_dec", w_dec), ("b_enc", b_enc), ("b_dec", b_dec)):
                getattr(d, name).copy_(w)
        dicts[Site(layer, "transcoder")] = d
    rm = ReplacementModel(model.to(args.device, print_details=False), {s: d.to(args.device) for s, d in dicts.items()})
    tokens = prompt(cell)
    if mode == "equal":
        acfg = LinearAttributionConfig(max_feature_nodes=10**9, batch_size=args.batch, max_logits=10, progress=False,
                                       bos="detach", device=args.device, memory_mb=args.memory_mb)
    else:
        acfg = LinearAttributionConfig(progress=False, device=args.device, memory_mb=args.memory_mb)
    attribute_prompt(rm, tokens[:, :8], LinearAttributionConfig(**{**acfg.__dict__, "max_feature_nodes": 64}))
    t = time.perf_counter()
    g = attribute_prompt(rm, tokens, acfg)
    seconds = time.perf_counter() - t
    info = {"rss_mb": _rss_mb(), "anon_peak_mb": _anon_mb(), **_gpu_mb(), "features_visited": g.metadata["n_visited_features"],
            "n_active": g.metadata["n_active_features"], "edges": g.n_edges,
            "result_mb": sum(x.numel() * x.element_size() for x in (g.sources, g.targets, g.weights)) / 2**20,
            "logit_sum": _logit_sum(model, tokens),
            "bos": acfg.bos, "batch": g.metadata.get("batch_size", acfg.batch_size),
            "spilled": g.metadata.get("edges_spilled")}
    ids = [n.id for n in g.nodes]
    visited = {ids[i] for i in (~torch.isnan(g.bias)).nonzero().squeeze(1).tolist()}
    want = [i for i in _sampled(ids, info["n_active"]) if i in visited]
    index = {node_id: i for i, node_id in enumerate(ids)}
    rows = torch.tensor([index[i] for i in want], dtype=torch.int32)
    parts = []
    for lo in range(0, g.n_edges, 1 << 24):  # in slices: a graph of 10^9 edges needs no int64 copy
        mask = torch.isin(g.targets[lo : lo + (1 << 24)], rows)
        parts.append((g.sources[lo : lo + (1 << 24)][mask], g.targets[lo : lo + (1 << 24)][mask],
                      g.weights[lo : lo + (1 << 24)][mask]))
    src, tgt, w = (torch.cat(x) for x in zip(*parts, strict=True)) if parts else (torch.zeros(0),) * 3
    src, tgt, w = src.long(), tgt.long(), w.double()
    sample = {ids[int(r)]: ([ids[s] for s in src[tgt == r].tolist()], w[tgt == r]) for r in rows}
    return seconds, info, {"visited": sorted(v for v in visited if not v.startswith("logit")), "sample": sample}


def run_theirs(cell: str, mode: str, args) -> tuple[float, dict, dict]:
    from circuit_tracer import attribute
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from circuit_tracer.transcoder.activation_functions import TopK
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet

    cfg, tc = build(cell)
    device = torch.device(args.device)
    cfg.device = args.device
    layers = {}
    for layer, (w_enc, w_dec, b_enc, b_dec) in enumerate(tc):
        t = SingleLayerTranscoder(cfg.d_model, w_enc.shape[1], TopK(K), layer, device=device, dtype=torch.float32)
        with torch.no_grad():
            for name, w in (("W_enc", w_enc.T), ("W_dec", w_dec), ("b_enc", b_enc), ("b_dec", b_dec)):
                getattr(t, name).copy_(w)
        layers[layer] = t
    tset = TranscoderSet(layers, feature_input_hook="ln2.hook_normalized", feature_output_hook="hook_mlp_out")
    model = TransformerLensReplacementModel.from_config(cfg, tset, tokenizer=_tokenizer())
    tokens = prompt(cell)[0].to(device)
    batch = args.batch if mode == "equal" else 512
    attribute(tokens[:8], model, max_n_logits=10, batch_size=batch, max_feature_nodes=64)
    t = time.perf_counter()
    g = attribute(tokens, model, max_n_logits=10, batch_size=batch, max_feature_nodes=None)
    seconds = time.perf_counter() - t
    n_layers, n_pos = cfg.n_layers, len(tokens)
    af = g.active_features[g.selected_features]
    ids = [f"L{int(la)}.transcoder#{int(f)}@{int(p)}" for la, p, f in af.tolist()]
    ids += [f"L{la}.transcoder#err@{p}" for la in range(n_layers) for p in range(n_pos)]
    ids += [f"tok@{p}" for p in range(n_pos)] + [f"logit#{int(t.vocab_idx)}@{n_pos - 1}" for t in g.logit_targets]
    adj = g.adjacency_matrix
    info = {"rss_mb": _rss_mb(), "anon_peak_mb": _anon_mb(), **_gpu_mb(), "features_visited": len(af), "n_active": int(g.active_features.shape[0]),
            "result_mb": adj.numel() * adj.element_size() / 2**20, "edges": int((adj != 0).sum()),
            "logit_sum": _logit_sum(model, tokens[None])}
    sample = {}
    for r, node_id in enumerate(ids):
        if node_id in set(_sampled([node_id], info["n_active"])) and (r < len(af) or node_id.startswith("logit")):
            nz = adj[r].nonzero().squeeze(1)
            sample[node_id] = ([ids[c] for c in nz.tolist()], adj[r, nz].double().cpu())
    return seconds, info, {"visited": sorted(ids[: len(af)]), "sample": sample}


def _logit_sum(model, tokens: torch.Tensor) -> float:
    """A checksum of the model's last-position logits (both libraries must hold the same model)."""
    with torch.no_grad():
        return float(model(tokens)[0, -1].double().abs().sum())


def _rss_mb() -> float:
    """Peak resident set of this process (anonymous and file-backed pages, e.g. memory-mapped edges)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _AnonSampler:
    """Peak anonymous memory (``RssAnon``: not counting file pages such as memory-mapped edges),
    sampled every 50 ms by a thread."""

    def __init__(self) -> None:
        self.peak = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]))
            time.sleep(0.05)

    def peak_mb(self) -> float:
        return self.peak / 1024


ANON: _AnonSampler | None = None


def _anon_mb() -> float | None:
    return ANON.peak_mb() if ANON is not None else None


def _gpu_mb() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {"gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20}


def compare(a: dict, b: dict, skip_bos: bool) -> dict:
    """Edges of the targets both sampled, from sources that are nodes of both graphs (a feature is a
    node where it was visited): max |a - b| / max |b|, tok@0 apart when ``skip_bos``."""
    diff = bos_diff = scale = 0.0
    count = 0
    both = set(a["visited"]) & set(b["visited"])
    for target in a["sample"].keys() & b["sample"].keys():
        wa = dict(zip(a["sample"][target][0], a["sample"][target][1].tolist(), strict=True))
        wb = dict(zip(b["sample"][target][0], b["sample"][target][1].tolist(), strict=True))
        for s in wa.keys() | wb.keys():
            if "#" in s and "#err" not in s and s not in both:
                continue
            d = abs(wa.get(s, 0.0) - wb.get(s, 0.0))
            if skip_bos and s == "tok@0":
                bos_diff = max(bos_diff, d / max(abs(wb.get(s, 0.0)), 1e-30))
                continue
            diff, scale, count = max(diff, d), max(scale, abs(wb.get(s, 0.0))), count + 1
    return {"edges_compared": count, "edges_max_rel_diff": diff / scale if scale else None,
            "bos_edges_max_rel_diff": bos_diff if skip_bos else None,
            "same_feature_set": a["visited"] == b["visited"] if a.get("visited") and b.get("visited") else None}


def worker(args) -> None:
    global ANON
    ANON = _AnonSampler()
    torch.set_num_threads(args.threads)
    fn = run_ours if args.worker == "ours" else run_theirs
    seconds, info, sample = fn(args.cell, args.mode, args)
    if args.sample_out:
        torch.save(sample, args.sample_out)
    print(json.dumps({"seconds": seconds, **info}))


def spawn(side: str, cell: str, mode: str, args, device: str, sample_out: str | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--cell", cell, "--mode", mode, "--threads", str(args.threads),
           "--batch", str(args.batch), "--device", device, "--memory-mb", str(args.memory_mb)] + (["--sample-out", sample_out] if sample_out else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {args.timeout} s"}
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_of(sides: list[tuple[str, str, str]], cell: str, mode: str, args) -> list[dict]:
    """Each ``(side, device, sample file)`` built once, then all of them again, alternating, until
    ``--repeats`` rounds or until the slowest first build took over ``--repeat-under`` seconds: the
    same number of repeats on every side; per side its fastest build."""
    runs = [[spawn(side, cell, mode, args, device, out)] for side, device, out in sides]
    slowest = max((r[0].get("seconds", float("inf")) for r in runs), default=0.0)
    for _ in range(args.repeats - 1):
        if slowest >= args.repeat_under:
            break
        for r, (side, device, _) in zip(runs, sides, strict=True):
            r.append(spawn(side, cell, mode, args, device, None))
    best = []
    for r in runs:
        ok = [x for x in r if "error" not in x]
        best.append({**min(ok, key=lambda x: x["seconds"]), "repeats": len(ok)} if ok else r[0])
    return best


def ct_gb(cell: str, batch: int) -> float:
    """circuit-tracer's memory, estimated: about three N x N float32 copies of its dense matrices at
    its peak, plus the forward pass of ``batch`` prompt copies it keeps for the backward passes
    (about 17 [batch, P, d_model] tensors a layer, measured from its RSS on cell L at batch 64)."""
    n_layers, d, _, _, n_pos = CELLS[cell]
    n = n_layers * (n_pos - 1) * K + (n_layers + 1) * n_pos + 10
    forward = 17 * batch * n_pos * d * n_layers + batch * (d // 64) * n_pos**2 * n_layers
    return (3 * n * n + forward) * 4 / 2**30


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def measure(cell: str, mode: str, args, tmp: Path) -> dict:
    row = {"cell": cell, "mode": mode, "shape": "x".join(map(str, CELLS[cell][:4])), "tokens": CELLS[cell][4],
           "threads": args.threads, "device": args.device, "load_before": load()}
    sides = [("ours", args.device, str(tmp / "ours.pt"))]
    need = ct_gb(cell, args.batch if mode == "equal" else 512)
    if args.ours_only:
        theirs = {"error": "not run (--ours-only)"}
    elif args.check_device:
        sides.append(("ours", args.check_device, str(tmp / "theirs.pt")))
    elif need > args.ct_max_gb:
        theirs = {"error": f"skipped: circuit-tracer would need about {need:.0f} GiB (--ct-max-gb {args.ct_max_gb:g})"}
    else:
        sides.append(("theirs", args.device, str(tmp / "theirs.pt")))
    best = best_of(sides, cell, mode, args)
    mine = best[0]
    theirs = best[1] if len(best) > 1 else theirs
    row.update({"ours_s": mine.get("seconds"), "theirs_s": theirs.get("seconds"),
                "ratio": mine["seconds"] / theirs["seconds"] if "seconds" in mine and "seconds" in theirs else None,
                "ours_rss_mb": mine.get("rss_mb"), "theirs_rss_mb": theirs.get("rss_mb"),
                "ours_anon_peak_mb": mine.get("anon_peak_mb"), "theirs_anon_peak_mb": theirs.get("anon_peak_mb"),
                "ours_gpu_peak_mb": mine.get("gpu_peak_mb"), "theirs_gpu_peak_mb": theirs.get("gpu_peak_mb"),
                "features_visited": mine.get("features_visited"), "theirs_features_visited": theirs.get("features_visited"),
                "n_active": mine.get("n_active"), "ours_edges": mine.get("edges"), "ours_result_mb": mine.get("result_mb"),
                "theirs_result_mb": theirs.get("result_mb"), "bos": mine.get("bos"), "ours_batch": mine.get("batch"),
                "ours_spilled": mine.get("spilled"), "ours_memory_mb": args.memory_mb,
                "repeats": [mine.get("repeats"), theirs.get("repeats")], "ours_error": mine.get("error"),
                "theirs_error": theirs.get("error"), "load_after": load()})
    if "seconds" in mine and "seconds" in theirs:
        row["logit_sum_diff"] = abs(mine["logit_sum"] - theirs["logit_sum"]) if not args.check_device else None
        a, b = torch.load(tmp / "ours.pt"), torch.load(tmp / "theirs.pt")
        row.update(compare(a, b, skip_bos=mine.get("bos") == "keep" and not args.check_device))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="S,M")
    ap.add_argument("--modes", default="equal,defaults")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64, help="batch size of both libraries in the equal-work mode")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeat-under", type=float, default=150.0,
                    help="repeat only when every side's first build was faster than this (s)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per build (s)")
    ap.add_argument("--ct-max-gb", type=float, default=16.0, help="skip circuit-tracer where its estimated memory exceeds this")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--check-device", default=None, help="compare ours on --device with ours on this device instead")
    ap.add_argument("--ours-only", action="store_true", help="skip circuit-tracer (e.g. batch-size sweeps)")
    ap.add_argument("--memory-mb", type=float, default=0, help="our memory budget (0: half the available memory)")
    ap.add_argument("--json", action="store_true", help="one JSON object per line per cell and mode")
    ap.add_argument("--worker", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--sample-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    failed = 0
    for cell in args.cells.split(","):
        for mode in args.modes.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                row = measure(cell, mode, args, Path(tmp))
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"{cell:5} {mode:8} ours {row['ours_s']} s / theirs {row['theirs_s']} s = ratio {row['ratio']}; "
                      f"RSS {row['ours_rss_mb']} / {row['theirs_rss_mb']} MB; features {row['features_visited']} / "
                      f"{row['theirs_features_visited']}; edges max rel diff {row.get('edges_max_rel_diff')}; "
                      f"load {row['load_before']} -> {row['load_after']}", flush=True)
            if row.get("ours_error"):
                failed += 1
                print(f"{cell} {mode}: our build failed: {row['ours_error']}", file=sys.stderr)
    if failed:
        sys.exit(1)  # a build that failed must not read as a measurement


if __name__ == "__main__":
    main()
