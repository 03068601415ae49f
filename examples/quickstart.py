"""Quick start: the embedded model, its tasks, and a dictionary trained and evaluated in a minute.

    .venv/bin/python examples/quickstart.py
"""

from __future__ import annotations

import logging
import tempfile

import torch

from circuitgraph.models import load_default
from circuitgraph.tasks.evaluate import evaluate_tasks
from circuitgraph.tasks.registry import make_dataset
from circuitgraph.toylang.corpus import CorpusConfig, ToyCorpus
from dictionaries.metrics import evaluate_dictionaries
from dictionaries.site import Site
from dictionaries.training import TrainConfig, train_dictionaries

logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("quickstart")


def main() -> None:
    torch.set_num_threads(2)
    model = load_default()
    ds = make_dataset("ioi", model, n=3)
    for prompt, answer in zip(ds.prompts, ds.answer_ids[:, 0], strict=True):
        log.info("%s -> %r", prompt, model.to_string(answer.unsqueeze(0)))
    log.info("task metrics: %s", evaluate_tasks(model, n=100))

    sites = [Site(1, "resid_post"), Site(1, "transcoder")]
    cfg = TrainConfig.of(arch="topk", k=16, expansion=4, tokens=200_000)
    with tempfile.TemporaryDirectory() as out:
        dicts = train_dictionaries(model, sites, ToyCorpus(CorpusConfig(seed=1)), cfg, out).dictionaries
    metrics = evaluate_dictionaries(model, dicts, ToyCorpus(CorpusConfig(seed=12345)).tokens(32))
    for site, m in metrics.items():
        log.info("%s: L0 %.1f  FVU %.3f  CE recovered %.3f", site.id, m.l0, m.fvu, m.ce_recovered)


if __name__ == "__main__":
    main()
