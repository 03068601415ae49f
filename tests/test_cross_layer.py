"""Cross-layer transcoders: planted features recovered, spliced logits exact, edges equal
interventions, dataset circuits, circuit-tracer's format (golden file written by circuit-tracer)."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from circuitgraph.attribution.dataset import DatasetAttributionConfig, score_nodes
from circuitgraph.attribution.linear import LinearAttributionConfig, attribute_prompt
from circuitgraph.replacement import ReplacementModel, SpliceSpec
from circuitgraph.tasks.registry import make_dataset
from circuitgraph.toylang.corpus import CorpusConfig, ToyCorpus
from dictionaries.architectures.registry import build_dictionary
from dictionaries.circuit_tracer_format import load_clt_circuit_tracer, save_clt_circuit_tracer
from dictionaries.config import DictionaryConfig
from dictionaries.cross_layer import clt_losses, initialise_clt
from dictionaries.errors import DictionaryError
from dictionaries.metrics import mmcs
from dictionaries.persistence import load_dictionaries
from dictionaries.site import Site, expand_sites
from dictionaries.training import TrainConfig, train_dictionaries

from .test_dataset_circuits import check_evaluator_against_spliced_runs
from .test_linear_attribution import PROMPT, _frozen_value

GOLDEN = Path(__file__).with_name("fixtures") / "circuit_tracer_clt"


@pytest.fixture(scope="module")
def clt_dicts(default_model, tmp_path_factory):
    """A small BatchTopK CLT at every layer of the embedded model (50 steps of 1,024 tokens)."""
    cfg = TrainConfig.of(arch="batchtopk", expansion=2, k=8, tokens=50 * 1024, batch_tokens=1024, chunk_sequences=32,
                      model_batch=16, warmup_steps=5, checkpoint_every=1000)
    out = tmp_path_factory.mktemp("clt")
    sites = expand_sites("clt", "all", default_model.cfg.n_layers)
    return train_dictionaries(default_model, sites, ToyCorpus(CorpusConfig(seed=1, seq_len=64)), cfg, out).dictionaries


@pytest.fixture(scope="module")
def mixed_clt64(model64, dicts64, clt_dicts):
    """attn_z dictionaries (committed) + the CLT, float64."""
    dicts = {s: d for s, d in dicts64.items() if s.kind == "attn_z"}
    dicts.update({s: copy.deepcopy(d).double() for s, d in clt_dicts.items()})
    return ReplacementModel(model64, dicts)


def test_planted_cross_layer_features_recovered():
    """Synthetic 3-layer data: sparse features at each layer are read from that layer's input and
    write (known directions) into that layer's output and every later one. Joint CLT training
    recovers the planted decoders (rows over all written layers) with MMCS >= 0.9."""
    g = torch.Generator().manual_seed(0)
    n_layers, d, f, n = 3, 24, 32, 16384
    enc_dirs = [torch.nn.functional.normalize(torch.randn(f, d, generator=g), dim=1) for _ in range(n_layers)]
    dec_true = [torch.nn.functional.normalize(torch.randn(f, (n_layers - i) * d, generator=g), dim=1)
                for i in range(n_layers)]
    codes = []
    for _ in range(n_layers):
        idx = torch.rand(n, f, generator=g).argsort(1)[:, :3]  # exactly 3 active features per token and layer
        active = torch.zeros(n, f).scatter(1, idx, 1.0)
        codes.append(active * (0.5 + torch.rand(n, f, generator=g)))
    xs = [codes[i] @ enc_dirs[i] for i in range(n_layers)]
    ys = [sum(codes[i] @ dec_true[i][:, (j - i) * d:(j - i + 1) * d] for i in range(j + 1)) for j in range(n_layers)]
    sites = [Site(i, "clt") for i in range(n_layers)]
    dicts = {s: build_dictionary(DictionaryConfig("topk", d, 2 * f, (n_layers - s.layer) * d, k=3,
                                                  out_layers=n_layers - s.layer), seed=s.layer) for s in sites}
    for s in sites:
        initialise_clt(dicts[s], xs[s.layer][:4096], ys[s.layer][:4096])
    params = [p for d_ in dicts.values() for p in d_.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    for _ in range(600):
        rows = torch.randint(0, n, (1024,), generator=g)
        terms = clt_losses(dicts, {s: xs[s.layer][rows] for s in sites}, {s: ys[s.layer][rows] for s in sites})
        sum(t.total for t in terms.values()).backward()
        for d_ in dicts.values():
            d_.remove_parallel_gradient()
        opt.step()
        opt.zero_grad()
        for s, d_ in dicts.items():
            d_.constrain_decoder()
            d_.update_firing(terms[s].fired, 1024)
    for s in sites:
        learned = dicts[s].decoder_directions().detach()
        assert mmcs(dec_true[s.layer], learned) >= 0.9, (s.id, mmcs(dec_true[s.layer], learned))
    # and the last layer's output, written by the features of all three layers, is reconstructed
    with torch.no_grad():
        terms = clt_losses(dicts, {s: xs[s.layer][:4096] for s in sites}, {s: ys[s.layer][:4096] for s in sites})
        y = ys[-1][:4096] * dicts[sites[-1]].norm_out
        fvu = float(terms[sites[-1]].mse) / float((y - y.mean(0)).pow(2).sum(-1).mean())
    assert fvu < 0.05, fvu


def test_spliced_logits_exact(mixed_clt64, model64):
    tokens = model64.to_tokens(PROMPT)
    rm = mixed_clt64
    with torch.no_grad():
        clean = model64(tokens)
        untouched = rm.run(tokens).logits
        zeros = {s: torch.zeros(1, tokens.shape[1], d.cfg.out_width, dtype=torch.float64) for s, d in rm.dicts.items()}
        touched = rm.run(tokens, SpliceSpec(offsets=zeros)).logits  # every output recomputed as writes + error
    assert torch.equal(clean, untouched)
    assert (touched - clean).abs().max() < 1e-10


def test_clt_edges_equal_interventions(mixed_clt64, model64):
    rm = mixed_clt64
    tokens = model64.to_tokens(PROMPT)
    g = attribute_prompt(rm, tokens, LinearAttributionConfig(max_feature_nodes=100_000, progress=False))
    with torch.no_grad():
        clean = rm.run(tokens, record_frozen=True)
    rng = random.Random(0)
    site_of = {s.id: s for s in rm.sites}
    big = (g.weights.abs() > 1e-3).nonzero().squeeze(1).tolist()
    rng.shuffle(big)
    # a CLT feature's direct edges carry its writes into every later layer (no same-layer targets:
    # nothing at layer L reads that layer's MLP output)
    checked = {"clt->next layer": 0, "clt->2+ layers on": 0, "clt->logit": 0, "error": 0, "token": 0, "attn": 0}
    for e in big:
        src, tgt = g.nodes[int(g.sources[e])], g.nodes[int(g.targets[e])]
        if src.kind == "feature" and src.site.endswith(".clt"):
            if tgt.kind != "feature":
                key = "clt->logit"
            else:
                gap = site_of[tgt.site].layer - site_of[src.site].layer
                assert gap >= 1 or tgt.site.endswith("attn_z"), (src.id, tgt.id)
                key = "clt->next layer" if gap == 1 else "clt->2+ layers on" if gap > 1 else "attn"
        elif src.kind == "feature":
            key = "attn"
        else:
            key = src.kind
        if checked.get(key, 99) >= 12:
            continue
        source = (site_of.get(src.site), src.index)
        before = _frozen_value(rm, tokens, clean, tgt, source, src.pos, "none")
        after = _frozen_value(rm, tokens, clean, tgt, source, src.pos, src.kind)
        w = float(g.weights[e])
        assert abs((before - after) - w) <= 1e-4 * abs(w), (src.id, tgt.id, before - after, w)
        checked[key] += 1
        if all(v >= 12 for v in checked.values()):
            break
    assert all(v > 0 for v in checked.values()), checked
    incoming = torch.zeros(g.n_nodes, dtype=torch.float64).index_add_(0, g.targets, g.weights.double())
    targets = ~torch.isnan(g.bias)
    assert ((incoming[targets] + g.bias[targets].double()) - g.activation[targets].double()).abs().max() < 1e-6


def test_clt_dataset_circuit_matches_spliced_runs(default_model, v1_dicts, clt_dicts):
    """Dataset attribution scores CLT features, and every number of the evaluator equals a
    hand-built spliced run, with the circuit "every node of L1.clt" (whose features write into
    layers 1..3) in a set of attn_z dictionaries and the CLT."""
    dicts = {s: d for s, d in v1_dicts.items() if s.kind == "attn_z"}
    dicts.update(clt_dicts)
    rm = ReplacementModel(default_model, dicts)
    scores = score_nodes(rm, make_dataset("ioi", default_model, n=8, seed=0), DatasetAttributionConfig(progress=False))
    assert all(int((v != 0).sum()) > 0 for s, v in scores.features.items() if s.kind == "clt")
    check_evaluator_against_spliced_runs(rm, default_model, Site(1, "clt"))


def test_circuit_tracer_golden_file():
    """Our reader on a folder written by circuit-tracer 0.5.0 reproduces its recorded features and
    reconstructions (benchmarks/make_golden_circuit_tracer.py wrote it)."""
    dicts = load_clt_circuit_tracer(GOLDEN)
    want = load_file(str(GOLDEN / "expected.safetensors"))
    x = want["inputs"]  # [n_layers, pos, d_model]
    n = x.shape[0]
    with torch.no_grad():
        for i in range(n):
            d = dicts[Site(i, "clt")]
            assert torch.allclose(d.encode(x[i]), want["features"][i], atol=1e-5)
        for j in range(n):
            recon = sum(dicts[Site(i, "clt")](x[i]).output[:, (j - i) * x.shape[2]:(j - i + 1) * x.shape[2]]
                        for i in range(j + 1))
            assert torch.allclose(recon, want["reconstruction"][j], atol=1e-5)


def test_circuit_tracer_export_round_trip(clt_dicts, default_model, tmp_path):
    save_clt_circuit_tracer(clt_dicts, tmp_path / "ct")
    back = load_dictionaries(tmp_path / "ct")
    x = ToyCorpus(CorpusConfig(seed=5, seq_len=32)).sequences(0, 4)
    _, cache = default_model.run_with_cache(x)
    with torch.no_grad():
        for s, d in clt_dicts.items():
            h = cache[s.input_hook].reshape(-1, default_model.cfg.d_model)
            assert torch.allclose(d.encode(h), back[s].encode(h), atol=1e-5)
        zero = {s: torch.zeros(*x.shape, d.cfg.out_width) for s, d in clt_dicts.items()}
        spliced = [ReplacementModel(default_model, ds).run(x, SpliceSpec(offsets=zero)) for ds in (clt_dicts, back)]
        for s in clt_dicts:  # every layer's reconstruction (its error term) agrees
            assert torch.allclose(spliced[0].sites[s].errors, spliced[1].sites[s].errors, atol=1e-4)
    # and the written folder is what circuit-tracer's reader expects (names and shapes)
    enc = load_file(str(tmp_path / "ct" / "W_enc_1.safetensors"))
    assert set(enc) == {"W_enc_1", "b_enc_1", "b_dec_1", "threshold_1"}
    assert load_file(str(tmp_path / "ct" / "W_dec_1.safetensors"))["W_dec_1"].shape[1] == default_model.cfg.n_layers - 1


def test_clt_refusals(default_model, clt_dicts, tmp_path):
    with pytest.raises(DictionaryError, match="consecutive and end at the last layer"):
        ReplacementModel(default_model, {s: d for s, d in clt_dicts.items() if s.layer != 2})
    topk = {s: build_dictionary(DictionaryConfig("topk", 128, 64, d.cfg.out_width, k=4, out_layers=d.cfg.out_layers))
            for s, d in clt_dicts.items()}
    with pytest.raises(DictionaryError, match="train with --arch batchtopk"):
        save_clt_circuit_tracer(topk, tmp_path / "x")
    with pytest.raises(DictionaryError, match="consecutive"):
        train_dictionaries(default_model, [Site(1, "clt")], ToyCorpus(), TrainConfig.of(tokens=4096), tmp_path / "y")
    with pytest.raises(DictionaryError, match="interaction penalty"):
        train_dictionaries(default_model, expand_sites("clt", "all", 4), ToyCorpus(),
                           TrainConfig.of(tokens=4096, interaction_penalty=1.0), tmp_path / "z")


def test_clt_through_the_cli(tmp_path, capsys):
    """train-dictionaries --sites attn_z,clt, dicts export --to circuit-tracer, then trace (dataset
    and prompt) and view with the exported CLT read back as a sub-folder of a dictionary folder."""
    import json
    import shutil

    from circuitgraph.cli.main import main

    d = tmp_path / "d"
    assert main(["--threads", "1", "train-dictionaries", "--sites", "attn_z,clt", "--arch", "batchtopk", "--k", "8",
                 "--expansion", "2", "--tokens", "40k", "--batch-tokens", "1024", "--chunk-sequences", "32",
                 "--seq-len", "64", "--out", str(d)]) == 0
    assert main(["dicts", "export", "--dicts", str(d), "--to", "circuit-tracer", "--out", str(tmp_path / "ct")]) == 0
    mixed = tmp_path / "mixed"  # our attn_z folders + circuit-tracer's CLT files in a sub-folder
    mixed.mkdir()
    for sub in d.iterdir():
        if sub.name.endswith(".attn_z"):
            shutil.copytree(sub, mixed / sub.name)
    shutil.copytree(tmp_path / "ct", mixed / "clt")
    capsys.readouterr()
    assert main(["trace", "--dicts", str(mixed), "--sites", "attn_z,clt", "--task", "ioi", "--n", "8", "--eval-n", "8",
                 "--max-nodes", "40", "--describe-seqs", "0", "--out", str(tmp_path / "g"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n_nodes"] == 40 and "ceiling" in summary
    assert main(["trace", "--dicts", str(mixed), "--sites", "attn_z,clt", "--task", "ioi", "--n", "8", "--eval-n", "8",
                 "--method", "acdc", "--describe-seqs", "0", "--out", str(tmp_path / "a"), "--json"]) == 0
    acdc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert acdc["method"] == "acdc" and acdc["n_nodes"] >= 1
    from circuitgraph.graph.graph import Graph

    g = Graph.load(tmp_path / "g")
    assert [s for s in g.metadata["sites"] if s.endswith(".clt")] == ["L0.clt", "L1.clt", "L2.clt", "L3.clt"]
    assert any(n.kind == "feature" and n.site.endswith(".clt") for n in g.nodes)
    assert main(["trace", "--dicts", str(mixed), "--sites", "attn_z,clt", "--prompt",
                 "When Mary and John went to the park, John gave a book to", "--describe-seqs", "0",
                 "--out", str(tmp_path / "p")]) == 0
    assert main(["view", str(tmp_path / "p"), "--out", str(tmp_path / "p.html")]) == 0
    page = (tmp_path / "p.html").read_text()
    assert ".clt" in page


def test_corrupt_or_inconsistent_circuit_tracer_folders_refused(tmp_path, default_model):
    """Review findings: NaN weights, a layer without the others' threshold, a missing W_enc_i and a
    gap in a CLT's layers are refused with one clear line (they were read silently)."""
    import shutil

    from safetensors.torch import save_file

    from dictionaries.persistence import check_against_model

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(GOLDEN, dst)
        return dst

    nan = copy("nan")
    enc = load_file(str(nan / "W_enc_1.safetensors"))
    enc["W_enc_1"][0, 0] = float("nan")
    save_file(enc, str(nan / "W_enc_1.safetensors"))
    with pytest.raises(DictionaryError, match="W_enc_1 holds NaN"):
        load_dictionaries(nan)
    mixed = copy("mixed")
    enc = load_file(str(mixed / "W_enc_1.safetensors"))
    del enc["threshold_1"]
    save_file(enc, str(mixed / "W_enc_1.safetensors"))
    with pytest.raises(DictionaryError, match="layer 1 .*threshold absent.* differs from layer 0"):
        load_dictionaries(mixed)
    hole = copy("hole")
    (hole / "W_dec_1.safetensors").unlink()
    with pytest.raises(DictionaryError, match="missing W_dec_1.safetensors"):
        load_dictionaries(hole)
    gap = {s: d for s, d in load_dictionaries(copy("ok")).items() if s.layer != 1}
    with pytest.raises(DictionaryError, match="consecutive"):
        check_against_model(gap, default_model.cfg)  # what dicts eval / report / prune / trace call first


