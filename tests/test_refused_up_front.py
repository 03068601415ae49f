"""Bad numbers and bad output locations are refused before any work, with one line and exit code 2."""

from __future__ import annotations

import time

import pytest

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
    ([*TRACE, "--granularity", "components", "--ig-steps", "0"], "must be at least 1"),
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
