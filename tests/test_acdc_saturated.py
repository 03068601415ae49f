"""ACDC on a hand-built model whose nonlinearity is saturated at the clean input.

One layer, attention switched off (W_O = 0), a basis ReLU dictionary on ``L0.resid_mid`` and a
one-neuron ReLU MLP: the clean token sets residual dimension 0 to 1, so the neuron's
pre-activation ``1 - 2 x_0`` is -1 (off, zero gradient); the corrupted token leaves ``x_0 = 0``,
the neuron fires and writes -3 onto the answer logit. Feature 0 of the dictionary is therefore
the whole mechanism (its ablation moves the metric by 3 = the full-vs-empty gap), yet its
attribution score is exactly 0. ACDC must test it and keep it.
"""

from __future__ import annotations

import math

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from circuitgraph.attribution.ablation import Ablator, evaluate_circuit
from circuitgraph.attribution.acdc import AcdcConfig, acdc_nodes
from circuitgraph.attribution.circuit import CircuitConfig, trace_dataset
from circuitgraph.attribution.dataset import DatasetAttributionConfig, score_nodes
from circuitgraph.attribution.nodeset import AblatedNodes, DatasetNode
from circuitgraph.replacement import ReplacementModel
from circuitgraph.tasks.dataset import TaskDataset
from dictionaries.architectures.registry import build_dictionary
from dictionaries.config import DictionaryConfig
from dictionaries.site import Site

SITE = Site(0, "resid_mid")


def saturated_model() -> HookedTransformer:
    cfg = HookedTransformerConfig(n_layers=1, d_model=4, n_ctx=4, d_head=4, n_heads=1, d_mlp=1, d_vocab=4,
                                  act_fn="relu", normalization_type=None, seed=0)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.W_E[1, 0] = 1.0  # the clean token
        model.blocks[0].mlp.W_in[0, 0] = -2.0
        model.blocks[0].mlp.b_in[0] = 1.0
        model.blocks[0].mlp.W_out[0, 1] = 3.0
        model.W_U[1, 0] = 1.0  # the wrong answer's logit reads what the neuron writes
    return model


def basis_dictionary():
    d = build_dictionary(DictionaryConfig(arch="relu", d_in=4, d_dict=4, site=SITE.id))
    with torch.no_grad():
        d.W_enc.copy_(torch.eye(4))
        d.W_dec.copy_(torch.eye(4))
        d.b_enc.zero_()
        d.b_dec.zero_()
    return d


def dataset(n: int = 4) -> TaskDataset:
    clean = torch.tensor([[0, 1]] * n)
    corrupt = torch.tensor([[0, 2]] * n)
    return TaskDataset("saturated", ["p"] * n, ["c"] * n, clean, corrupt, torch.ones(n, dtype=torch.long),
                       torch.full((n, 1), 3), torch.zeros(n, 1, dtype=torch.long), "logit_diff")


def test_attribution_is_blind_but_the_ablation_is_not():
    rm = ReplacementModel(saturated_model(), {SITE: basis_dictionary()})
    ds = dataset()
    scores = score_nodes(rm, ds, DatasetAttributionConfig(progress=False))
    assert float(scores.features[SITE].abs().max()) == 0.0 and float(scores.errors[SITE].abs().max()) == 0.0
    ab = Ablator(rm, ds, "patch")
    assert ab.full() - ab.empty() == 3.0
    only_f0 = ab.metric(AblatedNodes.none({SITE: 4}).with_nodes([DatasetNode(SITE, 0)]))
    assert only_f0 == ab.empty()  # ablating feature 0 alone removes everything


def test_acdc_keeps_the_zero_attribution_feature():
    rm = ReplacementModel(saturated_model(), {SITE: basis_dictionary()})
    ds = dataset()
    scores = score_nodes(rm, ds, DatasetAttributionConfig(progress=False))
    ab = Ablator(rm, scores.runs, "patch")
    res = acdc_nodes(ab, scores, AcdcConfig(tau=0.01), progress=False)
    assert res.circuit.nodes() == [DatasetNode(SITE, 0)]
    assert res.search.n_rescued == 1 and res.suspicious == 0
    ev = evaluate_circuit(ab, res.circuit)
    assert ev.faithfulness == 1.0 and ev.completeness == 1.0


def test_trace_dataset_acdc_is_faithful_and_flags_nothing():
    rm = ReplacementModel(saturated_model(), {SITE: basis_dictionary()})
    out = trace_dataset(rm, dataset(), CircuitConfig("acdc", max_nodes=10, progress=False, acdc=AcdcConfig(0.01)))
    assert out.evaluation.faithfulness == 1.0 and out.graph.metadata["acdc_suspicious"] == 0
    assert out.evaluation.n_nodes == 1


def test_empty_acdc_result_is_flagged(caplog):
    """A tau above 1 lets every removal pass: the circuit is empty, and that is said."""
    rm = ReplacementModel(saturated_model(), {SITE: basis_dictionary()})
    scores = score_nodes(rm, dataset(), DatasetAttributionConfig(progress=False))
    with caplog.at_level("WARNING"):
        res = acdc_nodes(Ablator(rm, scores.runs), scores, AcdcConfig(tau=1.5, keep_factor=math.inf), progress=False)
    assert res.circuit.n_nodes() == 0 and res.suspicious & 1
    assert "empty" in caplog.text
