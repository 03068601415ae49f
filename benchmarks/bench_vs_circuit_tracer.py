"""Attribution-graph build time against circuit-tracer, same model, same MLP transcoders, same prompt.

Run in the circuit-tracer environment (``make bench-ct-env``; it pins an older transformers, so
it is separate from the SAELens one):

    OMP_WAIT_POLICY=PASSIVE .venv-ct/bin/python benchmarks/bench_vs_circuit_tracer.py --threads 2

A random 2-layer d_model-64 model (LayerNorm, GELU) and random ReLU transcoders (ln2 output ->
MLP output, ~24 active features per token) are built once and given to both libraries, with the
same prompt, up to 10 logits, the same batch size and thread count.

* **equal work** (the ratio that counts): circuitgraph's budget covers every active feature, so
  it visits them all; circuit-tracer is capped (``max_feature_nodes``) at that many features, and
  the script checks that both visited the *same* feature set;
* **defaults vs defaults** (labelled as such): each library with its own default feature budget
  and batch size (ours 1,000 features, batches sized by memory; circuit-tracer every active
  feature at batch 512).

The model is tiny (d_model 64); ``benchmarks/bench_scaling.py`` compares the two at real sizes.
Our graphs use ``bos="detach"`` here (circuit-tracer's convention), so every shared edge compares.

Prints, per row, what each side did (features visited, batch, threads), the best-of-N times and
their ratio; the replacement and completeness scores of both graphs computed with
circuit-tracer's formulas (ours through ``scores_of``, theirs through ``compute_graph_scores``);
and the largest difference between edge weights both define (feature -> feature and -> logit).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402


def build(d_tc: int, seed: int):
    cfg = HookedTransformerConfig(n_layers=2, d_model=64, n_ctx=128, d_head=16, n_heads=4, d_mlp=256, d_vocab=886,
                                  act_fn="gelu", normalization_type="LN", seed=seed, device="cpu")
    g = torch.Generator().manual_seed(seed)
    tc = []
    for _ in range(cfg.n_layers):
        w_enc = torch.randn(64, d_tc, generator=g) / 8
        w_dec = torch.randn(d_tc, 64, generator=g) / 8
        b_enc = torch.full((d_tc,), -1.75)  # about 4% of 512 active per token
        tc.append((w_enc, w_dec, b_enc, torch.randn(64, generator=g) * 0.01))
    return cfg, tc


def _tokenizer():
    from circuitgraph.models import load_default

    return load_default().tokenizer  # the toy tokenizer (886 tokens, BOS 0); circuit-tracer needs one


def ours(cfg, tc, tokens, batch, max_features: int = 10**9):
    from circuitgraph.attribution.linear import LinearAttributionConfig, attribute_prompt
    from circuitgraph.replacement import ReplacementModel
    from dictionaries.architectures.registry import build_dictionary
    from dictionaries.config import DictionaryConfig
    from dictionaries.site import Site

    model = HookedTransformer(cfg, tokenizer=_tokenizer())
    dicts = {}
    for layer, (w_enc, w_dec, b_enc, b_dec) in enumerate(tc):
        d = build_dictionary(DictionaryConfig("relu", 64, w_enc.shape[1], site=f"L{layer}.transcoder"))
        with torch.no_grad():
            d.W_enc.copy_(w_enc)
            d.W_dec.copy_(w_dec)
            d.b_enc.copy_(b_enc)
            d.b_dec.copy_(b_dec)
        dicts[Site(layer, "transcoder")] = d
    rm = ReplacementModel(model, dicts)
    acfg = LinearAttributionConfig(max_feature_nodes=max_features, batch_size=batch, max_logits=10, progress=False,
                                   bos="detach")
    attribute_prompt(rm, tokens[:, :8], acfg)  # warm-up
    t = time.perf_counter()
    graph = attribute_prompt(rm, tokens, acfg)
    return time.perf_counter() - t, graph, model


def theirs(cfg, tc, tokens, batch, max_features: int | None = None):
    from circuit_tracer import attribute
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet

    layers = {}
    for layer, (w_enc, w_dec, b_enc, b_dec) in enumerate(tc):
        t = SingleLayerTranscoder(64, w_enc.shape[1], torch.relu, layer, device=torch.device("cpu"), dtype=torch.float32)
        with torch.no_grad():
            t.W_enc.copy_(w_enc.T)
            t.W_dec.copy_(w_dec)
            t.b_enc.copy_(b_enc)
            t.b_dec.copy_(b_dec)
        layers[layer] = t
    tset = TranscoderSet(layers, feature_input_hook="ln2.hook_normalized", feature_output_hook="hook_mlp_out")
    model = TransformerLensReplacementModel.from_config(cfg, tset, tokenizer=_tokenizer())
    attribute(tokens[0, :8], model, max_n_logits=10, batch_size=batch, verbose=False)  # warm-up
    t = time.perf_counter()
    graph = attribute(tokens[0], model, max_n_logits=10, batch_size=batch, max_feature_nodes=max_features, verbose=False)
    return time.perf_counter() - t, graph, model


def visited_ids(ours_graph) -> set[str]:
    """Feature nodes our engine visited (computed incoming edges for)."""
    return {ours_graph.nodes[i].id for i in (~torch.isnan(ours_graph.bias)).nonzero().squeeze(1).tolist()
            if ours_graph.nodes[i].kind == "feature"}


def their_ids(ct_graph) -> list[str]:
    af = ct_graph.active_features[ct_graph.selected_features]  # [n, 3] layer, pos, feature
    return [f"L{int(layer)}.transcoder#{int(f)}@{int(p)}" for layer, p, f in af.tolist()]


def compare_edges(ours_graph, ct_graph) -> tuple[int, float]:
    """Feature -> feature and feature -> logit edges defined by both: (count, max |difference| / max |weight|)."""
    ct_ids = their_ids(ct_graph)
    n_feat = len(ct_ids)
    n_layers, n_pos = ct_graph.cfg.n_layers, ct_graph.n_pos
    logit_start = n_feat + n_layers * n_pos + n_pos
    tokens = [int(t.vocab_idx) for t in ct_graph.logit_targets]
    ct_ids += [None] * (n_layers * n_pos + n_pos) + [f"logit#{t}@{n_pos - 1}" for t in tokens]
    adj = ct_graph.adjacency_matrix
    index = {node_id: i for i, node_id in enumerate(ct_ids) if node_id is not None}
    visited = visited_ids(ours_graph)
    # rows both computed (equal-work runs visit the same features)
    rows = [i for i in range(n_feat) if ct_ids[i] in visited] + list(range(logit_start, adj.shape[0]))
    theirs = adj[rows][:, :n_feat].double()  # targets x source features
    mine = torch.zeros_like(theirs)
    row_of = {r: i for i, r in enumerate(rows)}
    for s, t, w in zip(ours_graph.sources.tolist(), ours_graph.targets.tolist(), ours_graph.weights.tolist(), strict=True):
        si, ti = index.get(ours_graph.nodes[s].id), index.get(ours_graph.nodes[t].id)
        if si is not None and ti is not None and si < n_feat and ti in row_of:
            mine[row_of[ti], si] = w
    both = (theirs != 0) | (mine != 0)
    rel = float((theirs - mine).abs().max() / theirs.abs().max()) if bool(both.any()) else 0.0
    return int(both.sum()), rel


def _row(label: str, args, cfg, tc, tokens, ours_max: int, theirs_max: int | None, batch: int,
         batch_theirs: int | None = None) -> tuple:
    from circuit_tracer.graph import compute_graph_scores

    from circuitgraph.graph.pruning import scores_of

    t_ours, t_ct = [], []
    for _ in range(args.repeats):
        a, g_ours, m_ours = ours(cfg, tc, tokens, batch, ours_max)
        b, g_ct, m_ct = theirs(cfg, tc, tokens, batch_theirs or batch, theirs_max)
        t_ours.append(a)
        t_ct.append(b)
    mine, their = visited_ids(g_ours), set(their_ids(g_ct))
    count, rel = compare_edges(g_ours, g_ct)
    s_ours = scores_of(g_ours)
    rep_ct, comp_ct = (float(x) for x in compute_graph_scores(g_ct))
    print(f"[{label}] batch ours {batch} / theirs {batch_theirs or batch}, threads {args.threads}")
    print(f"  circuit-tracer: {min(t_ct):.3f} s (best of {args.repeats}); max_feature_nodes={theirs_max}; "
          f"{len(their)} features visited; replacement {rep_ct:.3f}, completeness {comp_ct:.3f}")
    print(f"  circuitgraph:   {min(t_ours):.3f} s (best of {args.repeats}); max_feature_nodes={ours_max}; "
          f"{len(mine)} features visited; replacement {s_ours.replacement:.3f}, completeness {s_ours.completeness:.3f} "
          f"(ours, nodes with inputs only: {s_ours.completeness_inputs_only:.3f})")
    print(f"  same feature set: {mine == their} ({len(mine & their)} shared, {len(mine ^ their)} differ)")
    print(f"  ratio ours / circuit-tracer: {min(t_ours) / min(t_ct):.2f}; shared edges compared: {count}, "
          f"max |difference| / max |weight|: {rel:.2e}")
    return g_ours, m_ours, m_ct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--d-transcoder", type=int, default=512)
    ap.add_argument("--n-pos", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-defaults", action="store_true", help="skip the defaults-vs-defaults row")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg, tc = build(args.d_transcoder, 0)
    tokens = torch.randint(1, cfg.d_vocab, (1, args.n_pos), generator=torch.Generator().manual_seed(1))
    tokens[0, 0] = 0
    _, probe, _ = ours(cfg, tc, tokens, args.batch)
    n_visit = len(visited_ids(probe))
    print(f"model: 2 layers, d_model 64, transcoders {args.d_transcoder} wide; prompt {args.n_pos} tokens; "
          f"{n_visit} active features with non-zero influence (ours visits only these; circuit-tracer's default "
          f"visits every active feature, see its row); threads {args.threads}")
    g, m_ours, m_ct = _row("equal work: same feature set, same batch", args, cfg, tc, tokens, 10**9, n_visit, args.batch)
    with torch.no_grad():
        same = float((m_ours(tokens) - HookedTransformer.forward(m_ct, tokens)).abs().max())
    print(f"max logit difference of the two models: {same:.2e}")
    if not args.no_defaults:
        from circuitgraph.attribution.linear import LinearAttributionConfig

        d = LinearAttributionConfig()
        _row("defaults vs defaults (NOT equal work: each library's own feature budget and batch size)", args, cfg, tc,
             tokens, d.max_feature_nodes, None, d.batch_size, 512)


if __name__ == "__main__":
    main()
