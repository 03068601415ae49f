"""The Python API, one call per step: ``import circuitgraph as cg``.

    model = cg.load_model("default")                        # or a folder, a llama2.c .bin, a HF folder
    dicts = cg.load_dictionaries("default", model=model)    # or ours / SAELens / sparsify / circuit-tracer / hf:...
    data = cg.PromptDataset.from_file("my.jsonl", model)    # or .from_records([...]) / .from_task("ioi")
    select, held_out = data.split(n_eval=32)
    graph = cg.trace(model, dicts, select, eval_data=held_out, max_nodes=200)
    graph.upstream("metric:logit_diff", top_k=5)            # typed rows: node, weight, activation, label
    cg.view(graph, "circuit.html")
    cg.export(graph, "circuit.json", format="node-link")

``cg.trace`` of a text builds the direct-effect attribution graph of that one prompt (optionally
explaining ``answer`` or ``answer - contrast``); of a dataset, a circuit selected on it and
evaluated on ``eval_data``. Its keyword settings are the fields of the config dataclass of the
method (:class:`~circuitgraph.attribution.linear.LinearAttributionConfig`,
:class:`~circuitgraph.attribution.circuit.CircuitConfig`,
:class:`~circuitgraph.attribution.components.ComponentCircuitConfig`): the CLI builds its flags
from the same dataclasses, so every default lives in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer

from circuitgraph.attribution.targets import MetricTarget
from circuitgraph.errors import CircuitGraphError
from circuitgraph.graph.graph import Graph
from circuitgraph.replacement.model import ReplacementModel
from circuitgraph.tasks.dataset import Metric, TaskDataset
from circuitgraph.tasks.prompts import PromptDataset
from dictionaries.architectures.base import SparseDictionary
from dictionaries.config import flat_fields, from_flat
from dictionaries.site import Site, expand_sites

log = logging.getLogger(__name__)

COMMITTED_SETS = ("default", "v1", "sparse_interaction")
"""Dictionary sets shipped with the package, for the embedded default model."""


def load_model(spec: str = "default", device: str = "cpu") -> HookedTransformer:
    """The model named by ``spec``: ``default`` (embedded), a folder (ours or a Hugging Face one),
    a llama2.c ``.bin``, or a TransformerLens name (needs internet)."""
    from circuitgraph.models.loading import resolve_model

    return resolve_model(spec, device=device)


def _committed_dir(name: str) -> Path:
    from circuitgraph.models import loading

    return {"default": loading.DEFAULT_DICTS_DIR, "v1": loading.V1_DICTS_DIR,
            "sparse_interaction": loading.SPARSE_INTERACTION_DICTS_DIR}[name]


def load_dictionaries(spec: str | Path = "default", model: HookedTransformer | None = None,
                      device: str = "cpu") -> dict[Site, SparseDictionary]:
    """``{Site: dictionary}`` from a committed set (``default``, ``v1``, ``sparse_interaction``:
    for the embedded model), a folder in any format ``--dicts`` reads, or ``hf:ORG/REPO[/PATH]``.
    With ``model``, every dictionary is checked to fit it (widths, layers, model name)."""
    from dictionaries.errors import DictionaryError
    from dictionaries.persistence import check_against_model
    from dictionaries.persistence import load_dictionaries as load_any

    path = _committed_dir(str(spec)) if str(spec) in COMMITTED_SETS else spec
    dicts = load_any(path, device=device)
    if model is not None:
        try:
            check_against_model(dicts, model.cfg)
        except DictionaryError as err:
            raise CircuitGraphError(f"{spec}: {err}") from err
    return dicts


def replacement_model(model: HookedTransformer, dicts: Mapping[Site, SparseDictionary], sites: str | None = None,
                      layers: str = "all", source: str = "the dictionary set") -> ReplacementModel:
    """``model`` with the dictionaries of ``dicts`` spliced in. ``sites``: the site kinds to splice
    (``attn_z,transcoder``; default every kind in ``dicts``, which must then hold one dictionary per
    output hook); ``layers``: ``all``, ``0,2`` or ``1-3``."""
    n_layers = model.cfg.n_layers
    beyond = sorted(s.id for s in dicts if s.layer >= n_layers)
    if beyond:
        raise CircuitGraphError(f"{source} has dictionaries for layers the model does not have ({', '.join(beyond)}; "
                                f"the model has {n_layers} layers, 0..{n_layers - 1}): were they trained on another "
                                "model? Pass the model they were trained on (--model)")
    kinds = sites or ",".join(sorted({s.kind for s in dicts}))
    try:
        wanted = set(expand_sites(kinds, layers, model.cfg.n_layers))
    except ValueError as err:
        raise CircuitGraphError(str(err)) from err
    if sites is None:
        wanted &= set(dicts)
        by_output: dict[str, list[str]] = {}
        for s in wanted:
            by_output.setdefault(s.output_hook, []).append(s.id)
        clash = sorted(v for v in by_output.values() if len(v) > 1)
        if clash:
            raise CircuitGraphError(f"{source} holds several dictionaries for one output ({', '.join(sorted(clash[0]))}); "
                                    "choose the site kinds to splice, e.g. sites='attn_z,transcoder' (CLI: --sites)")
    missing = sorted(s.id for s in wanted - set(dicts))
    if missing:
        raise CircuitGraphError(f"{source} has no dictionaries for {', '.join(missing)}; train them or change the "
                                "sites / layers")
    return ReplacementModel(model, {s: d for s, d in dicts.items() if s in wanted})


def answer_target(model: HookedTransformer, answer: str | None, contrast: str | None = None) -> MetricTarget | None:
    """What a prompt graph explains: ``answer``'s logit (mean-centred over the vocabulary, like the
    logit nodes), ``answer - contrast``'s logit difference, or ``None`` (the likeliest next tokens).
    Each must be one token of the vocabulary."""
    from circuitgraph.tasks.dataset import single_token_id

    if answer is None:
        if contrast is not None:
            raise CircuitGraphError("a contrast needs an answer (the token whose logit it is subtracted from)")
        return None
    a = single_token_id(model, answer)
    if contrast is None:
        c = torch.full((model.cfg.d_vocab,), -1.0 / model.cfg.d_vocab)
        c[a] += 1.0
        return MetricTarget("answer_logit", c)
    b = single_token_id(model, contrast)
    if a == b:
        raise CircuitGraphError(f"answer and contrast are the same token ({answer!r}); the difference is 0")
    return MetricTarget.logit_diff([a], [b], model.cfg.d_vocab)


def _config(cls: type, settings: dict[str, Any], what: str, config: Any = None) -> Any:
    """``config`` (checked to be a ``cls``) or ``cls`` built from flat ``settings``."""
    if config is not None:
        if settings:
            raise CircuitGraphError(f"give {what} either config= or settings ({', '.join(sorted(settings))}), not both")
        if not isinstance(config, cls):
            raise CircuitGraphError(f"{what} takes a {cls.__name__} as config, got {type(config).__name__}")
        return config
    names = flat_fields(cls)
    if cls.__name__ == "LinearAttributionConfig":  # the CLI's flag names of the two settings datasets share
        from circuitgraph.attribution.linear import PROMPT_RENAME

        for name, flag in PROMPT_RENAME.items():
            if flag in settings:
                if name in settings:
                    raise CircuitGraphError(f"give {name} or {flag}, not both (the same setting)")
                settings = dict(settings)
                settings[name] = settings.pop(flag)
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise CircuitGraphError(f"{what} has no setting {', '.join(unknown)}; its settings are {', '.join(sorted(names))}")
    try:
        return from_flat(cls, settings)
    except ValueError as err:
        raise CircuitGraphError(f"{what}: {err}") from err


def prompt_tokens(model: HookedTransformer, prompt: str) -> torch.Tensor:
    """``[1, P]`` tokens of one prompt (BOS first), with unknown words and tokenizer-less models refused."""
    from circuitgraph.tasks.dataset import check_in_vocabulary, encode

    if not isinstance(prompt, str) or not prompt.strip():
        raise CircuitGraphError(f"the prompt must be non-empty text, got {prompt!r}")
    if model.tokenizer is None:
        raise CircuitGraphError("this model has no tokenizer, so a text prompt cannot be tokenised; put a "
                                "tokenizer.json beside its weights or pass token ids (a [1, P] tensor) instead")
    tokens = encode(model, prompt, "the prompt")
    check_in_vocabulary(model, prompt, "the prompt", tokens)
    return torch.tensor([tokens])


def trace(model: HookedTransformer | ReplacementModel | str, dicts: Mapping[Site, SparseDictionary] | str | None,
          data: str | torch.Tensor | PromptDataset | TaskDataset, *, eval_data: PromptDataset | TaskDataset | None = None,
          answer: str | None = None, contrast: str | None = None, sites: str | None = None,
          granularity: str = "features", metric: Metric | None = None, config: Any = None, qk: Any = False,
          **settings: Any) -> Graph:
    """An attribution graph or circuit.

    Args:
        model: the model, or a :class:`ReplacementModel` (then ``dicts`` is ignored), or a name /
            folder :func:`load_model` takes.
        dicts: ``{Site: dictionary}``, a folder / committed set name for :func:`load_dictionaries`,
            or ``None`` (the committed default set; embedded model only).
        data: a prompt (text, or ``[1, P]`` token ids) for a prompt graph; a dataset for a circuit.
        eval_data: held-out prompts the circuit is evaluated on (datasets only).
        answer, contrast: prompt graphs only: explain this token's logit, or the difference.
        sites: site kinds to splice (default: every kind in ``dicts``).
        granularity: ``features`` (dictionary features) or ``components`` (heads and MLPs; no dictionaries).
        metric: datasets only: what the circuit explains, instead of the dataset's own metric:
            ``logit_diff``, ``logprob``, ``prob_diff``, ``kl`` or a callable
            ``fn(logits [n, seq, vocab], batch) -> [n]`` (docs/datasets.md).
        config: a ready config of the method (instead of ``settings``).
        qk: prompt graphs only: ``True`` (or a :class:`~circuitgraph.attribution.prompt.qk_attach.QKAttachConfig`)
            attaches head loadings and QK pairs (``metadata["qk"]``; :meth:`Graph.head_loadings`,
            :meth:`Graph.why_attends`) for the edges of the graph pruned as :func:`prune` prunes.
        **settings: fields of the method's config (see the module docstring), e.g. ``method="acdc"``,
            ``max_nodes=100``, ``ablation="mean"``, ``max_feature_nodes=500``; nested fields by their
            flat names (``acdc_tau=0.01``).

    Returns:
        The :class:`Graph`; for a dataset its ``metadata`` holds the held-out numbers
        (``faithfulness``, ``faithfulness_features_only``, ``ceiling``, ...). Prompt graphs are
        returned whole: prune them with :func:`prune`; their ``metadata["outputs"]`` holds the
        model's likeliest next tokens (and answer / contrast) with probabilities and logits.
    """
    if granularity not in ("features", "components"):
        raise CircuitGraphError(f"granularity must be 'features' or 'components', got {granularity!r}")
    if isinstance(model, (str, Path)):  # a name or folder, as load_model takes
        model = load_model(str(model))
    elif not isinstance(model, (HookedTransformer, ReplacementModel)):
        raise CircuitGraphError(f"model must be a HookedTransformer, a ReplacementModel or a name / folder for "
                                f"load_model, got {type(model).__name__}")
    if not isinstance(qk, bool) and type(qk).__name__ != "QKAttachConfig":
        raise CircuitGraphError(f"qk must be True, False or a QKAttachConfig, got {qk!r}")
    if not isinstance(data, (str, torch.Tensor, PromptDataset, TaskDataset)):
        hint = " (for a list of rows: cg.PromptDataset.from_records(rows, model))" if isinstance(data, list) else ""
        raise CircuitGraphError(f"data must be a prompt (text, or [1, P] token ids) or a PromptDataset, got "
                                f"{type(data).__name__}{hint}")
    if qk and (granularity == "components" or not isinstance(data, (str, torch.Tensor))):
        raise CircuitGraphError("qk= attaches head loadings to a prompt graph of features; a dataset circuit has "
                                "none (see circuitgraph qk --task / --dataset for QK terms over a dataset)")
    if isinstance(data, PromptDataset):
        data, has_corrupted = data.data, data.has_corrupted
    else:
        has_corrupted = True
    if isinstance(eval_data, PromptDataset):
        eval_data = eval_data.data
    base = model.model if isinstance(model, ReplacementModel) else model
    if granularity == "components":
        if not isinstance(data, TaskDataset):
            raise CircuitGraphError("component circuits are built over a prompt dataset, not one prompt")
        from circuitgraph.attribution.components import ComponentCircuitConfig, trace_components

        if config is None:
            settings.setdefault("ablation", "patch" if has_corrupted else "mean")
        cfg = _config(ComponentCircuitConfig, settings, "a component circuit", config)
        _check_ablation(cfg.ablation, has_corrupted)
        graph, meta = trace_components(base, data, cfg, eval_data, metric=metric)
        graph.metadata.update(meta)
        return graph
    if isinstance(model, ReplacementModel):
        rm = model
    else:
        if dicts is None or isinstance(dicts, (str, Path)):
            dicts = load_dictionaries(dicts or "default", model=model)
        rm = replacement_model(model, dicts, sites)
    if isinstance(data, (str, torch.Tensor)):
        from circuitgraph.attribution.linear import LinearAttributionConfig, attribute_prompt

        if eval_data is not None:
            raise CircuitGraphError("eval_data evaluates a dataset circuit; a prompt graph has none")
        if metric is not None:
            raise CircuitGraphError("a prompt graph explains answer / contrast (or the likeliest logits); metric= "
                                    "applies to datasets")
        from circuitgraph.viewer.outputs import prompt_outputs

        tokens = prompt_tokens(base, data) if isinstance(data, str) else data
        if qk:
            from circuitgraph.attribution.prompt.qk_attach import require_attention_sites

            require_attention_sites(rm)  # before the build
        graph = attribute_prompt(rm, tokens, _config(LinearAttributionConfig, settings, "a prompt graph", config),
                                 metric=answer_target(base, answer, contrast))
        graph.metadata["outputs"] = prompt_outputs(base, tokens, answer, contrast,
                                                   [n.index for n in graph.nodes if n.kind == "logit"])
        if qk:
            from circuitgraph.attribution.prompt.qk_attach import QKAttachConfig, attach_qk

            attach_qk(prune(graph), rm, tokens, qk if isinstance(qk, QKAttachConfig) else QKAttachConfig(), also=graph)
        return graph
    if answer is not None or contrast is not None:
        raise CircuitGraphError("answer / contrast choose what a prompt graph explains; a dataset has its own answers")
    if config is None:
        settings.setdefault("ablation", "patch" if has_corrupted else "mean")
    from circuitgraph.attribution.circuit import CircuitConfig, trace_dataset

    cfg = _config(CircuitConfig, settings, "a dataset circuit", config)
    _check_ablation(cfg.ablation, has_corrupted)
    return trace_dataset(rm, data, cfg, eval_data, metric=metric).graph


def _check_ablation(ablation: str, has_corrupted: bool) -> None:
    if ablation == "patch" and not has_corrupted:
        raise CircuitGraphError("patch ablation needs corrupted prompts, and this dataset has none; use "
                                "ablation='mean' or 'zero', or add a corrupted_prompt to every row")


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Graph:
    """A prompt graph pruned by influence on its outputs: features up to ``node_threshold`` of the
    cumulative influence, then edges up to ``edge_threshold``."""
    from circuitgraph.graph.pruning import prune_graph

    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0 < value <= 1:  # NaN fails this too
            raise CircuitGraphError(f"{name} {value}: use a fraction in (0, 1]")
    return prune_graph(graph, node_threshold, edge_threshold)


def view(graph: Graph | str | Path, path: str | Path = "circuit.html", max_nodes: int | None = None,
         open_browser: bool = False, max_edges: int = 500) -> Path:
    """Write the offline HTML viewer of ``graph`` (a :class:`Graph` or a saved graph folder; a prompt
    trace's folder shows its unpruned ``full/`` graph) to ``path``. The page opens on the graph pruned
    at circuit-tracer's thresholds with at most ``max_edges`` edges; ``max_nodes`` caps the features
    of every view."""
    from circuitgraph.viewer.html import load_for_view, to_html

    g = graph if isinstance(graph, Graph) else load_for_view(graph)
    out = to_html(g, path, max_nodes=max_nodes, max_edges=max_edges)
    if open_browser:
        import webbrowser

        webbrowser.open(out.resolve().as_uri())
    return out


def export(graph: Graph | str | Path, path: str | Path, format: str = "node-link") -> Path:
    """Write ``graph`` for other tools: ``node-link`` (networkx JSON), ``graphml`` or
    ``circuit-tracer`` (its attribution-graph JSON schema)."""
    from circuitgraph.viewer.export import export_graph

    if format not in ("node-link", "graphml", "circuit-tracer"):
        raise CircuitGraphError(f"unknown export format {format!r}; choose node-link, graphml or circuit-tracer")
    g = graph if isinstance(graph, Graph) else Graph.load(graph)
    return export_graph(g, path, format)  # type: ignore[arg-type]
