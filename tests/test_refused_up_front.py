"""Bad numbers and bad output locations are refused before any work, with one line and exit code 2."""

from __future__ import annotations

import time

import pytest
import torch

from circuitgraph.cli.main import main

TRAIN = ["train-dictionaries", "--sites", "resid_post", "--layers", "0", "--tokens", "8192"]
TRACE = ["trace", "--task", "ioi", "--n", "4", "--eval-n", "4", "--describe-seqs", "0"]


@pytest.mark.parametrize("argv,message", [
    ([*TRAIN, "--checkpoint-every", "0"], "checkpoint_every=0 must be at least 1"),
    ([*TRAIN, "--seq-len", "100000"], "--seq-len 100000: use 2 to 128"),
    ([*TRAIN, "--k", "5000"], "k=5000 must be between 1 and d_dict"),
    ([*TRAIN, "--k", "0"], "k=0 must be at least 1"),
    ([*TRAIN, "--expansion", "0"], "expansion=0 must be at least 1"),
    ([*TRAIN, "--lr", "nan"], "lr=nan must be a finite number"),
    ([*TRAIN, "--lr", "-1"], "lr=-1.0 must be positive"),
    ([*TRAIN, "--batch-tokens", "0"], "batch_tokens=0 must be at least 1"),
    ([*TRACE, "--batch-size", "0"], "batch_size must be at least 1"),
    ([*TRACE, "--ig-steps", "0", "--method", "ig"], "ig_steps and batch_size must be at least 1"),
    ([*TRACE, "--granularity", "components", "--method", "ig", "--ig-steps", "0"], "must be at least 1"),
    ([*TRACE, "--method", "acdc", "--tau", "nan"], "tau must be a positive finite number"),
])
def test_bad_numbers(tmp_path, capsys, argv, message):
    start = time.perf_counter()
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert time.perf_counter() - start < 10  # refused before training / tracing
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [TRAIN, TRACE])
def test_output_under_a_file_is_refused_first(tmp_path, capsys, argv):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    assert main([*argv, "--out", str(blocker / "out")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert blocker.read_text() == "keep me"


def test_dictionary_folder_must_match_its_cfg_and_model(tmp_path, default_model, v1_dicts):
    import dataclasses

    from dictionaries.errors import DictionaryError
    from dictionaries.persistence import check_against_model, load_dictionaries, save_dictionary
    from dictionaries.site import Site

    d1 = v1_dicts[Site(1, "resid_post")]
    save_dictionary(d1, tmp_path / "wrong" / "L0.resid_post")  # layer-1 files in a layer-0 folder
    with pytest.raises(DictionaryError, match="trained for L1.resid_post, not L0.resid_post"):
        load_dictionaries(tmp_path / "wrong")
    other = type(d1)(dataclasses.replace(d1.cfg, model_name="gpt2"))
    with pytest.raises(DictionaryError, match="trained on model 'gpt2', not 'circuitgraph-toy'"):
        check_against_model({Site(1, "resid_post"): other}, default_model.cfg)
    nan = type(d1)(d1.cfg)
    nan.load_state_dict(d1.state_dict())
    with torch.no_grad():
        nan.W_dec[0, 0] = float("nan")
    save_dictionary(nan, tmp_path / "nan" / "L1.resid_post")
    with pytest.raises(DictionaryError, match="NaN or infinite values in \\['W_dec'\\]"):
        load_dictionaries(tmp_path / "nan")


def test_killed_writes_leave_no_lasting_temporaries_and_modes_follow_the_umask(tmp_path):
    import os
    import subprocess
    import sys

    from dictionaries.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"w": torch.ones(3)}, {"step": 1})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"ckpt.safetensors.tmp{int(dead.stdout)}"  # what a kill during a write leaves
    stale.write_bytes(b"x" * 4096)
    save_checkpoint(path, {"w": torch.full((3,), 2.0)}, {"step": 2})
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]
    from dictionaries.atomic import file_mode

    assert os.stat(path).st_mode & 0o777 == file_mode()  # as an ordinary new file, not safetensors' 0600
    assert load_checkpoint(path).meta["step"] == 2


DICTS = "circuitgraph/models/v1_dicts"


@pytest.mark.parametrize("argv,message", [
    (["--threads", "-1", "tasks", "list"], "--threads -1: use a positive number"),
    (["tasks", "eval", "--n", "0"], "--n 0"),
    (["dicts", "eval", "--dicts", DICTS, "--n-seq", "0"], "--n-seq 0"),
    (["dicts", "eval", "--dicts", DICTS, "--n-seq", "1", "--density-seqs", "-1"], "--density-seqs -1"),
    (["dicts", "eval", "--dicts", DICTS, "--n-seq", "1", "--seq-len", "100000"], "--seq-len 100000: use 2 to 128"),
    (["report", "--dicts", DICTS, "--n-seq", "0", "--out", "{tmp}/r.html"], "--n-seq 0"),
    (["report", "--dicts", DICTS, "--n-seq", "1", "--seq-len", "100000", "--out", "{tmp}/r.html"], "--seq-len 100000"),
    (["train-toy-model", "--steps", "0", "--out", "{tmp}/m"], "steps and batch_size must be positive"),
    (["train-toy-model", "--checkpoint-every", "0", "--out", "{tmp}/m"], "checkpoint_every must be at least 1"),
    (["train-toy-model", "--weight-decay", "nan", "--out", "{tmp}/m"], "weight_decay finite"),
    (["train-toy-model", "--warmup", "-1", "--out", "{tmp}/m"], "warmup >= 0"),
    (["train-toy-model", "--out", "{tmp}/file/m"], "is a file, not a folder"),
    (["trace", "--task", "ioi", "--n", "4", "--describe-seqs", "-5", "--out", "{tmp}/t"], "--describe-seqs -5"),
    (["demo", "--n", "0"], "n=0"),
])
def test_every_command_refuses_bad_numbers(tmp_path, capsys, argv, message):
    (tmp_path / "file").write_text("x")
    start = time.perf_counter()
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert time.perf_counter() - start < 20
