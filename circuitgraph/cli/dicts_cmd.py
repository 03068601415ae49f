"""``circuitgraph train-dictionaries`` and ``circuitgraph dicts eval``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from circuitgraph.cli.config_flags import add_dataclass_flags, dataclass_from_flags, given_flags
from circuitgraph.models import resolve_model
from circuitgraph.toylang.corpus import TASK_RICH, CorpusConfig, ToyCorpus
from dictionaries import distributed
from dictionaries.errors import DictionaryError
from dictionaries.metrics import evaluate_dictionaries, mmcs
from dictionaries.persistence import check_against_model
from dictionaries.site import expand_sites
from dictionaries.token_sources import (
    ModelSampledTokens,
    TokenSource,
    hf_dataset_tokens,
    tensor_file_tokens,
    text_file_tokens,
)
from dictionaries.training import TrainConfig, train_dictionaries

log = logging.getLogger(__name__)
EVAL_SEED = 12345  # documents of the toy corpus no training run reads first


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-dictionaries", help="train sparse dictionaries at many sites from one model pass")
    p.add_argument("--model", default=None,
                   help="'default', a model folder, a llama2.c .bin, or a TransformerLens name (default: default)")
    p.add_argument("--sites", default=None,
                   help="comma-separated site kinds: resid_pre, resid_mid, resid_post, mlp_out, attn_z, mlp_post, "
                        f"transcoder (default: {TRAIN_DEFAULTS['sites']})")
    p.add_argument("--layers", default=None, help="'all', '0,2' or '1-3' (default: all)")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per site)")
    p.add_argument("--text", default=None, help="train on this UTF-8 text file instead of the default corpus")
    p.add_argument("--tokens-file", default=None, help="train on a safetensors file holding tokens [n_seq, seq_len]")
    p.add_argument("--hf-dataset", default=None,
                   help="train on a Hugging Face dataset, streamed: a hub name (online) or a local folder of data files")
    p.add_argument("--hf-split", default=None, help="split of --hf-dataset (default: train)")
    p.add_argument("--hf-column", default=None, help="text column of --hf-dataset (default: text)")
    p.add_argument("--hf-sequences", type=int, default=None,
                   help="sequences taken from the start of --hf-dataset (default: 20000)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="sequence length for --text, --hf-dataset and the toy corpus (default: 128; a --tokens-file "
                        "has its own)")
    p.add_argument("--corpus-mix", choices=("default", "task-rich"), default=None,
                   help="toy corpus only: the default mixture, or task sentences only with more repeated spans "
                        "(default: default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--activations", default=None,
                   help="train one dictionary on this safetensors file instead of a model's activations: 'activations' "
                        "[n, d_in], plus 'targets' [n, d_out] for a transcoder site (see docs/dictionaries.md)")
    p.add_argument("--site", default=None,
                   help="with --activations: the site id the dictionary is for (e.g. L3.resid_post, L3.transcoder); "
                        "default: the file's 'site' metadata")
    add_dataclass_flags(p, TrainConfig)
    p.set_defaults(func=run_train)

    d = sub.add_parser("dicts", help="evaluate trained dictionaries")
    dsub = d.add_subparsers(dest="dicts_command", required=True)
    ev = dsub.add_parser("eval", help="L0, FVU, dead fraction, CE loss recovered and KL per dictionary")
    ev.add_argument("--model", default="default")
    ev.add_argument("--dicts", required=True, help="folder written by train-dictionaries")
    ev.add_argument("--n-seq", type=int, default=64, help="evaluation sequences for FVU and the CE metrics")
    ev.add_argument("--density-seqs", type=int, default=2000,
                    help="sequences over which firing densities (dead / dense fractions) are counted")
    ev.add_argument("--text", default=None, help="evaluate on this text file instead of held-out toy-corpus text")
    ev.add_argument("--seq-len", type=int, default=128)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=run_eval)
    rp = sub.add_parser("report", help="HTML report of dictionaries: L0-FVU frontier, CE recovered, density histograms")
    rp.add_argument("--model", default="default")
    rp.add_argument("--dicts", default="", help="one or more dictionary folders, comma-separated (compared on the frontier)")
    rp.add_argument("--study", default=None,
                    help="results.jsonl of benchmarks/study_ceiling.py: add the ceiling study's table and chart")
    rp.add_argument("--out", default="report.html")
    rp.add_argument("--n-seq", type=int, default=32, help="evaluation sequences for FVU and the CE metrics")
    rp.add_argument("--density-seqs", type=int, default=500, help="sequences for firing densities")
    rp.add_argument("--text", default=None, help="evaluate on this text file instead of held-out toy-corpus text")
    rp.add_argument("--seq-len", type=int, default=128)
    rp.add_argument("--device", default="cpu")
    rp.set_defaults(func=run_report)
    pr = dsub.add_parser("prune", help="remove latents that never fire on the training stream")
    pr.add_argument("--model", default="default")
    pr.add_argument("--dicts", required=True, help="folder written by train-dictionaries")
    pr.add_argument("--out", required=True, help="output folder (may not be --dicts)")
    pr.add_argument("--seqs", type=int, default=4000,
                    help="sequences of the training stream (the toy corpus at the training seed, or --text) to count firing on")
    pr.add_argument("--text", default=None, help="count on this text file instead of the training stream")
    pr.add_argument("--seq-len", type=int, default=128)
    pr.add_argument("--device", default="cpu")
    pr.set_defaults(func=run_prune)
    ex = dsub.add_parser("export", help="write dictionaries in another library's format")
    ex.add_argument("--dicts", required=True, help="folder written by train-dictionaries")
    ex.add_argument("--to", choices=("circuit-tracer", "saelens"), required=True,
                    help="circuit-tracer: the folder's cross-layer transcoder (clt sites) as W_enc_i / W_dec_i files, "
                         "or its per-layer transcoders (transcoder sites) as a transcoder set (layer_i files); "
                         "saelens: one SAELens SAE / transcoder folder per site (cfg.json + sae_weights.safetensors)")
    ex.add_argument("--out", required=True, help="output folder")
    ex.set_defaults(func=run_export)
    mm = dsub.add_parser("mmcs", help="mean max cosine similarity between the decoders of two dictionary sets")
    mm.add_argument("a", help="first dictionary folder (e.g. seed 0)")
    mm.add_argument("b", help="second dictionary folder (e.g. seed 1 or another width)")
    mm.add_argument("--json", action="store_true")
    mm.set_defaults(func=run_mmcs)


def _load_dicts(spec: str, device: str = "cpu"):
    """``--dicts``: a committed set name (default, v1, sparse_interaction) or any folder / file / hf: reference."""
    from circuitgraph.api import load_dictionaries as load_named

    return load_named(spec, device=device)


def token_source(args: argparse.Namespace, model, seed: int) -> TokenSource:
    """The training/evaluation token source named by the flags."""
    try:
        if getattr(args, "tokens_file", None):
            return tensor_file_tokens(args.tokens_file)
        if args.text:
            return text_file_tokens(args.text, model, seq_len=args.seq_len)
        if getattr(args, "hf_dataset", None):
            return hf_dataset_tokens(args.hf_dataset, model, seq_len=args.seq_len, n_sequences=args.hf_sequences,
                                     split=args.hf_split, column=args.hf_column)
    except ValueError as err:
        raise DictionaryError(str(err)) from err
    if model.cfg.model_name != "circuitgraph-toy":
        log.info("no --text given: sampling text from %s itself (seed %d)", model.cfg.model_name, seed)
        return ModelSampledTokens(model, seq_len=args.seq_len, seed=seed)
    if getattr(args, "corpus_mix", "default") == "task-rich":
        return ToyCorpus(dataclasses.replace(TASK_RICH, seed=seed, seq_len=args.seq_len))
    return ToyCorpus(CorpusConfig(seed=seed, seq_len=args.seq_len))


TRAIN_DEFAULTS = {"model": "default", "sites": "resid_post,mlp_out,attn_z,transcoder", "layers": "all", "seq_len": 128,
                  "corpus_mix": "default", "hf_split": "train", "hf_column": "text", "hf_sequences": 20_000}
"""train-dictionaries flags whose unset value is ``None`` (so that flags a mode ignores can be refused)."""



def run_train(args: argparse.Namespace) -> int:
    from circuitgraph.graph.storage import check_writable

    check_writable(args.out)  # before any work: a bad --out must not cost a whole training run
    if args.activations or args.site:
        return _train_from_file(args)
    if not args.hf_dataset and given_flags(args, ("hf_split", "hf_column", "hf_sequences")):
        raise DictionaryError(f"{', '.join(given_flags(args, ('hf_split', 'hf_column', 'hf_sequences')))} read --hf-dataset, "
                              "which is not given; add it or drop them")
    if args.tokens_file:
        ignored = given_flags(args, ("seq_len", "corpus_mix", "text", "hf_dataset"))
        if ignored:
            raise DictionaryError(f"--tokens-file gives the token sequences (and their length); drop {', '.join(ignored)}")
    elif args.corpus_mix is not None and (args.text or args.hf_dataset):
        raise DictionaryError("--corpus-mix chooses the toy corpus; --text / --hf-dataset replace it: drop --corpus-mix")
    for name, value in TRAIN_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    model = resolve_model(args.model, device=args.device)
    if args.tokens_file:
        length = _check_tokens_file(args.tokens_file, model.cfg.d_vocab)
        if not 2 <= length <= model.cfg.n_ctx:
            raise DictionaryError(f"{args.tokens_file} holds sequences of {length} tokens; the model's context is "
                                  f"{model.cfg.n_ctx} (use 2 to {model.cfg.n_ctx})")
    elif not 2 <= args.seq_len <= model.cfg.n_ctx:
        raise DictionaryError(f"--seq-len {args.seq_len}: use 2 to {model.cfg.n_ctx} (the model's context)")
    try:
        sites = expand_sites(args.sites, args.layers, model.cfg.n_layers)
        if getattr(args, "transcoder_skip", None) and not any(site.kind == "transcoder" for site in sites):
            raise ValueError("--transcoder-skip adds a skip connection to transcoders, and no transcoder site is "
                             "trained; add transcoder to --sites or drop --transcoder-skip")
        cfg = dataclass_from_flags(TrainConfig, args)
        for site in sites:  # every dictionary's settings, checked before the first step
            cfg.dictionary_config(site, *site.widths(model.cfg), model.cfg.model_name)
    except ValueError as err:
        raise DictionaryError(str(err)) from err
    source = token_source(args, model, seed=cfg.seed + 1)
    distributed.maybe_init(args.device)  # under torchrun: join the process group (gloo on CPU)
    result = train_dictionaries(model, sites, source, cfg, args.out)
    if not distributed.is_main():
        return 0
    print(json.dumps({"dictionaries": len(result.dictionaries), "seconds": round(result.seconds, 1),
                      "tokens_per_dictionary": result.tokens, "out": args.out}))
    return 0


def _check_tokens_file(path: str, d_vocab: int) -> int:
    """The sequence length of a --tokens-file (its ``tokens`` tensor's second dimension), after
    checking it holds integer ids of the model's vocabulary."""
    try:
        tokens = tensor_file_tokens(path).tokens
    except ValueError as err:
        raise DictionaryError(str(err)) from err
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise DictionaryError(f"{path}: 'tokens' must be a non-empty [n_seq, seq_len] tensor, got shape "
                              f"{tuple(tokens.shape)}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= d_vocab:
        raise DictionaryError(f"{path}: token ids range over {lo}..{hi}, but the model's vocabulary is 0..{d_vocab - 1}; "
                              "the tokens belong to another tokenizer")
    return int(tokens.shape[1])


def _train_from_file(args: argparse.Namespace) -> int:
    """train-dictionaries --activations FILE: one dictionary, no model."""
    from dictionaries.activation_file import read_activation_file, train_on_activations

    if not args.activations:
        raise DictionaryError("--site names the site of an --activations file; a model run takes --sites and --layers")
    model_only = ("chunk_sequences", "model_batch", "activation_cache", "interaction_penalty", "interaction_warmup_frac",
                  "interaction_pairs", "interaction_weighting", "interaction_sequences", "interaction_keys",
                  "e2e_kl_coeff", "e2e_sequences", "hf_split", "hf_column", "hf_sequences")
    clash = given_flags(args, ("model", "sites", "layers", "text", "tokens_file", "hf_dataset", "seq_len", "corpus_mix",
                          *model_only))
    if clash:
        raise DictionaryError(f"--activations trains on the file alone, without a model or text (its site: --site); "
                              f"drop {', '.join(clash)}")
    try:
        cfg = dataclass_from_flags(TrainConfig, args)
    except ValueError as err:
        raise DictionaryError(str(err)) from err
    acts = read_activation_file(args.activations, site=args.site or "")
    result = train_on_activations(acts, cfg, args.out, device=args.device)
    print(json.dumps({"dictionaries": 1, "site": acts.site.id, "seconds": round(result.seconds, 1),
                      "tokens_per_dictionary": result.tokens, "out": args.out}))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    model = resolve_model(args.model, device=args.device)
    _check_eval_sizes(args, model)
    dicts = _load_dicts(args.dicts, device=args.device)
    check_against_model(dicts, model.cfg)
    source = token_source(args, model, seed=EVAL_SEED)
    tokens = source.sequences(0, args.n_seq)
    density_tokens = source.sequences(args.n_seq, args.density_seqs) if args.density_seqs > 0 else None
    metrics = evaluate_dictionaries(model, dicts, tokens, density_tokens=density_tokens)
    out = {site.id: m.summary() for site, m in sorted(metrics.items())}
    if args.json:
        print(json.dumps(out))
    else:
        for sid, m in out.items():
            print(f"{sid:18s} L0={m['l0']:6.1f} FVU={m['fvu']:.3f} dead={m['dead_frac']:.3f} "
                  f"CE_rec={m['ce_recovered']:.3f} KL={m['kl']:.4f}")
    return 0


def _check_eval_sizes(args: argparse.Namespace, model) -> None:
    """--n-seq, --density-seqs and --seq-len, refused before any work."""
    if args.n_seq <= 0:
        raise DictionaryError(f"--n-seq {args.n_seq}: evaluate on at least one sequence")
    if args.density_seqs < 0:
        raise DictionaryError(f"--density-seqs {args.density_seqs}: use 0 (skip densities) or more")
    if not 2 <= args.seq_len <= model.cfg.n_ctx:
        raise DictionaryError(f"--seq-len {args.seq_len}: use 2 to {model.cfg.n_ctx} (the model's context)")


def run_report(args: argparse.Namespace) -> int:
    from circuitgraph.graph.storage import check_writable
    from circuitgraph.viewer.report import render_report

    check_writable(args.out, is_file=True)
    if not args.dicts and not args.study:
        raise DictionaryError("nothing to report: pass --dicts FOLDER[,FOLDER] and/or --study results.jsonl")
    study = _read_study(args.study) if args.study else None
    model = resolve_model(args.model, device=args.device)
    _check_eval_sizes(args, model)
    source = token_source(args, model, seed=EVAL_SEED)
    tokens = source.sequences(0, args.n_seq)
    density_tokens = source.sequences(args.n_seq, args.density_seqs) if args.density_seqs > 0 else None
    sets = {}
    for folder in [f for f in args.dicts.split(",") if f]:
        dicts = _load_dicts(folder, device=args.device)
        check_against_model(dicts, model.cfg)
        sets[folder] = evaluate_dictionaries(model, dicts, tokens, density_tokens=density_tokens)
    Path(args.out).write_text(render_report(sets, f"dictionaries of {args.model}", study=study), encoding="utf-8")
    print(args.out)
    return 0


def _read_study(path: str) -> list[dict]:
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DictionaryError(f"cannot read --study {path}: {err.strerror}") from err
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            row["tasks"]  # noqa: B018 - a study row has per-task results
        except (ValueError, KeyError, TypeError) as err:
            raise DictionaryError(f"--study {path} line {i} is not a ceiling-study result row; pass the results.jsonl "
                                  "that benchmarks/study_ceiling.py writes") from err
        rows.append(row)
    if not rows:
        raise DictionaryError(f"--study {path} holds no results yet")
    return rows


def run_prune(args: argparse.Namespace) -> int:
    from circuitgraph.graph.storage import check_distinct, check_writable
    from dictionaries.metrics import firing_density
    from dictionaries.persistence import save_dictionaries
    from dictionaries.prune import prune_latents

    check_writable(args.out)
    check_distinct(args.out, args.dicts)
    if args.seqs <= 0:
        raise DictionaryError(f"--seqs {args.seqs}: count firing on at least one sequence")
    model = resolve_model(args.model, device=args.device)
    dicts = _load_dicts(args.dicts, device=args.device)
    check_against_model(dicts, model.cfg)
    train_cfg = Path(args.dicts) / "train_config.json"
    seed = json.loads(train_cfg.read_text()).get("seed", 0) if train_cfg.is_file() else 0
    tokens = token_source(args, model, seed=seed + 1).sequences(0, args.seqs)  # what training read first
    density = firing_density(model, dicts, tokens)
    pruned = {s: prune_latents(d, density[s] > 0) for s, d in dicts.items()}
    save_dictionaries(pruned, args.out)
    if train_cfg.is_file():
        (Path(args.out) / "train_config.json").write_text(train_cfg.read_text())
    n_tok = tokens.numel() - tokens.shape[0]
    print(json.dumps({"out": args.out, "tokens_counted": n_tok, "latents": {
        s.id: {"before": dicts[s].cfg.d_dict, "after": pruned[s].cfg.d_dict} for s in sorted(dicts)}}))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from circuitgraph.graph.storage import check_distinct, check_writable
    from dictionaries.circuit_tracer_format import save_clt_circuit_tracer
    from dictionaries.circuit_tracer_transcoders import save_transcoders_circuit_tracer

    check_writable(args.out)
    check_distinct(args.out, args.dicts)
    dicts = _load_dicts(args.dicts)
    if args.to == "saelens":
        from dictionaries.saelens_format import save_saelens_set

        folder = save_saelens_set(dicts, args.out)
        print(json.dumps({"out": str(folder), "format": args.to, "sites": [s.id for s in sorted(dicts)]}))
        return 0
    kinds = {s.kind for s in dicts} & {"clt", "transcoder"}
    if len(kinds) == 2:
        raise DictionaryError(f"{args.dicts} holds both cross-layer (clt) and per-layer transcoders; circuit-tracer "
                              "reads one set at a time: export a folder holding only one kind")
    if not kinds:
        raise DictionaryError(f"{args.dicts} holds no transcoders to export (sites {', '.join(s.id for s in sorted(dicts))}); "
                              "circuit-tracer reads cross-layer (clt) or per-layer (transcoder) transcoders")
    if kinds == {"transcoder"}:
        folder, kind = save_transcoders_circuit_tracer(dicts, args.out), "transcoder_set"
    else:
        folder, kind = save_clt_circuit_tracer(dicts, args.out), "cross_layer_transcoder"
    print(json.dumps({"out": str(folder), "format": args.to, "model_kind": kind,
                      "layers": sum(1 for s in dicts if s.kind in kinds)}))
    return 0


def run_mmcs(args: argparse.Namespace) -> int:
    a, b = _load_dicts(args.a), _load_dicts(args.b)
    common = sorted(set(a) & set(b))
    if not common:
        raise DictionaryError(f"{args.a} and {args.b} share no site; MMCS compares dictionaries of the same site")
    out = {s.id: round(mmcs(a[s].decoder_directions().detach(), b[s].decoder_directions().detach()), 4) for s in common}
    print(json.dumps(out) if args.json else "\n".join(f"{k:18s} MMCS={v:.4f}" for k, v in out.items()))
    return 0