def test_clt_beside_attn_z_of_another_width(tmp_path):
    """Review finding: the joint CLT loss took its layer width from whichever site came first; with
    attention-z (n_heads * d_head = 16) narrower than d_model (32) it sliced the wrong columns."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from dictionaries.token_sources import TensorTokens

    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=32, n_heads=2, d_head=8, d_mlp=64, n_ctx=16,
                                                      d_vocab=50, act_fn="gelu", normalization_type="LN"))
    tokens = TensorTokens(torch.randint(0, 50, (64, 16)))
    cfg = TrainConfig.of(k=4, expansion=2, tokens=8 * 256, batch_tokens=256, chunk_sequences=32, model_batch=16,
                      warmup_steps=1, checkpoint_every=1000)
    sites = expand_sites("attn_z,clt", "all", 2)
    dicts = train_dictionaries(model, sites, tokens, cfg, tmp_path / "d").dictionaries
    assert dicts[Site(0, "clt")].cfg.out_width == 64 and dicts[Site(0, "attn_z")].cfg.d_in == 16
    x = tokens.sequences(0, 4)
    with torch.no_grad():
        assert torch.equal(ReplacementModel(model, dicts).run(x).logits, model(x))


def test_dicts_eval_of_a_clt_matches_the_replacement_model(default_model, clt_dicts):
    """`dicts eval`'s per-layer CLT numbers (its own splicing hooks) against the replacement model:
    FVU from the error terms it records, and the spliced CE loss from a run with only that layer's
    error term set to zero (the MLP output becomes exactly the CLT's reconstruction)."""
    import torch.nn.functional as F

    from dictionaries.metrics import evaluate_dictionaries

    tokens = ToyCorpus(CorpusConfig(seed=12345, seq_len=64)).sequences(0, 8)
    metrics = evaluate_dictionaries(default_model, clt_dicts, tokens)
    rm = ReplacementModel(default_model, clt_dicts)
    with torch.no_grad():
        run = rm.run(tokens)
        for s in clt_dicts:
            err = run.sites[s].errors[:, 1:].reshape(-1, run.sites[s].errors.shape[-1])
            _, cache = default_model.run_with_cache(tokens)
            y = cache[s.output_hook][:, 1:].reshape(-1, err.shape[-1])  # BOS is never spliced nor counted
            fvu = float(err.pow(2).sum() / (y - y.mean(0)).pow(2).sum())
            assert metrics[s].fvu == pytest.approx(fvu, rel=1e-3), s.id
            zero = {s: torch.zeros_like(run.sites[s].errors)}
            logits = rm.run(tokens, SpliceSpec(errors=zero)).logits
            ce = float(-F.log_softmax(logits.float(), -1)[:, :-1].gather(-1, tokens[:, 1:, None]).mean())
            assert metrics[s].ce_spliced == pytest.approx(ce, abs=1e-4), s.id


def test_more_clt_refusals(default_model, clt_dicts, tmp_path):
    import shutil

    from dictionaries.splice import splice_hooks

    with pytest.raises(DictionaryError, match="train with --arch topk, batchtopk, relu, jumprelu, not gated"):
        train_dictionaries(default_model, expand_sites("clt", "all", 4), ToyCorpus(), TrainConfig.of(arch="gated",
                                                                                                   tokens=4096), tmp_path)
    with pytest.raises(ValueError, match="pass the whole CLT as group="):
        splice_hooks(Site(1, "clt"), clt_dicts[Site(1, "clt")])
    with pytest.raises(DictionaryError, match="starts at layer 2"):
        save_clt_circuit_tracer({s: d for s, d in clt_dicts.items() if s.layer >= 2}, tmp_path / "late")
    with pytest.raises(DictionaryError, match="no cross-layer transcoder"):
        save_clt_circuit_tracer({}, tmp_path / "none")
    hooks = tmp_path / "hooks"
    shutil.copytree(GOLDEN, hooks)
    (hooks / "config.yaml").write_text("model_kind: cross_layer_transcoder\nfeature_input_hook: ln2.hook_normalized\n")
    with pytest.raises(DictionaryError, match="feature_input_hook is ln2.hook_normalized; only CLTs that read"):
        load_clt_circuit_tracer(hooks)
    shape = tmp_path / "shape"
    shutil.copytree(GOLDEN, shape)
    dec = load_file(str(shape / "W_dec_0.safetensors"))
    from safetensors.torch import save_file

    save_file({"W_dec_0": dec["W_dec_0"][:, :2].contiguous()}, str(shape / "W_dec_0.safetensors"))
    with pytest.raises(DictionaryError, match=r"W_dec_0 has shape \(24, 2, 16\), expected \(24, 3, 16\)"):
        load_clt_circuit_tracer(shape)
    key = tmp_path / "key"
    shutil.copytree(GOLDEN, key)
    save_file({"W_enc_2": load_file(str(key / "W_enc_2.safetensors"))["W_enc_2"]}, str(key / "W_enc_2.safetensors"))
    with pytest.raises(DictionaryError, match="layer 2 lacks tensor 'b_enc_2'"):
        load_clt_circuit_tracer(key)
