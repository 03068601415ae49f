"""Data-parallel dictionary training with torchrun: 2 CPU processes equal one process (a
cross-layer transcoder, trained jointly, included)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from circuitgraph.toylang.corpus import CorpusConfig, ToyCorpus
from dictionaries.persistence import load_dictionaries
from dictionaries.training import train_dictionaries

from .dist_worker import CFG, SITES


def test_two_processes_match_one(default_model, tmp_path) -> None:
    worker = Path(__file__).with_name("dist_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                          str(worker), str(tmp_path / "ddp")], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    ddp = load_dictionaries(tmp_path / "ddp")
    single = train_dictionaries(default_model, SITES, ToyCorpus(CorpusConfig(seed=1, seq_len=64)), CFG,
                                tmp_path / "single").dictionaries
    for site in SITES:
        a, b = ddp[site].state_dict(), single[site].state_dict()
        for name in a:
            if a[name].dtype.is_floating_point:
                assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), (site, name)
            else:
                assert torch.equal(a[name], b[name]), (site, name)
