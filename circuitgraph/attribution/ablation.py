"""Running the replacement model with sets of nodes ablated, and the one circuit evaluator.

Node sets are :class:`~circuitgraph.attribution.nodeset.KeptNodes` (a circuit) or
:class:`~circuitgraph.attribution.nodeset.AblatedNodes` (what a run replaces). Ablation replaces a
latent / error by

* ``patch``: its value on the corrupted prompt (ACDC's convention),
* ``mean``: its mean over the dataset's counted positions (Marks et al.),
* ``zero``: zero.

Non-ablated latents are re-encoded from the (possibly changed) site input; non-ablated errors keep
their clean values. With m the task metric averaged over prompts, M every node kept and
``empty`` every node ablated, a circuit C (its features F and error nodes E) is scored by

    faithfulness               = (m(C) - m(empty)) / (m(M) - m(empty))
    faithfulness_features_only = (m(F, every error ablated) - m(empty)) / (m(M) - m(empty))
    faithfulness_errors_only   = (m(every error kept, no feature) - m(empty)) / (m(M) - m(empty))
    ceiling                    = (m(every feature kept, every error ablated) - m(empty)) / (m(M) - m(empty))
    completeness               = (m(M) - m(M without C)) / (m(M) - m(empty))   # 1: removing C removes everything

The ceiling is the most any features-only circuit can reach with these dictionaries; the
errors-only figure is how much the dictionaries' error terms alone carry.

The same formulas hold for every metric. For ``kl`` (divergence from the clean distribution)
m(M) is 0 (up to rounding) and m(empty) > 0, so faithfulness = 1 - m(C) / m(empty): 1 when the
circuit reproduces the clean output distribution, 0 when it is as far from it as ablating
everything; completeness = m(M without C) / m(empty).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

from circuitgraph.attribution.nodeset import AblatedNodes, KeptNodes
from circuitgraph.attribution.runs import ABLATIONS, AblationKind, BatchRun, DatasetRuns, metric_of, run_batch
from circuitgraph.errors import CircuitGraphError
from circuitgraph.replacement.model import ReplacementModel, SpliceSpec
from circuitgraph.tasks.dataset import TaskDataset
from dictionaries.distributed import sum_float
from dictionaries.site import Site

log = logging.getLogger(__name__)

__all__ = ["AblationKind", "Ablator", "CircuitEvaluation", "evaluate_circuit", "faithfulness_ratio"]


def _offset_table(mask: torch.Tensor, width: int, n_needed: int, fill: bool) -> torch.Tensor:
    """``[max(n_offsets, n_needed), width]``: a per-offset mask padded with ``fill`` for offsets the
    node set does not cover (prompts longer than those it was selected on)."""
    table = mask.view(-1, width)
    if table.shape[0] < n_needed:
        pad = torch.full((n_needed - table.shape[0], width), fill, dtype=torch.bool)
        table = torch.cat([table, pad])
    return table


class Ablator:
    """Evaluates the metric with node sets ablated, on the cached runs of a dataset."""

    def __init__(self, rm: ReplacementModel, data: TaskDataset | DatasetRuns, kind: AblationKind = "patch",
                 batch_size: int = 32) -> None:
        if kind not in ABLATIONS:
            raise CircuitGraphError(f"unknown ablation {kind!r}; choose one of {', '.join(ABLATIONS)}")
        self.rm, self.kind = rm, kind
        self.runs = data if isinstance(data, DatasetRuns) else DatasetRuns(rm, data, batch_size)
        self.d_dicts = {s: d.cfg.d_dict for s, d in rm.dicts.items()}

    @property
    def n_batches(self) -> int:
        return len(self.runs.batches)

    def _ablate(self, b: BatchRun, x: torch.Tensor, base: torch.Tensor, mask: torch.Tensor | None,
                resolved: bool, width: int, fill: bool) -> torch.Tensor:
        """``x`` (``[B, P, width]`` latents, or errors with ``width`` 1) with the nodes of ``mask``
        replaced by ``base``: a ``[width]`` mask applies at every position, a resolved
        ``[n_offsets * width]`` one at each node's offset from the answer position only."""
        if mask is None:
            mask = torch.tensor([fill])
        if not resolved:
            if not bool(mask.any()):
                return x
            return torch.where(mask, base, x)
        table = _offset_table(mask, width, int(b.offset.max()) + 1, fill)
        per_pos = table[b.offset]  # [B, P, width]
        if not bool(per_pos.any()):
            return x
        return torch.where(per_pos, base, x)

    @torch.no_grad()
    def metric(self, nodes: KeptNodes | AblatedNodes) -> float:
        """Mean task metric with the nodes outside ``nodes`` (a :class:`KeptNodes`) or the nodes in
        ``nodes`` (an :class:`AblatedNodes`) ablated; one forward pass per batch."""
        if isinstance(nodes, KeptNodes):
            ablated, fill = nodes.ablated(), True  # offsets the circuit does not cover are not kept
        elif isinstance(nodes, AblatedNodes):
            ablated, fill = nodes, False
        else:
            raise CircuitGraphError(f"expected KeptNodes or AblatedNodes, got {type(nodes).__name__}")
        if ablated.resolved:
            self.runs.check_from_end()
        total = 0.0
        for b in self.runs.batches:
            base_lat, base_err = self.runs.baseline(self.kind, b)
            errors = {s: self._ablate(b, e, base_err[s], ablated.errors.get(s), ablated.resolved, 1, fill)
                      for s, e in b.clean_errors.items()}

            def edit(site: Site, lat: torch.Tensor, b: BatchRun = b, base_lat: dict = base_lat) -> torch.Tensor:
                return self._ablate(b, lat, base_lat[site], ablated.features.get(site), ablated.resolved,
                                    self.d_dicts[site], fill)

            logits = run_batch(self.rm, b.ds, SpliceSpec(errors=errors, edit_latents=edit)).logits
            total += float(metric_of(logits, b.ds).sum())
        return sum_float(total) / self.runs.n_prompts

    def full(self) -> float:
        """The metric with nothing ablated (the model itself)."""
        return self.metric(AblatedNodes.none(self.d_dicts))

    def empty(self) -> float:
        """The metric with every node ablated at every position."""
        return self.metric(AblatedNodes.every(self.d_dicts))


