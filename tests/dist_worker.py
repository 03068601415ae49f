"""Worker for tests/test_dict_distributed.py, launched with torchrun (2 CPU processes, gloo)."""

import sys

import torch

torch.set_num_threads(1)

from circuitgraph.models import load_default  # noqa: E402
from circuitgraph.toylang.corpus import CorpusConfig, ToyCorpus  # noqa: E402
from dictionaries import distributed  # noqa: E402
from dictionaries.site import Site  # noqa: E402
from dictionaries.training import TrainConfig, train_dictionaries  # noqa: E402

CFG = TrainConfig.of(arch="topk", k=8, expansion=2, tokens=512 * 6, batch_tokens=512, chunk_sequences=24,
                  model_batch=8, checkpoint_every=100, warmup_steps=2)
SITES = [Site(1, "resid_post"), Site(1, "transcoder"), Site(2, "clt"), Site(3, "clt")]  # clt: joint loss

if __name__ == "__main__":
    distributed.maybe_init("cpu")
    train_dictionaries(load_default(), SITES, ToyCorpus(CorpusConfig(seed=1, seq_len=64)), CFG, sys.argv[1])
