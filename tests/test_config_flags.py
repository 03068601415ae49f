"""CLI flags generated from (nested) config dataclasses: every setting reachable, one default each."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from circuitgraph.cli.config_flags import add_dataclass_flags, dataclass_from_flags
from circuitgraph.cli.main import main as cli
from dictionaries.config import CoderConfig, DictionaryConfig, flat_fields, from_flat, to_flat
from dictionaries.training import TrainConfig


def test_every_nested_setting_has_one_flat_name_and_round_trips():
    names = flat_fields(TrainConfig)
    for must in ("arch", "k", "aux_k", "jumprelu_bandwidth", "jumprelu_init_threshold", "batch_tokens",
                 "activation_cache", "interaction_penalty", "interaction_keys", "e2e_kl_coeff", "e2e_sequences", "seed"):
        assert must in names, must
    cfg = TrainConfig.of(k=7, aux_k=5, batch_tokens=512, tokens=2048, interaction_weighting="concentration",
                         e2e_sequences=2)
    assert (cfg.coder.k, cfg.coder.aux_k, cfg.store.batch_tokens, cfg.interaction.weighting, cfg.e2e.sequences) == \
        (7, 5, 512, "concentration", 2)
    assert from_flat(TrainConfig, to_flat(cfg)) == cfg
    with pytest.raises(ValueError, match="no setting bogus"):
        TrainConfig.of(bogus=1)


def test_dictionary_defaults_live_in_one_place():
    dict_defaults = {g.name: g.default for g in dataclasses.fields(DictionaryConfig)
                     if g.default is not dataclasses.MISSING}
    shared = [f for f in dataclasses.fields(CoderConfig) if f.name in dict_defaults]
    assert len(shared) >= 8
    for f in shared:  # a dictionary built without a setting gets what training would have used
        assert dict_defaults[f.name] == f.default, f.name


def test_parser_from_nested_config_sets_every_part():
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, TrainConfig)
    args = parser.parse_args(["--arch", "jumprelu", "--jumprelu-bandwidth", "0.1", "--aux-k", "9", "--tokens", "8k",
                              "--batch-tokens", "1024", "--interaction-penalty", "0.5", "--e2e-kl-coeff", "2"])
    cfg = dataclass_from_flags(TrainConfig, args)
    assert cfg.coder.arch == "jumprelu" and cfg.coder.jumprelu_bandwidth == 0.1 and cfg.coder.aux_k == 9
    assert cfg.tokens == 8000 and cfg.store.batch_tokens == 1024
    assert cfg.interaction.penalty == 0.5 and cfg.e2e.kl_coeff == 2.0
    assert dataclass_from_flags(TrainConfig, parser.parse_args([])) == TrainConfig()


def test_train_dictionaries_cli_reaches_aux_k_and_jumprelu_settings(tmp_path, capsys):
    out = tmp_path / "d"
    code = cli(["train-dictionaries", "--sites", "resid_post", "--layers", "1", "--arch", "jumprelu", "--expansion", "1",
                "--jumprelu-bandwidth", "0.2", "--jumprelu-init-threshold", "0.01", "--aux-k", "3", "--tokens", "2048",
                "--batch-tokens", "1024", "--chunk-sequences", "24", "--seq-len", "64", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "L1.resid_post" / "cfg.json").read_text())
    assert (saved["jumprelu_bandwidth"], saved["jumprelu_init_threshold"], saved["aux_k"]) == (0.2, 0.01, 3)
    assert json.loads((out / "train_config.json").read_text())["jumprelu_bandwidth"] == 0.2


def test_trace_flags_come_from_the_method_configs(tmp_path, capsys):
    from circuitgraph.attribution.circuit import CircuitConfig
    from circuitgraph.attribution.components import ComponentCircuitConfig
    from circuitgraph.attribution.linear import PROMPT_RENAME, LinearAttributionConfig
    from circuitgraph.cli.main import build_parser

    parser = build_parser()
    trace = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "trace")[1]
    flags = {s: a for a in trace._actions for s in a.option_strings}
    for cls, rename in ((CircuitConfig, {}), (ComponentCircuitConfig, {}), (LinearAttributionConfig, PROMPT_RENAME)):
        for name, (_, f, _) in flat_fields(cls).items():
            if name == "progress":
                continue
            action = flags["--" + rename.get(name, name).replace("_", "-")]
            default = f.default if f.default is not dataclasses.MISSING else None
            if default is not None and (cls is not ComponentCircuitConfig or name == "max_edges"):
                assert f"(default: {default})" in action.help, (cls.__name__, name)
    args = parser.parse_args(["trace", "--tau", "0.01", "--plain-acdc", "--max-edges", "7", "--out", "x"])
    assert args.acdc_tau == 0.01 and args.max_edges == 7  # --tau is the old spelling of --acdc-tau
    capsys.readouterr()
    assert cli(["trace", "--prompt", "When Mary and John went to the park, John gave a book to",
                "--max-feature-nodes", "5", "--out", str(tmp_path / "g")]) == 2
    assert "--prompt-max-feature-nodes" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["jumprelu_bandwidth", "jumprelu_init_threshold"])
def test_jumprelu_settings_must_be_positive(name):
    with pytest.raises(ValueError, match=f"{name}=0.0 must be a finite number > 0"):
        TrainConfig.of(**{name: 0.0})


def test_dicts_commands_take_committed_set_names(capsys):
    assert cli(["dicts", "mmcs", "default", "default", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out) == 8  # the committed default set: attn_z + transcoder at 4 layers, read by name
