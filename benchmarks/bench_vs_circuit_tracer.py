"""Attribution-graph build time against circuit-tracer, same model, same MLP transcoders, same prompt.

Run in the circuit-tracer environment (``make bench-ct-env``; it pins an older transformers, so
it is separate from the SAELens one):

    OMP_WAIT_POLICY=PASSIVE .venv-ct/bin/python benchmarks/bench_vs_circuit_tracer.py --threads 2

A random 2-layer d_model-64 model (LayerNorm, GELU) and random ReLU transcoders (ln2 output ->
MLP output, ~24 active features per token) are built once and given to both libraries. Both
compute the full graph of a 64-token prompt (every active feature visited, up to 10 logits).
Prints each time, the ratio (ours / circuit-tracer; target <= 0.5), and the largest difference
between edge weights both define (feature -> feature and feature -> logit).
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


def ours(cfg, tc, tokens, batch):
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
    acfg = LinearAttributionConfig(max_feature_nodes=10**9, batch_size=batch, max_logits=10, progress=False)
    attribute_prompt(rm, tokens[:, :8], acfg)  # warm-up
    t = time.perf_counter()
    graph = attribute_prompt(rm, tokens, acfg)
    return time.perf_counter() - t, graph, model


def theirs(cfg, tc, tokens, batch):
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
    graph = attribute(tokens[0], model, max_n_logits=10, batch_size=batch, max_feature_nodes=None, verbose=False)
    return time.perf_counter() - t, graph, model


def compare_edges(ours_graph, ct_graph) -> tuple[int, float]:
    """Feature -> feature and feature -> logit edges defined by both: (count, max |difference| / max |weight|)."""
    af = ct_graph.active_features[ct_graph.selected_features]  # [n, 3] layer, pos, feature
    ct_ids = [f"L{int(layer)}.transcoder#{int(f)}@{int(p)}" for layer, p, f in af.tolist()]
    n_feat = len(ct_ids)
    n_layers, n_pos = ct_graph.cfg.n_layers, ct_graph.n_pos
    logit_start = n_feat + n_layers * n_pos + n_pos
    tokens = [int(t.vocab_idx) for t in ct_graph.logit_targets]
    ct_ids += [None] * (n_layers * n_pos + n_pos) + [f"logit#{t}@{n_pos - 1}" for t in tokens]
    adj = ct_graph.adjacency_matrix
    index = {node_id: i for i, node_id in enumerate(ct_ids) if node_id is not None}
    visited = {ours_graph.nodes[i].id for i in (~torch.isnan(ours_graph.bias)).nonzero().squeeze(1).tolist()}
    # rows both computed: circuit-tracer visits every active feature; we skip zero-influence ones
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--d-transcoder", type=int, default=512)
    ap.add_argument("--n-pos", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg, tc = build(args.d_transcoder, 0)
    tokens = torch.randint(1, cfg.d_vocab, (1, args.n_pos), generator=torch.Generator().manual_seed(1))
    tokens[0, 0] = 0
    t_ours, t_ct = [], []
    for _ in range(args.repeats):
        a, g_ours, m_ours = ours(cfg, tc, tokens, args.batch)
        b, g_ct, m_ct = theirs(cfg, tc, tokens, args.batch)
        t_ours.append(a)
        t_ct.append(b)
    with torch.no_grad():
        same = float((m_ours(tokens) - HookedTransformer.forward(m_ct, tokens)).abs().max())
    n_active = sum(n.kind == "feature" for n in g_ours.nodes)
    count, rel = compare_edges(g_ours, g_ct)
    print(f"model: 2 layers, d_model 64, transcoders {args.d_transcoder} wide; prompt {args.n_pos} tokens; "
          f"{n_active} active features; threads {args.threads}; max logit difference of the two models {same:.2e}")
    print(f"circuit-tracer: {min(t_ct):.3f} s (best of {args.repeats}), {g_ct.adjacency_matrix.shape[0]} nodes")
    print(f"circuitgraph:   {min(t_ours):.3f} s (best of {args.repeats}), {g_ours.n_nodes} nodes, {g_ours.n_edges} edges")
    print(f"ratio ours / circuit-tracer: {min(t_ours) / min(t_ct):.2f}   (target <= 0.5)")
    print(f"shared edges compared: {count}; max |difference| / max |weight|: {rel:.2e}")


if __name__ == "__main__":
    main()