def faithfulness_ratio(metric: float, full: float, empty: float, unit: str = "node") -> float:
    """``(metric - empty) / (full - empty)``; a clear error when the span is (numerically) zero
    (``unit``: what the circuit is made of, for the message)."""
    span = full - empty
    if abs(span) < 1e-9:
        raise CircuitGraphError(f"the metric does not change when every {unit} is ablated; faithfulness is undefined "
                                "(try another ablation, e.g. --ablation mean)")
    return (metric - empty) / span


@dataclass
class CircuitEvaluation:
    """Every honest number of one circuit on one prompt set (see the module docstring)."""

    faithfulness: float
    faithfulness_features_only: float
    faithfulness_errors_only: float
    ceiling: float
    completeness: float
    n_feature_nodes: int
    n_error_nodes: int
    n_nodes: int
    """``n_feature_nodes + n_error_nodes``."""
    metric_full: float
    metric_empty: float
    metric_circuit: float
    metric_without_circuit: float
    n_prompts: int
    ablation: str

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_circuit(ablator: Ablator, circuit: KeptNodes) -> CircuitEvaluation:
    """Seven ablation runs over the ablator's prompts: full model, everything ablated, the circuit
    kept, the circuit removed, its features only, the errors only, and every feature (the ceiling)."""
    d = ablator.d_dicts
    every_error = AblatedNodes.every(d).without_errors()  # every feature ablated, every error kept
    full, empty = ablator.full(), ablator.empty()
    kept = ablator.metric(circuit)
    removed = ablator.metric(AblatedNodes(circuit.features, circuit.errors, circuit.resolved))
    features_only = ablator.metric(circuit.without_errors())
    errors_only = ablator.metric(every_error)
    ceiling = ablator.metric(KeptNodes.every(d).without_errors())

    def f(x: float) -> float:
        return faithfulness_ratio(x, full, empty)

    return CircuitEvaluation(
        faithfulness=f(kept), faithfulness_features_only=f(features_only), faithfulness_errors_only=f(errors_only),
        ceiling=f(ceiling), completeness=(full - removed) / (full - empty), n_feature_nodes=circuit.n_features(),
        n_error_nodes=circuit.n_errors(), n_nodes=circuit.n_nodes(), metric_full=full, metric_empty=empty,
        metric_circuit=kept, metric_without_circuit=removed, n_prompts=int(ablator.runs.n_prompts),
        ablation=ablator.kind)
